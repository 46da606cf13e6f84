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
    assert torch.equal(policy.input_ids, ids) and torch.equal(pair.input_ids[1], ids[0])


# ------------------------------------------------------------------------------------------------ token weights


class Weights(Plugin):
    """Weights from a table: ``mode`` ones, zero_at (0 at one scored token), onehot (1 only there)."""

    mode = "ones"

    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        w = torch.ones(batch.targets.shape)
        if Weights.mode == "ones":
            return w
        if Weights.mode == "zeros":
            return torch.zeros_like(w)
        row, col = [int(x) for x in batch.scored.nonzero()[0]]  # the first scored token of the batch
        if Weights.mode == "zero_at":
            w[row, col] = 0.0
            return w
        onehot = torch.zeros_like(w)
        onehot[row, col] = 1.0
        return onehot


@pytest.fixture
def weights_plugin():
    with manager.registered("weights", Weights):
        yield


@pytest.mark.parametrize("task", ["causal_lm_sft", "masked_diffusion_sft"])
def test_all_ones_weights_give_the_unweighted_run(tmp_path, weights_plugin, task):
    from conftest import read_log, run_recipe

    Weights.mode = "ones"
    sections = {} if task == "causal_lm_sft" else {"task": task, "model": {"name_or_path": "toy://gemma-bidir"}}
    plain, _ = run_recipe(tmp_path, "plain", **sections)
    weighted, _ = run_recipe(tmp_path, "weighted", **sections, plugins={"weights": None})
    losses = [[r["loss"] for r in read_log(tmp_path / name) if "loss" in r] for name in ("plain", "weighted")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, b = plain.ctx.model.state_dict(), weighted.ctx.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _one_step(kind, tmp_path, mode):
    """Parameters after one plain-SGD step on a fixed batch (so the update is -lr * gradient)."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    Weights.mode = mode
    torch.manual_seed(0)
    ctx = hf_tokplug.apply(_causal(), toy.load_toy_tokenizer(), plugins={"weights": None} if mode else {})
    common = {"optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "weight_decay": 0.0, "max_steps": 1,
              "per_device_train_batch_size": 2, "report_to": "none", "use_cpu": True, "bf16": False,
              "save_strategy": "no", "output_dir": str(tmp_path / f"{kind}-{mode}"), "max_length": 32}
    data = Dataset.from_list(PAIRS[:2])
    if kind == "sft":
        data = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS[:2]])
        trainer = SFTTrainer(model=ctx.model, args=SFTConfig(**common), train_dataset=data, processing_class=ctx.tokenizer)
    else:
        trainer = DPOTrainer(model=ctx.model, args=DPOConfig(**common), train_dataset=data, processing_class=ctx.tokenizer)
    before = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}
    ctx.attach(trainer).train()
    return {k: before[k] - v.detach() for k, v in ctx.model.named_parameters()}  # = lr * gradient


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_weights_scale_each_tokens_gradient_exactly(tmp_path, weights_plugin, kind):
    plain = _one_step(kind, tmp_path, None)
    ones = _one_step(kind, tmp_path, "ones")
    assert all(torch.equal(plain[k], ones[k]) for k in plain)  # weight 1 = no hook
    if kind == "dpo":
        # DPO's loss is a sigmoid of the weighted sums, not linear in the weights: a zero weight must still
        # change the update, and the sums use both policy and reference log-probabilities
        zero = _one_step(kind, tmp_path, "zero_at")
        assert any(not torch.allclose(plain[k], zero[k]) for k in plain)
        # all weights 0: both weighted sums are 0, the loss is log 2 whatever the parameters: no update at all
        assert all(not v.any() for v in _one_step(kind, tmp_path, "zeros").values())
        return
    # SFT: the loss is linear in the weights, so removing one token's weight removes exactly its gradient
    zero, onehot = _one_step(kind, tmp_path, "zero_at"), _one_step(kind, tmp_path, "onehot")
    for k in plain:
        torch.testing.assert_close(plain[k] - zero[k], onehot[k], rtol=1e-4, atol=1e-6)  # fp32 cancellation
    assert any(onehot[k].abs().max() > 0 for k in onehot)


def test_weights_are_refused_where_the_loss_is_not_per_token(tmp_path, weights_plugin, recipe_file):
    from hf_tokplug.cli import runner_for
    from hf_tokplug.errors import PluginError, TokPlugError

    path = recipe_file(task="sequence_classification", model={"name_or_path": "toy://bert"},
                       data={"train": "toy://kjv-books", "max_samples": 8}, plugins={"weights": None})
    with pytest.raises(PluginError, match="token_weights=False"):
        runner_for(str(path), []).validate()
    # reward models: refused when attached
    ctx = hf_tokplug.apply(_causal(), toy.load_toy_tokenizer(), plugins={"weights": None})
    from trl import RewardConfig, RewardTrainer
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(toy.resolve("toy://llama"), num_labels=1)
    model.config.pad_token_id = ctx.tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=_args(RewardConfig, tmp_path, max_length=32),
                            train_dataset=Dataset.from_list(PAIRS), processing_class=ctx.tokenizer)
    with pytest.raises(TokPlugError, match="not per token"):
        ctx.attach(trainer)


def test_attach_refuses_a_trainer_it_does_not_cover(tmp_path):
    from trl import KTOConfig, KTOTrainer
    from hf_tokplug.errors import TokPlugError

    ctx = hf_tokplug.apply(_causal(), toy.load_toy_tokenizer())
    data = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS])
    trainer = KTOTrainer(model=ctx.model, args=_args(KTOConfig, tmp_path, max_length=32), train_dataset=data,
                         processing_class=ctx.tokenizer)
    with pytest.raises(TokPlugError, match="does not cover KTOTrainer"):
        ctx.attach(trainer)


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_attach_with_zloss_and_token_weights_together(tmp_path, weights_plugin, kind):
    from trl import SFTConfig, SFTTrainer

    Weights.mode = "ones"
    ctx = _ctx("dpo", {"zloss": {"weight": 0.1}, "weights": None})
    if kind == "sft":
        data = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS])
        trainer = SFTTrainer(model=ctx.model, args=_args(SFTConfig, tmp_path, max_length=32), train_dataset=data,
                             processing_class=ctx.tokenizer)
    else:
        trainer = _trainer(kind, tmp_path, ctx)
    ctx.attach(trainer).train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows and all("zloss/z" in r for r in rows)
