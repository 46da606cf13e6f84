"""Rainbow padding and the masked-diffusion task: cyclic tail, LLaDA loss, trainable pad rows, sampler, retrofit.
(K = 0 parity with plain EOS padding and save/restore are in the conformance suite.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_tokplug
from hf_tokplug.errors import PluginError, RecipeError
from hf_tokplug.inference import _num_transfer, cut_at_stop, diffusion_sample
from hf_tokplug.inference import diffusion_generate as generate
from hf_tokplug.runners.masked_diffusion import MaskedDiffusionCollator, llada_loss
from hf_tokplug_plugins.rainbow_padding import fill_rainbow

from conftest import read_log, run_recipe

MDM = {"task": "masked_diffusion_sft", "model": {"name_or_path": "toy://gemma-bidir"},
       "task_options": {"pad_to_length": 48}}
EOS = 5


def _batch():
    collate = MaskedDiffusionCollator(pad_token_id=EOS, pad_to_length=12)
    return collate([{"input_ids": [4, 10, 11, 20, 21, EOS], "labels": [-100, -100, -100, 20, 21, EOS]},
                    {"input_ids": [4, 12, 30, EOS], "labels": [-100, -100, 30, EOS]}])


def test_collator_pads_with_eos_and_marks_the_padding():
    batch = _batch()
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0, 6:].eq(EOS).all() and batch["labels"][1, 4:].eq(EOS).all()  # pads are trained
    assert batch["pad_mask"][0].tolist() == [False] * 6 + [True] * 6


def test_collator_drops_unsupervised_tokens_after_the_answer():
    """A chat template's "\n" after <|im_end|> (label -100) would stay visible, never masked, at every answer's end;
    the padding follows the answer's last supervised token instead, as in sampling."""
    collate = MaskedDiffusionCollator(pad_token_id=EOS, pad_to_length=8)
    newline = 9
    batch = collate([{"input_ids": [4, 10, 20, 21, EOS, newline], "labels": [-100, -100, 20, 21, EOS, -100]}])
    assert batch["input_ids"][0].tolist() == [4, 10, 20, 21, EOS, EOS, EOS, EOS]
    assert batch["labels"][0].tolist() == [-100, -100, 20, 21, EOS, EOS, EOS, EOS]
    assert batch["pad_mask"][0].tolist() == [False] * 5 + [True] * 3


@pytest.mark.parametrize("start", [0, 2])
def test_rainbow_fill_keeps_one_eos_then_cycles(start):
    pads = torch.tensor([100, 101, 102])
    batch = fill_rainbow(_batch(), pads, start)
    row = batch["input_ids"][1].tolist()
    assert row[:4] == [4, 12, 30, EOS] and row.count(EOS) == 1  # exactly one EOS, at the true end
    assert row[4:] == [100 + (i + start) % 3 for i in range(8)]
    assert batch["labels"][1, 4:].tolist() == row[4:] and batch["labels"][1, :2].tolist() == [-100, -100]


