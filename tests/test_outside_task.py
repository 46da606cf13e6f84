"""A task from an outside package, written against hf_tokplug.plugin only (as docs/writing-a-task.md shows): every
built-in plugin whose needs its traits meet works on it; the others refuse it naming the trait it lacks."""

from __future__ import annotations

import pytest

import hf_tokplug
from hf_tokplug import manager
from hf_tokplug.plugin import Plugin, PluginError, Runner, TaskTraits, hookimpl

from conftest import read_log, run_recipe


class PlainLM(Runner):
    """Causal-LM training on transformers' plain Trainer: text -> input_ids, labels = input_ids (the model shifts)."""

    task = "outside_plain_lm"
    description = "causal LM on transformers.Trainer (an outside package's task)"
    traits = TaskTraits(model_kind="causal_lm", label_shift=1, batch_fields=("input_ids", "attention_mask", "labels"),
                        generates="text")

    def configure_tokenizer(self, ctx, tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def examples(self, ctx, raw):
        field, length = self.recipe.data.text_field, self.recipe.data.max_length or 64

        def encode(batch):
            return ctx.tokenizer(batch[field], truncation=True, max_length=length)

        return {split: ds.map(encode, batched=True, remove_columns=ds.column_names) for split, ds in raw.items()}

    def base_collator(self, ctx):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(ctx.tokenizer, mlm=False)

    def make_trainer(self, ctx, train, evald, collator, callbacks):
        from transformers import Trainer

        return Trainer(model=ctx.model, args=self.trainer_arguments(ctx), data_collator=collator, train_dataset=train,
                       eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=callbacks)


class OutsideTasks(Plugin):
    @staticmethod
    @hookimpl
    def tokplug_register_runners(register):
        register(PlainLM.task, PlainLM)


SECTIONS = {"task": "outside_plain_lm", "data": {"train": "toy://kjv-text", "max_samples": 32, "max_length": 48}}


@pytest.fixture(autouse=True)
def outside_package():
    with manager.registered("outside_tasks", OutsideTasks):
        yield


@pytest.mark.parametrize("plugins, logs", [
    ({"zloss": {"weight": 0.1}}, True),
    ({"caft": {"num_heads": 2, "train_heads": True, "alpha": 0.1}}, True),
    ({"tokenadapt": {"tokenizer": "toy://tokenizer/kjv-bpe-3k", "input_init": "fvt", "eval": {"data": None}}}, False),
])
def test_plugins_whose_needs_the_traits_meet_work(tmp_path, plugins, logs):
    runner, metrics = run_recipe(tmp_path, "run", **SECTIONS, plugins=plugins)
    assert metrics["train_loss"] > 0
    name = next(iter(plugins))
    rows = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert rows and all(any(k.startswith(f"{name}/") for k in r) == logs for r in rows)  # its terms / metrics
    restored = hf_tokplug.from_pretrained(tmp_path / "run")
    assert restored.task == "outside_plain_lm" and list(restored.plugins) == [name]


@pytest.mark.parametrize("plugins, trait", [
    ({"rainbow_padding": {"num_pads": 3}}, "model_kind masked_lm"),
    ({"tara": {"rare_token": "sks", "class_word": "square"}}, "model_kind diffusion_unet"),
    ({"dynamic_tokenization": {"merges": 4}}, "token-level labels"),
])
def test_other_plugins_name_the_missing_trait(tmp_path, plugins, trait):
    with pytest.raises(PluginError, match=trait) as err:
        run_recipe(tmp_path, "run", **SECTIONS, plugins=plugins)
    assert "outside_plain_lm" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_a_task_without_traits_is_refused_clearly(tmp_path):
    assert "traits" not in vars(Runner)  # the base class declares none: each task must

    class BareTasks(Plugin):
        @staticmethod
        @hookimpl
        def tokplug_register_runners(register):
            register("outside_bare", type("Bare", (Runner,), {"task": "outside_bare"}))

    with manager.registered("bare_tasks", BareTasks), pytest.raises(PluginError, match="declares no traits"):
        run_recipe(tmp_path, "run", **{**SECTIONS, "task": "outside_bare"})
