"""The TRL-family tasks: preference_dpo, reward_model, grpo on the embedded default; plugins on them; bad input."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import hf_tokplug
from hf_tokplug.cli import runner_for
from hf_tokplug.errors import PluginError, RecipeError

from conftest import read_log, run_recipe

# eval: 4 pairs held out of the 16 (the toy's eval split has 360 pairs, which every DPO evaluation would score)
PAIRS = {"train": "toy://kjv-preference", "eval_size": 4, "max_samples": 16, "max_length": 48}
DPO = {"task": "preference_dpo", "data": PAIRS, "train": {"max_steps": 3, "per_device_train_batch_size": 4}}
REWARD = {"task": "reward_model", "data": PAIRS, "adapter": {"r": 4},
          "train": {"max_steps": 3, "per_device_train_batch_size": 4}}
GRPO = {"task": "grpo", "data": {"train": "toy://kjv-verifiable", "max_samples": 64},
        "task_options": {"rewards": [{"name": "exact_match", "column": "answer"},
                                     {"name": "regex", "pattern": r"^\s*[A-Z][a-z]+\b"}]},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 6}}


def _logits(ctx, text="Continue the verse from Genesis 1:2: And the earth"):
    ids = ctx.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ctx.model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("adapter", [None, {"r": 4}])
def test_dpo_trains_with_the_right_reference_and_restores(tmp_path, adapter):
    runner, metrics = run_recipe(tmp_path, "dpo", **DPO, adapter=adapter)
    trainer = runner.ctx.trainer
    if adapter is None:  # full fine-tuning: a frozen copy of the prepared initial model
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
        assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    else:  # LoRA: the policy with its adapter disabled
        assert trainer.ref_model is None
    rows = [r for r in read_log(tmp_path / "dpo") if "loss" in r]
    assert rows and all("rewards/margins" in r for r in rows) and "eval_loss" in metrics
    restored = hf_tokplug.from_pretrained(tmp_path / "dpo")
    assert restored.task == "preference_dpo"
    torch.testing.assert_close(_logits(restored), _logits(runner.ctx), rtol=0, atol=0)


def test_dpo_with_the_tutorial_zloss_and_caft_on_chosen_completions(tmp_path):
    plugins = {"zloss": {"weight": 0.1}, "caft": {"num_heads": 2, "train_heads": True, "alpha": 0.1}}
    run_recipe(tmp_path, "dpo", **DPO, plugins=plugins)
    rows = [r for r in read_log(tmp_path / "dpo") if "loss" in r]
    assert rows and all("zloss/z" in r and "caft/head_1" in r for r in rows)


def test_reward_model_trains_and_restores(tmp_path):
    runner, metrics = run_recipe(tmp_path, "reward", **REWARD)
    assert "eval_accuracy" in metrics
    restored = hf_tokplug.from_pretrained(tmp_path / "reward")
    ids = restored.tokenizer(["In the beginning God created the heaven"], return_tensors="pt")
    with torch.no_grad():
        a = restored.model.eval()(**ids).logits
        b = runner.ctx.model.eval()(**ids).logits
    assert a.shape == (1, 1)
    torch.testing.assert_close(a, b)


def test_grpo_reward_curve_rises_on_the_bundled_task(tmp_path):
    train = {"max_steps": 60, "per_device_train_batch_size": 8, "num_generations": 8, "max_completion_length": 8,
             "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1}
    run_recipe(tmp_path, "grpo", **{**GRPO, "train": train})
    rewards = [r["reward"] for r in read_log(tmp_path / "grpo") if "reward" in r]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.2, (first, last)


def test_grpo_all_ones_token_weights_change_nothing(tmp_path):
    from hf_tokplug import Plugin, hookimpl, manager

    class Ones(Plugin):
        @hookimpl
        def tokplug_token_weights(self, ctx, batch):
            return torch.ones(batch.targets.shape)

    plain, _ = run_recipe(tmp_path, "plain", **GRPO)
    with manager.registered("ones", Ones):
        weighted, _ = run_recipe(tmp_path, "ones", **GRPO, plugins={"ones": None})
    keys = ("loss", "reward")
    a = [{k: r[k] for k in keys} for r in read_log(tmp_path / "plain") if "loss" in r]
    b = [{k: r[k] for k in keys} for r in read_log(tmp_path / "ones") if "loss" in r]
    assert len(a) == 4 and a == b
    x, y = plain.ctx.model.state_dict(), weighted.ctx.model.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------------ bad input


def _validate(recipe_file, **sections):
    runner = runner_for(str(recipe_file(**sections)), [])
    runner.validate()
    return runner


def test_missing_preference_columns_are_named_before_weights_load(recipe_file):
    runner = _validate(recipe_file, **{**DPO, "data": {"train": "toy://kjv-completion", "max_samples": 8}})
    with pytest.raises(RecipeError, match="needs columns prompt/chosen/rejected or chosen/rejected"):
        runner.read_data(runner.validate())


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def good(completions, **kwargs):
            return [1.0 for _ in completions]

        def no_kwargs(completions):
            return [1.0 for _ in completions]

        def wrong_shape(completions, **kwargs):
            return [1.0]

        def broken(completions, **kwargs):
            raise ZeroDivisionError("boom")

        def needs_column(completions, difficulty, **kwargs):
            return [float(d) for d in difficulty]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("reward, message", [
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("my_rewards:missing", "has no callable 'missing'"),
    ("my_rewards:no_kwargs", "takes no \\*\\*kwargs"),
    ("nonsense", "unknown reward function 'nonsense'"),
    ({"name": "regex", "pattern": "("}, "invalid options for reward 'regex'"),
])
def test_reward_functions_that_cannot_serve_fail_in_validate(recipe_file, user_rewards, reward, message):
    with pytest.raises(RecipeError, match=message):
        _validate(recipe_file, **{**GRPO, "task_options": {"rewards": [reward]}})


def test_a_reward_column_missing_from_the_data_is_named(recipe_file, user_rewards):
    runner = _validate(recipe_file, **{**GRPO, "task_options": {"rewards": ["my_rewards:needs_column"]}})
    with pytest.raises(RecipeError, match="difficulty"):
        runner.read_data(runner.validate())


@pytest.mark.parametrize("name, message", [("wrong_shape", "returned 1 values"), ("broken", "raised ZeroDivisionError")])
def test_a_reward_that_misbehaves_is_named(tmp_path, user_rewards, name, message):
    with pytest.raises(RecipeError, match=rf"reward function 'my_rewards:{name}' {message}"):
        run_recipe(tmp_path, "grpo", **{**GRPO, "task_options": {"rewards": [f"my_rewards:{name}"]}})


def test_plugins_that_cannot_serve_a_task_say_which_trait_is_missing(recipe_file):
    with pytest.raises(PluginError, match="token-level labels"):
        _validate(recipe_file, **REWARD, plugins={"zloss": {"weight": 0.1}})
    with pytest.raises(PluginError, match="model_kind masked_lm"):
        _validate(recipe_file, **DPO, plugins={"rainbow_padding": {"num_pads": 2}})


def test_a_reference_with_another_tokenizer_is_refused(recipe_file):
    with pytest.raises(RecipeError, match="another tokenizer than the policy"):
        _validate(recipe_file, **DPO, task_options={"ref_model": "toy://tokenizer/kjv-bpe-3k"})


def test_validate_checks_the_columns_of_local_data(tmp_path, capsys):
    from hf_tokplug.cli import main

    from conftest import base_recipe, write_recipe

    bad = write_recipe(tmp_path / "bad.yaml", base_recipe(tmp_path / "out", **{**DPO, "data": {
        "train": "toy://kjv-completion", "max_samples": 8}}))
    assert main(["validate", str(bad)]) == 2
    assert "needs columns prompt/chosen/rejected" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


TRL_TASKS = {"preference_dpo": DPO, "reward_model": REWARD, "grpo": GRPO}


@pytest.mark.parametrize("task", sorted(TRL_TASKS))
@pytest.mark.parametrize("plugin", ["caft", "dynamic_tokenization", "rainbow_padding", "tara", "tokenadapt", "zloss"])
def test_every_builtin_plugin_serves_or_refuses_each_trl_task(tmp_path, recipe_file, task, plugin):
    """Either validate refuses naming a trait (a PluginError, before anything loads) or two steps train."""
    from hf_tokplug.manager import installed_plugins

    active = installed_plugins()[plugin].cls.test_configs["active"]
    sections = {**TRL_TASKS[task], "plugins": {plugin: active}}
    sections["train"] = {**sections["train"], "max_steps": 2}
    try:
        _validate(recipe_file, **sections)
    except PluginError as exc:
        assert f"task {task!r}" in str(exc) or task in str(exc)
        return
    _, metrics = run_recipe(tmp_path, "run", **sections)
    assert metrics["train_loss"] == metrics["train_loss"]  # ran to the end (a number, not NaN)


def test_a_run_whose_data_does_not_fit_writes_nothing(tmp_path):
    with pytest.raises(RecipeError, match="needs columns"):
        run_recipe(tmp_path, "dpo", **{**DPO, "data": {"train": "toy://kjv-completion", "max_samples": 8}})
    assert not (tmp_path / "dpo").exists()


def test_dpo_with_precomputed_reference_log_probs(tmp_path):
    train = {**DPO["train"], "precompute_ref_log_probs": True}
    runner, metrics = run_recipe(tmp_path, "dpo", **{**DPO, "train": train}, adapter={"r": 4})
    assert "ref_chosen_logps" in runner.ctx.trainer.train_dataset.column_names and metrics["train_loss"] > 0


def test_dpo_trains_on_the_examples_the_data_hooks_prepared(tmp_path):
    from hf_tokplug import Plugin, hookimpl, manager

    class KeepTwo(Plugin):
        @hookimpl
        def tokplug_prepare_dataset(self, ctx, dataset, split):
            assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)  # TRL's own format
            return dataset.select(range(2))

    with manager.registered("keep_two", KeepTwo):
        runner, _ = run_recipe(tmp_path, "dpo", **DPO, plugins={"keep_two": None})
    assert len(runner.ctx.trainer.train_dataset) == 2 and len(runner.ctx.trainer.eval_dataset) == 2


@pytest.mark.parametrize("task", ["preference_dpo", "reward_model"])
def test_conversational_pairs_with_an_implicit_prompt(tmp_path, task):
    import json

    rows = []
    from hf_tokplug import toy

    for r in toy.load_toy_dataset("toy://kjv-preference").select(range(8)):
        user = {"role": "user", "content": r["prompt"].strip()}
        rows.append({"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": r["rejected"]}]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sections = {**(DPO if task == "preference_dpo" else REWARD), "data": {"train": str(path), "max_length": 96}}
    runner, metrics = run_recipe(tmp_path, "run", **sections)
    assert metrics["train_loss"] > 0
    if task == "preference_dpo":  # TRL extracted the shared prompt: it is not scored
        example = runner.ctx.trainer.train_dataset[0]
        assert example["prompt_ids"] and example["chosen_ids"] != example["rejected_ids"]