def test_llada_loss_masks_only_answers_and_weights_by_p_mask(monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://gemma-bidir"))
    batch = _batch()
    seen = {}
    original = model.forward

    def spy(input_ids=None, **kw):
        seen["noisy"] = input_ids.clone()
        return original(input_ids=input_ids, **kw)

    model.forward = spy
    torch.manual_seed(0)
    loss, out = llada_loss(model, batch["input_ids"], batch["labels"], mask_id=7, eps=1e-3)
    masked = seen["noisy"] == 7
    assert not masked[batch["labels"] == -100].any() and masked.any()  # the prompt is never masked
    torch.manual_seed(0)
    t = torch.rand(2)
    p = ((1 - 1e-3) * t + 1e-3)[:, None]
    ce = F.cross_entropy(out.logits[masked].float(), batch["input_ids"][masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    want = torch.stack([(ce[rows == r] / p[r]).sum() / (batch["labels"][r] != -100).sum() for r in range(2)]).mean()
    torch.testing.assert_close(loss, want)


def test_pad_rows_start_from_eos_and_train_under_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    sections = dict(**MDM, plugins={"rainbow_padding": {"num_pads": 4}}, adapter={"r": 4})
    runner, _ = run_recipe(tmp_path, "lora", **sections, train={"learning_rate": 1e-2, "max_steps": 4})
    still, _ = run_recipe(tmp_path, "still", **sections, train={"learning_rate": 0.0, "max_steps": 4})
    ctx = runner.ctx
    pad_ids = ctx.plugins["rainbow_padding"].pad_ids(ctx.tokenizer)
    assert pad_ids == [2049, 2050, 2051, 2052] and ctx.tokenizer.mask_token_id == 2048
    assert sorted(ctx.model.peft_config["default"].trainable_token_indices) == [2048, *pad_ids]
    assert all(r.init == "copy" for r in ctx.added_tokens if r.plugin == "rainbow_padding")
    initial = still.ctx.model.merge_and_unload().get_input_embeddings().weight[pad_ids].detach()
    trained = ctx.model.merge_and_unload().get_input_embeddings().weight[pad_ids].detach()
    eos_row = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://gemma-bidir")).get_input_embeddings().weight[EOS]
    assert len({tuple(r.tolist()) for r in initial}) == 4  # EOS row + noise: distinct, not K copies
    assert ((initial - eos_row).norm(dim=-1) < 0.2 * eos_row.norm()).all()  # and close to the EOS row
    assert ((trained - initial).abs().amax(dim=-1) > 0).all()  # every pad row was trained under LoRA


def test_sampler_fills_blocks_in_order_and_cuts_at_pads():
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://gemma-bidir")).eval()
    mask_id = 7
    prompt = torch.tensor([[4, 10, 11, 12]])
    out = diffusion_sample(model, prompt, mask_id=mask_id, gen_length=16, block_length=8, steps=16)
    assert out.shape == (1, 16) and not (out == mask_id).any()
    again = diffusion_sample(model, prompt, mask_id=mask_id, gen_length=16, block_length=8, steps=16)
    assert torch.equal(out, again)  # greedy at temperature 0
    partial = diffusion_sample(model, prompt, mask_id=mask_id, gen_length=16, block_length=8, steps=2)
    assert not (partial == mask_id).any()  # one step per block commits the whole block
    assert _num_transfer(torch.ones(1, 8, dtype=torch.bool), 3).tolist() == [[3, 3, 2]]
    assert cut_at_stop([9, 8, 2050, 9], {5, 2050}) == [9, 8]
    with pytest.raises(ValueError):
        diffusion_sample(model, prompt, mask_id=mask_id, gen_length=16, block_length=5)


def test_generate_stops_at_rainbow_pads(tmp_path):
    runner, _ = run_recipe(tmp_path, "gen", **MDM, plugins={"rainbow_padding": {"num_pads": 3}}, train={"max_steps": 2})
    ctx = runner.ctx
    kwargs = ctx.call("tokplug_prepare_generation", model=ctx.model, kwargs={"stop_token_ids": [EOS]})
    assert kwargs["stop_token_ids"] == [EOS, 2049, 2050, 2051]
    texts = generate(ctx, ["Continue the verse: In the beginning"], gen_length=16, block_length=8, steps=8)
    assert len(texts) == 1 and "rainbow_pad" not in texts[0]


def test_retrofit_an_eos_padded_dllm(tmp_path):
    run_recipe(tmp_path, "dllm_eos", **MDM, plugins={"rainbow_padding": {"num_pads": 0}})
    runner, metrics = run_recipe(tmp_path, "retrofit", **{**MDM, "model": {"name_or_path": str(tmp_path / "dllm_eos")}},
                                 plugins={"rainbow_padding": {"num_pads": 7}}, adapter={"r": 4},
                                 train={"num_train_epochs": 1, "max_steps": -1})
    assert metrics["epoch"] == pytest.approx(1.0)
    assert runner.ctx.tokenizer.mask_token_id == 2048  # the dLLM's own mask token is kept, pads come after it
    assert [r for r in read_log(tmp_path / "retrofit") if "loss" in r]


def test_rainbow_refuses_a_causal_task():
    from hf_tokplug.manager import registries

    traits = registries().runners["causal_lm_sft"].traits
    ctx = hf_tokplug.context.RunContext.create({"rainbow_padding": {}}, task="causal_lm_sft", traits=traits)
    with pytest.raises(PluginError, match="needs a task with model_kind masked_lm; task 'causal_lm_sft'"):
        ctx.call("tokplug_validate")


def test_masked_diffusion_needs_a_bidirectional_model(tmp_path):
    with pytest.raises(RecipeError, match="attends causally"):
        run_recipe(tmp_path, "causal", **{**MDM, "model": {"name_or_path": "toy://llama"}})


def test_diffusers_llada2_pipeline_runs_our_model(tmp_path):
    from hf_tokplug.inference import pipeline_generate

    run_recipe(tmp_path, "pipe", **MDM, plugins={"rainbow_padding": {"num_pads": 3}}, adapter={"r": 4},
               train={"max_steps": 2})
    ctx = hf_tokplug.from_pretrained(tmp_path / "pipe")  # a PEFT model, restored
    texts = pipeline_generate(ctx, ["In the beginning", "And God said"], gen_length=16, block_length=8, steps=8)
    assert len(texts) == 2 and not any("rainbow_pad" in t for t in texts)


def test_documented_apply_path():
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    tokenizer = toy.load_toy_tokenizer()
    ctx = hf_tokplug.apply(AutoModelForCausalLM.from_pretrained(toy.resolve("toy://gemma-bidir")), tokenizer,
                           plugins={"rainbow_padding": {"num_pads": 7}}, task="masked_diffusion_sft")
    collator = ctx.wrap_collator(MaskedDiffusionCollator(pad_token_id=tokenizer.eos_token_id, pad_to_length=20))
    batch = collator([{"input_ids": [4, 10, EOS], "labels": [-100, 10, EOS]}])
    assert batch["input_ids"][0, 3:].tolist() == [2048 + i % 7 for i in range(17)]
    assert ctx.model.get_input_embeddings().weight.shape[0] >= 2055


def test_sampler_temperature_and_cfg():
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://gemma-bidir")).eval()
    prompt = torch.tensor([[4, 10, 11, 12], [4, 13, 14, 15]])
    torch.manual_seed(0)
    a = diffusion_sample(model, prompt, mask_id=7, gen_length=8, temperature=1.0)
    torch.manual_seed(1)
    b = diffusion_sample(model, prompt, mask_id=7, gen_length=8, temperature=1.0)
    assert not (a == 7).any() and not torch.equal(a, b)  # Gumbel sampling: seeds differ
    greedy = diffusion_sample(model, prompt, mask_id=7, gen_length=8)
    guided = diffusion_sample(model, prompt, mask_id=7, gen_length=8, cfg_scale=2.0)
    assert guided.shape == greedy.shape and not (guided == 7).any()


def _context_sensitive_dllm(layers: int):
    """A random bidirectional Gemma whose predictions depend on the context (large init)."""
    from hf_tokplug import toy

    cfg, cls = toy.TOY_MODELS["gemma-bidir"].build(300, layers=layers)
    cfg.initializer_range = 0.5
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_sampling_is_exact_where_nothing_stale_is_reused(cache, cfg_scale):
    """With one layer a position's cached keys/values depend on its own token only, and the tokens before (prefix)
    or outside (dual) the block do not change while the block decodes: the cache is exact there, so the cached
    sampler must give the plain sampler's tokens (this checks positions, the open mask and the cache trimming). With
    two layers the reused keys/values are stale (documented as approximate) and the tokens do differ."""
    prompt = torch.randint(10, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    kw = {"mask_id": 299, "gen_length": 16, "block_length": 8, "steps": 16, "cfg_scale": cfg_scale}
    one = _context_sensitive_dllm(1)
    plain = diffusion_sample(one, prompt, **kw)
    assert plain.unique().numel() > 8  # the predictions do depend on the context
    assert torch.equal(diffusion_sample(one, prompt, cache=cache, **kw), plain)
    two = _context_sensitive_dllm(2)
    assert not torch.equal(diffusion_sample(two, prompt, cache=cache, **kw), diffusion_sample(two, prompt, **kw))


def test_cached_and_parallel_sampling_run_fewer_or_shorter_forwards():
    model = _context_sensitive_dllm(2)
    lengths: list[int] = []
    handle = model.register_forward_hook(lambda _m, args, kwargs, _out: lengths.append(kwargs["input_ids"].shape[1]),
                                         with_kwargs=True)
    prompt = torch.randint(10, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = {"mask_id": 299, "gen_length": 16, "block_length": 8, "steps": 16}
    plain = diffusion_sample(model, prompt, **kw)
    assert lengths == [23] * 16
    lengths.clear()
    diffusion_sample(model, prompt, cache="prefix", **kw)  # a full forward per block, then the block and its suffix
    assert lengths == [23] + [16] * 7 + [23] + [8] * 7
    lengths.clear()
    diffusion_sample(model, prompt, cache="dual", **kw)  # then the block alone
    assert lengths == [23] + [8] * 7 + [23] + [8] * 7
    lengths.clear()
    everything = diffusion_sample(model, prompt, threshold=1e-9, **kw)  # every position is confident enough
    assert len(lengths) == 2 and not (everything == 299).any()
    lengths.clear()
    assert torch.equal(diffusion_sample(model, prompt, threshold=1.0, **kw), plain)  # nothing extra commits
    assert len(lengths) == 16
    handle.remove()
    for bad in ({"cache": "full"}, {"threshold": 0.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            diffusion_sample(model, prompt, **kw, **bad)


@pytest.mark.parametrize("options", [{"cache": "dual"}, {"threshold": 0.5}, {"cache": "prefix", "threshold": 0.9}])
def test_generate_with_cache_and_threshold_stops_at_rainbow_pads(tmp_path, options):
    runner, _ = run_recipe(tmp_path, "gen", **MDM, plugins={"rainbow_padding": {"num_pads": 3}}, train={"max_steps": 2})
    prompt = ["Continue the verse: In the beginning"]
    texts = generate(runner.ctx, prompt, gen_length=16, block_length=8, steps=16, **options)
    assert len(texts) == 1 and "rainbow_pad" not in texts[0]
    restored = hf_tokplug.from_pretrained(tmp_path / "gen")  # the restored-model path takes the same options
    assert generate(restored, prompt, gen_length=16, block_length=8, steps=16, **options) == texts


def test_bidirectional_under_every_attention_implementation(tmp_path):
    """A decoder with use_bidirectional_attention attends both ways under eager and with a padding mask too (it used
    to get transformers' causal mask there), and masked-LM architectures that transformers also maps to a causal LM
    (RoBERTa) load as masked LMs."""
    from transformers import GemmaConfig, RobertaConfig

    from hf_tokplug.runners.masked_diffusion import MaskedDiffusionSFT

    logits = {}
    x = torch.randint(10, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    later = x.clone()
    later[0, 6] = 99
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    for impl in ("sdpa", "eager"):
        sections = {**MDM, "model": {"name_or_path": "toy://gemma-bidir", "attn_implementation": impl}}
        runner, _ = run_recipe(tmp_path, impl, **sections, train={"max_steps": 1, "learning_rate": 0.0})
        model = runner.ctx.model.eval()
        with torch.no_grad():
            logits[impl] = model(input_ids=x).logits
            first = model(input_ids=x, attention_mask=mask).logits[0, 0]
            changed = model(input_ids=later, attention_mask=mask).logits[0, 0]
        assert (first - changed).abs().max() > 1e-4, impl  # position 0 sees position 6
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    assert MaskedDiffusionSFT.auto_class_for(RobertaConfig()) == "AutoModelForMaskedLM"
    assert MaskedDiffusionSFT.auto_class_for(GemmaConfig(use_bidirectional_attention=True)) == "AutoModelForCausalLM"


def test_generate_samples_masked_lms_with_the_diffusion_sampler(tmp_path):
    """hf_tokplug.generate on a masked-diffusion context (or a model without .generate, ModernBERT) runs the LLaDA
    sampler instead of failing; max_new_tokens is the window."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from hf_tokplug import toy
    from hf_tokplug.errors import TokPlugError

    runner, _ = run_recipe(tmp_path, "gen", **MDM, train={"max_steps": 1})
    prompt = ["Continue the verse: In the beginning"]
    assert hf_tokplug.generate(runner.ctx, prompt, max_new_tokens=16, block_length=8, steps=16) == generate(
        runner.ctx, prompt, gen_length=16, block_length=8, steps=16)

    tok = toy.load_toy_tokenizer()
    cfg = ModernBertConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=1,
                           eos_token_id=tok.eos_token_id, cls_token_id=1, sep_token_id=tok.eos_token_id)
    ctx = hf_tokplug.apply(ModernBertForMaskedLM(cfg), tok, task="masked_diffusion_sft")
    with pytest.raises(TokPlugError, match="mask token"):
        hf_tokplug.generate(ctx, "In the beginning", max_new_tokens=8)
    ctx.tokenizer.add_special_tokens({"mask_token": "<|mdm_mask|>"})
    texts = hf_tokplug.generate(ctx, ["In the beginning"], max_new_tokens=8, cache=None, threshold=0.9)
    assert len(texts) == 1 and isinstance(texts[0], str)
