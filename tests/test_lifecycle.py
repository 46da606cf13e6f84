"""One lifecycle: every registered task fires the hooks in the documented order, skipping only what its traits rule
out; the once-per-run hooks fire exactly once; a chain hook's return value is the value used afterwards."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

import hf_tokplug
from hf_tokplug import Plugin, hookimpl, manager
from hf_tokplug.manager import registries

from conftest import run_recipe
from fake_hub import fake_hub

CALLS: list[str] = []

# The documented run order (docs/hooks.md, hf_tokplug/lifecycle.py), once-per-run hooks only.
ORDER = [
    "validate", "load_tokenizer", "prepare_tokenizer", "load_model", "adapt_embeddings", "prepare_model",
    "adapter_config", "post_model_load", "prepare_dataset:train", "prepare_dataset:eval", "wrap_collator", "callbacks",
    "post_trainer_create", "post_train", "prepare_pipeline", "evaluate", "save", "model_card",
]

TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no", "logging_steps": 1}
EVAL_CHAT = {"train": "toy://kjv-chat", "eval_size": 2, "max_samples": 8, "max_length": 48}
SD_OPTIONS = {"resolution": 32, "sample_prompts": ["a photo of sks square"], "num_inference_steps": 2}

# A small recipe per registered task on the embedded default (a new task adds a row here).
TASK_RECIPES = {
    "causal_lm_sft": {"data": EVAL_CHAT, "adapter": {"r": 4}, "train": TRAIN},
    "causal_lm_prepare": {"task": "causal_lm_prepare", "data": EVAL_CHAT, "adapter": {"r": 4}},
    "masked_diffusion_sft": {"task": "masked_diffusion_sft", "model": {"name_or_path": "toy://gemma-bidir"},
                             "data": EVAL_CHAT, "adapter": {"r": 4}, "train": TRAIN},
    "sequence_classification": {"task": "sequence_classification", "model": {"name_or_path": "toy://bert"},
                                "data": {"train": "toy://kjv-books", "eval": {"path": "toy://kjv-books", "split": "eval"},
                                         "max_samples": 16, "max_length": 32},
                                "adapter": {"r": 4, "target_modules": ["query", "value"]}, "train": TRAIN},
    "diffusion_lora": {"task": "diffusion_lora", "model": {"name_or_path": "toy://sd"}, "data": None,
                       "adapter": {"r": 4, "alpha": 8}, "train": TRAIN,
                       "task_options": {"instance_data_dir": "toy://shapes/red-square",
                                        "instance_prompt": "a photo of sks square", **SD_OPTIONS}},
    "diffusion_generate": {"task": "diffusion_generate", "model": {"name_or_path": "toy://sd"}, "data": None,
                           "task_options": SD_OPTIONS},
    "dyntok_hypernet": {"task": "dyntok_hypernet", "model": {"name_or_path": "toy://bert"},
                        "data": {"train": "toy://kjv-text", "max_samples": 24},
                        "task_options": {"steps": 2, "warmup_steps": 1, "batch_size": 4, "eval_texts": 4, "width": 16,
                                         "layers": 1, "heads": 2, "eval_merges": [2]}},
    "preference_dpo": {"task": "preference_dpo", "adapter": {"r": 4}, "train": TRAIN,
                       "data": {"train": "toy://kjv-preference", "eval_size": 2, "max_samples": 8, "max_length": 48}},
    "reward_model": {"task": "reward_model", "adapter": {"r": 4}, "train": TRAIN,
                     "data": {"train": "toy://kjv-preference", "eval_size": 2, "max_samples": 8, "max_length": 48}},
    "grpo": {"task": "grpo", "adapter": {"r": 4}, "data": {"train": "toy://kjv-verifiable", "max_samples": 8},
             "train": {**TRAIN, "num_generations": 2, "max_completion_length": 4},
             "task_options": {"rewards": ["exact_match", {"name": "length", "target": 8}]}},
    "dyntok_generate": {"task": "dyntok_generate", "data": {"train": "toy://kjv-text", "max_samples": 50},
                        "task_options": {"new_tokens": 10, "max_new_tokens": 2, "max_texts": 50, "candidates": 8,
                                         "prompts": ["In the beginning"]}},
}


class Recorder(Plugin):
    @hookimpl
    def tokplug_validate(self, ctx):
        assert ctx.model is None and ctx.tokenizer is None and ctx.traits is not None  # before anything loads
        CALLS.append("validate")

    @hookimpl
    def tokplug_load_tokenizer(self, ctx):
        CALLS.append("load_tokenizer")

    @hookimpl
    def tokplug_prepare_tokenizer(self, ctx, tokenizer):
        assert ctx.model is None and tokenizer is ctx.tokenizer
        CALLS.append("prepare_tokenizer")

    @hookimpl
    def tokplug_load_model(self, ctx):
        CALLS.append("load_model")

    @hookimpl
    def tokplug_adapt_embeddings(self, ctx, model):
        assert ctx.base_tokenizer is ctx.tokenizer  # nobody swapped it
        CALLS.append("adapt_embeddings")

    @hookimpl
    def tokplug_prepare_model(self, ctx, model):
        assert not hasattr(model, "peft_config") and not hasattr(getattr(model, "unet", None), "peft_config")
        CALLS.append("prepare_model")

    @hookimpl
    def tokplug_adapter_config(self, ctx, peft_config):
        CALLS.append("adapter_config")

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        assert model is ctx.model
        CALLS.append("post_model_load")

    @hookimpl
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        assert len(dataset) > 0 and isinstance(dataset[0], dict)
        CALLS.append(f"prepare_dataset:{split}")

    @hookimpl
    def tokplug_wrap_collator(self, ctx, collator):
        CALLS.append("wrap_collator")

    @hookimpl
    def tokplug_callbacks(self, ctx):
        CALLS.append("callbacks")

    @hookimpl
    def tokplug_post_trainer_create(self, ctx, trainer):
        assert trainer is ctx.trainer
        CALLS.append("post_trainer_create")

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs):
        CALLS.append("loss_terms")

    @hookimpl
    def tokplug_post_train(self, ctx, model):
        CALLS.append("post_train")

    @hookimpl
    def tokplug_prepare_pipeline(self, ctx, pipeline):
        CALLS.append("prepare_pipeline")

    @hookimpl
    def tokplug_evaluate(self, ctx):
        CALLS.append("evaluate")
        return {"answer": 42.0}

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        CALLS.append("save")

    @hookimpl
    def tokplug_model_card(self, ctx):
        CALLS.append("model_card")

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        CALLS.append("restore")


@pytest.fixture(autouse=True)
def recorder():
    CALLS.clear()
    with manager.registered("recorder", Recorder):
        yield


def test_every_registered_task_has_a_lifecycle_case():
    assert set(TASK_RECIPES) == set(registries().runners)


@pytest.mark.parametrize("task", sorted(TASK_RECIPES))
def test_every_task_fires_the_documented_order(tmp_path, task):
    sections = TASK_RECIPES[task]
    _, metrics = run_recipe(tmp_path, "run", plugins={"recorder": None}, **sections)
    assert metrics["recorder/answer"] == 42.0
    traits = registries().runners[task].traits
    skipped = traits.skipped_hooks(adapter=sections.get("adapter") is not None,
                                   renders=bool((sections.get("task_options") or {}).get("sample_prompts")))
    data = sections.get("data")
    splits = {"prepare_dataset:eval"} if isinstance(data, dict) and ({"eval", "eval_size"} & set(data)) else set()
    expected = [c for c in ORDER if f"tokplug_{c.split(':')[0]}" not in skipped
                and (not c.startswith("prepare_dataset:eval") or c in splits)]
    assert [c for c in CALLS if c != "loss_terms"] == expected
    assert (Counter(CALLS)["loss_terms"] > 0) == ("tokplug_loss_terms" not in skipped)


def test_checkpoints_save_state_and_restore_fires_once(tmp_path):
    _, metrics = run_recipe(tmp_path, "run", plugins={"recorder": None}, adapter={"r": 4}, data={"eval_size": 8},
                            train={"save_strategy": "steps", "save_steps": 2})
    once = [c for c in CALLS if c != "loss_terms"]
    assert once == [
        "validate", "load_tokenizer", "prepare_tokenizer", "load_model", "adapt_embeddings", "prepare_model",
        "adapter_config", "post_model_load", "prepare_dataset:train", "prepare_dataset:eval", "wrap_collator",
        "callbacks", "post_trainer_create", "save", "save", "post_train", "evaluate", "save", "model_card",
    ]  # two checkpoint saves (steps 2 and 4), then the final folder
    CALLS.clear()
    hf_tokplug.from_pretrained(tmp_path / "run")
    assert CALLS == ["restore"]


class Replacer(Plugin):
    """Returns a copy of the model from the prepare_model chain: everything after must use the copy."""

    seen: dict = {}

    @hookimpl
    def tokplug_prepare_model(self, ctx, model):
        Replacer.seen["replacement"] = copy.deepcopy(model)
        return Replacer.seen["replacement"]

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        Replacer.seen["post_model_load"] = model


@pytest.mark.parametrize("task", ["causal_lm_sft", "diffusion_lora"])
def test_a_chain_hooks_replacement_is_used_afterwards(tmp_path, task):
    Replacer.seen.clear()
    with manager.registered("replacer", Replacer):
        runner, _ = run_recipe(tmp_path, "run", plugins={"replacer": None}, **TASK_RECIPES[task])
    replacement = Replacer.seen["replacement"]
    assert Replacer.seen["post_model_load"] is runner.ctx.model
    trained = runner.ctx.trainer.model
    inner = trained.unet if task == "diffusion_lora" else trained.get_base_model()
    assert inner is (replacement.unet if task == "diffusion_lora" else replacement)


def test_apply_fires_the_same_phases_without_load_model():
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://qwen2"))
    ctx = hf_tokplug.apply(model, toy.load_toy_tokenizer(), plugins={"recorder": None})
    assert CALLS == ["validate", "load_tokenizer", "prepare_tokenizer", "adapt_embeddings", "prepare_model",
                     "post_model_load"]
    assert ctx.task == "causal_lm_sft" and ctx.traits.model_kind == "causal_lm" and ctx.recipe is None


def test_context_push_to_hub(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://qwen2"))
    ctx = hf_tokplug.apply(model, toy.load_toy_tokenizer(), plugins={"recorder": None})
    with fake_hub(monkeypatch) as hub:
        url = ctx.push_to_hub("me/applied", folder=ctx.save_pretrained(tmp_path / "saved"))
    assert url.startswith("https://huggingface.co/me/applied/commit/")
    assert {"model.safetensors", "tokplug.json", "README.md"} <= set(hub.repos["me/applied"]["files"])


class Marker(Plugin):
    @hookimpl
    def tokplug_wrap_collator(self, ctx, collator):
        def collate(examples):
            CALLS.append("collated")
            return collator(examples)

        return collate


def test_attach_wraps_the_own_trainers_collator(tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_tokplug import toy

    data = toy.load_toy_dataset("toy://kjv-text", "train").select(range(8))
    with manager.registered("marker", Marker):
        ctx = hf_tokplug.apply(AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")),
                               toy.load_toy_tokenizer(), plugins={"marker": None})
        args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, bf16=False, save_strategy="no", max_length=32)
        trainer = ctx.attach(SFTTrainer(model=ctx.model, processing_class=ctx.tokenizer, args=args, train_dataset=data))
        assert trainer.data_collator is ctx.collator  # the plugins' wrappers around the trainer's own collator
        trainer.train()
    assert "collated" in CALLS


class FailsAfterTraining(Plugin):
    hook = "tokplug_save"

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if FailsAfterTraining.hook == "tokplug_save":
            raise OSError("disk full")

    @hookimpl
    def tokplug_post_train(self, ctx, model):
        if FailsAfterTraining.hook == "tokplug_post_train":
            raise RuntimeError("cannot detach")


@pytest.mark.parametrize("hook", ["tokplug_save", "tokplug_post_train"])
def test_a_plugin_failing_after_training_keeps_the_model_and_names_itself(tmp_path, hook):
    from transformers import AutoModelForCausalLM

    from hf_tokplug.errors import PluginError

    FailsAfterTraining.hook = hook
    with manager.registered("fails", FailsAfterTraining):
        with pytest.raises(PluginError, match=rf"plugin 'fails' failed in {hook}") as err:
            run_recipe(tmp_path, "run", plugins={"fails": None})
    rescued = tmp_path / "run" / "recovered-model"
    assert str(rescued) in str(err.value)
    assert AutoModelForCausalLM.from_pretrained(rescued) is not None  # the trained weights, loadable as they are
