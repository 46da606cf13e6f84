"""ctx.attach on TRL's trainer family (DPO, reward, GRPO): no plugin and the tutorial z-loss train, and every plugin
sees the same per-token view (TokenBatch) whatever the trainer builds."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import hf_tokplug
from hf_tokplug import Plugin, hookimpl, manager, toy
from hf_tokplug.training import TokenBatch, token_batch

PAIRS = [{"prompt": f"In the beginning {w}", "chosen": " God created", "rejected": f" {w} said"}
         for w in ("and", "the", "he", "it", "so", "lo", "now", "then")]


def _args(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True,
               bf16=False, save_strategy="no", logging_steps=1, learning_rate=1e-3, **extra)


def _causal():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"))


class Views(Plugin):
    seen: list[TokenBatch] = []

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
        Views.seen.append(batch)


def _trainer(kind, tmp_path, ctx):
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    data = Dataset.from_list(PAIRS)
    if kind == "dpo":
        return DPOTrainer(model=ctx.model, args=_args(DPOConfig, tmp_path, max_length=32), train_dataset=data,
                          processing_class=ctx.tokenizer)
    if kind == "reward":
        return RewardTrainer(model=ctx.model, args=_args(RewardConfig, tmp_path, max_length=32), train_dataset=data,
                             processing_class=ctx.tokenizer)

    def short(completions, **_):
        return [-float(len(c)) for c in completions]

    prompts = Dataset.from_list([{"prompt": p["prompt"]} for p in PAIRS])
    return GRPOTrainer(model=ctx.model, reward_funcs=short, train_dataset=prompts, processing_class=ctx.tokenizer,
                       args=_args(GRPOConfig, tmp_path, num_generations=2, max_completion_length=4,
                                  per_device_eval_batch_size=2))


def _ctx(kind, plugins):
    tokenizer = toy.load_toy_tokenizer()
    if kind == "reward":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(toy.resolve("toy://llama"), num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return hf_tokplug.apply(model, tokenizer, plugins=plugins)
    return hf_tokplug.apply(_causal(), tokenizer, plugins=plugins)


@pytest.mark.parametrize("kind", ["dpo", "reward", "grpo"])
def test_attach_trains_without_plugins(tmp_path, kind):
    ctx = _ctx(kind, {})
    trainer = ctx.attach(_trainer(kind, tmp_path, ctx))
    trainer.train()
    assert trainer.state.global_step == 2
    assert any("tokens_per_second" in row for row in trainer.state.log_history)


def test_zloss_on_dpo_scores_both_completions(tmp_path):
    Views.seen.clear()
    with manager.registered("views", Views):
        ctx = _ctx("dpo", {"zloss": {"weight": 0.1}, "views": None})
        trainer = ctx.attach(_trainer("dpo", tmp_path, ctx))
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows and all("zloss/z" in r and r["zloss/z"] > 0 for r in rows)
    batch = Views.seen[0]
    assert batch.roles == ("chosen", "chosen", "rejected", "rejected")
    assert (batch.scored.sum(1) > 0).all()  # every completion has scored tokens; the prompts none
    assert not batch.labels[:, 0].ne(-100).any()


def test_token_batch_views_agree_across_trainers():
    """The same pair seen as an SFT example and as DPO's chosen row scores the same target tokens."""
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    sft = token_batch(object(), {"input_ids": ids, "labels": torch.tensor([[-100, -100, 7, 8, -100]])})
    dpo_like = type("DPOTrainer", (), {})()
    pair = token_batch(dpo_like, {"input_ids": torch.cat([ids, ids]),
                                  "completion_mask": torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])})
    assert torch.equal(pair.labels[0], sft.labels[0]) and pair.roles == ("chosen", "rejected")
    assert torch.equal(sft.scored[0], torch.tensor([False, True, True, False, False]))  # t scores t + 1
    grpo_like = type("GRPOTrainer", (), {})()
    policy = token_batch(grpo_like, {"prompt_ids": ids[:, :2], "completion_ids": ids[:, 2:],
                                     "completion_mask": torch.tensor([[1, 1, 0]]), "advantages": torch.tensor([0.5])})
    assert torch.equal(policy.labels, sft.labels) and policy.roles == ("policy",) and policy.advantages.item() == 0.5
