"""Added tokens: resize, init strategies from the registry, tied/untied heads, trainable rows under LoRA."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import hf_tokplug
from hf_tokplug import Plugin, PluginConfig, hookimpl, manager, toy
from hf_tokplug.tokens import add_tokens

from conftest import run_recipe


class AddConfig(PluginConfig):
    n: int = Field(3, ge=0)
    init: str = "mean"
    init_options: dict = {}
    inject: bool = False  # append the new tokens to every training example (so their rows get gradient)


class AddTokensPlugin(Plugin):
    """Adds `n` special tokens; a test-only stand-in for what rainbow padding / TokenAdapt do."""

    config_class = AddConfig

    @hookimpl
    def tokplug_prepare_tokenizer(self, ctx, tokenizer):
        tokens = [f"<extra_{i}>" for i in range(self.config.n)]
        self.ids = add_tokens(ctx, tokenizer, tokens, plugin=self.name, init=self.config.init,
                              init_options=self.config.init_options)

    @hookimpl
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        if not self.config.inject:
            return None
        tail = self.ids + [ctx.tokenizer.eos_token_id]  # the last position predicts nothing: end on EOS
        return dataset.map(lambda ex: {"input_ids": ex["input_ids"] + tail, "labels": ex["labels"] + tail})


@pytest.fixture(autouse=True)
def plugin():
    with manager.registered("addtok", AddTokensPlugin):
        yield


def _model(name="toy://llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy.resolve(name)), toy.load_toy_tokenizer()


@pytest.mark.parametrize("name", ["toy://llama", "toy://qwen2", "toy://gpt-neox"])
def test_resize_and_mean_init(name):
    model, tokenizer = _model(name)
    old_in = model.get_input_embeddings().weight.detach().clone()
    ctx = hf_tokplug.apply(model, tokenizer, plugins={"addtok": {"n": 3}}, pad_to_multiple_of=64)
    ids = [t.id for t in ctx.added_tokens]
    assert ids == [2048, 2049, 2050] and len(ctx.tokenizer) == 2051
    emb = ctx.model.get_input_embeddings().weight
    assert emb.shape[0] == 2112 and ctx.model.config.vocab_size == 2112  # padded to a multiple of 64
    torch.testing.assert_close(emb[:2048], old_in)
    torch.testing.assert_close(emb[ids], old_in.mean(0).expand(3, -1))
    head = ctx.model.get_output_embeddings().weight
    if name == "toy://qwen2":
        assert head is emb  # still tied
    else:
        assert head is not emb


def test_copy_init_with_noise_is_seeded():
    rows = []
    for _ in range(2):
        model, tokenizer = _model()
        ctx = hf_tokplug.apply(model, tokenizer, plugins={"addtok": {"n": 2, "init": "copy",
                                                                     "init_options": {"token": "<|im_end|>", "noise_std": 0.1}}})
        rows.append(ctx.model.get_input_embeddings().weight[2048:2050].detach().clone())
        eos = ctx.model.get_input_embeddings().weight[5]
        assert 0 < (rows[-1][0] - eos).norm() < 0.5 * eos.norm()
    torch.testing.assert_close(rows[0], rows[1])


def test_unknown_init_strategy():
    model, tokenizer = _model()
    with pytest.raises(hf_tokplug.PluginError, match="token-init strategy 'nope'"):
        hf_tokplug.apply(model, tokenizer, plugins={"addtok": {"init": "nope"}})


def test_new_rows_train_under_lora(tmp_path):
    runner, _ = run_recipe(tmp_path, "lora", plugins={"addtok": {"n": 2, "inject": True}}, adapter={"r": 4},
                           train={"max_steps": 3, "learning_rate": 1e-2})
    model = runner.ctx.model
    config = model.peft_config["default"]
    assert sorted(config.trainable_token_indices) == [2048, 2049]
    assert "lm_head" in config.modules_to_save  # untied head: trained in full (TRL reads lm_head.weight)
    fresh, _ = _model()
    start_in = fresh.get_input_embeddings().weight.detach().mean(0)
    start_out = fresh.get_output_embeddings().weight.detach().mean(0)
    restored = hf_tokplug.from_pretrained(tmp_path / "lora")
    ids = torch.tensor([[4, 2048, 2049, 5]])
    torch.testing.assert_close(restored.model.eval()(ids).logits, model.eval()(ids).logits)
    assert [t.token for t in restored.added_tokens] == ["<extra_0>", "<extra_1>"]
    merged = model.merge_and_unload()
    assert (merged.get_input_embeddings().weight[2048:2050] - start_in).abs().min(dim=-1).values.gt(0).all()
    assert (merged.get_output_embeddings().weight[2048:2050] - start_out).abs().max() > 1e-4
