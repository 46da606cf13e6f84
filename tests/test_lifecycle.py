"""Every hook fires at its documented point, in order, and the once-per-run hooks exactly once."""

from __future__ import annotations

from collections import Counter

import pytest

import hf_tokplug
from hf_tokplug import Plugin, hookimpl, manager

from conftest import run_recipe
from fake_hub import fake_hub

CALLS: list[str] = []


class Recorder(Plugin):
    @hookimpl
    def tokplug_validate(self, ctx):
        assert ctx.model is None and ctx.tokenizer is None  # before anything loads
        CALLS.append("validate")

    @hookimpl
    def tokplug_load_tokenizer(self, ctx):
        CALLS.append("load_tokenizer")

    @hookimpl
    def tokplug_prepare_tokenizer(self, ctx, tokenizer):
        assert ctx.model is None
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
        assert not hasattr(model, "peft_config")  # before the adapter
        CALLS.append("prepare_model")

    @hookimpl
    def tokplug_adapter_config(self, ctx, peft_config):
        CALLS.append("adapter_config")

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        assert model is ctx.model
        if ctx.recipe is not None and ctx.recipe.adapter is not None:
            assert hasattr(model, "peft_config")  # after the adapter
        CALLS.append("post_model_load")

    @hookimpl
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        assert {"input_ids", "labels"} <= set(dataset.column_names)
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


def test_recipe_run_fires_hooks_in_order(tmp_path):
    _, metrics = run_recipe(tmp_path, "run", plugins={"recorder": None}, adapter={"r": 4},
                            data={"eval": {"path": "toy://kjv-chat", "split": "eval"}},
                            train={"save_strategy": "steps", "save_steps": 2})
    assert metrics["recorder/answer"] == 42.0
    once = [c for c in CALLS if c != "loss_terms"]
    assert once == [
        "validate", "load_tokenizer", "prepare_tokenizer", "load_model", "adapt_embeddings", "prepare_model",
        "adapter_config",
        "post_model_load", "prepare_dataset:train", "prepare_dataset:eval", "wrap_collator", "callbacks",
        "post_trainer_create", "save", "save", "post_train", "evaluate", "save", "model_card",
    ]  # two checkpoint saves (steps 2 and 4), then the final folder
    assert Counter(CALLS)["loss_terms"] >= 4
    CALLS.clear()
    hf_tokplug.from_pretrained(tmp_path / "run")
    assert CALLS == ["restore"]


def test_context_push_to_hub(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_tokplug import toy

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://qwen2"))
    ctx = hf_tokplug.apply(model, toy.load_toy_tokenizer(), plugins={"recorder": None})
    with fake_hub(monkeypatch) as hub:
        url = ctx.push_to_hub("me/applied", folder=ctx.save_pretrained(tmp_path / "saved"))
    assert url.startswith("https://huggingface.co/me/applied/commit/")
    assert {"model.safetensors", "tokplug.json", "README.md"} <= set(hub.repos["me/applied"]["files"])
