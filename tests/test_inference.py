"""Generation through the inference hooks and Diffusers-pipeline chaining."""

from __future__ import annotations

import pytest

import hf_tokplug
from hf_tokplug import Plugin, hookimpl, manager, toy


class Shout(Plugin):
    @hookimpl
    def tokplug_prepare_generation(self, ctx, model, kwargs):
        return {**kwargs, "max_new_tokens": 3, "do_sample": False}

    @hookimpl
    def tokplug_postprocess_text(self, ctx, text):
        return "<" + text.upper() + ">"

    @hookimpl
    def tokplug_prepare_pipeline(self, ctx, pipeline):
        pipeline["touched"] = True


@pytest.fixture(autouse=True)
def plugin():
    with manager.registered("shout", Shout):
        yield


def test_generate_runs_hooks():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"))
    ctx = hf_tokplug.apply(model, toy.load_toy_tokenizer(), plugins={"shout": None})
    texts = hf_tokplug.generate(ctx, ["In the beginning", "And God said"], max_new_tokens=50)
    assert len(texts) == 2 and all(t.startswith("<") and t.endswith(">") and t == t.upper() for t in texts)
    plain = hf_tokplug.generate(hf_tokplug.apply(model, ctx.tokenizer), "In the beginning", max_new_tokens=3,
                                do_sample=False)
    assert texts[0] == "<" + plain[0].upper() + ">"


def test_prepare_pipeline_chain_keeps_object_when_none_returned():
    ctx = hf_tokplug.lifecycle.Run.create({"shout": None})
    pipe = {}
    assert ctx.prepare_pipeline(pipe) is pipe and pipe["touched"]
