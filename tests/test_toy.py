"""The embedded default: deterministic, cached, real architectures, bundled data."""

from __future__ import annotations

import hashlib

import pytest
from safetensors.torch import load_file

from hf_tokplug import toy
from hf_tokplug.errors import TokPlugError


def _digest(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + tensors[key].numpy().tobytes())
    return h.hexdigest()


def test_deterministic_across_cache_folders(tmp_path, monkeypatch):
    first = toy.toy_model_path("toy://llama")
    monkeypatch.setenv("HF_TOKPLUG_CACHE", str(tmp_path))
    second = toy.toy_model_path("toy://llama")
    assert first != second and _digest(first) == _digest(second)
    mtime = (second / "model.safetensors").stat().st_mtime_ns
    assert toy.toy_model_path("toy://llama") == second
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt


@pytest.mark.parametrize("name,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("gpt-neox", "GPTNeoXForCausalLM")])
def test_real_architectures(name, cls):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.resolve(f"toy://{name}"))
    assert type(model).__name__ == cls and model.config.vocab_size == len(toy.load_toy_tokenizer())


def test_tokenizer_fixture():
    tok = toy.load_toy_tokenizer()
    assert len(tok) == 2048 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    text = "In the beginning God created the heaven and the earth."
    assert tok.decode(tok(text)["input_ids"]) == text
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                                  tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert 1 in out["assistant_masks"]


def test_datasets_are_deterministic_splits():
    train, evald = toy.load_toy_dataset("toy://kjv-chat"), toy.load_toy_dataset("toy://kjv-chat", "eval")
    assert len(train) > 8 * len(evald) > 0
    assert train[0] == toy.load_toy_dataset("toy://kjv-chat")[0]
    assert set(toy.load_toy_dataset("toy://kjv-completion").column_names) == {"prompt", "completion"}
    with pytest.raises(TokPlugError, match="splits train and eval"):
        toy.load_toy_dataset("toy://kjv-text", "test")


def test_unknown_toy_model():
    with pytest.raises(TokPlugError, match="toy://llama"):
        toy.resolve("toy://gpt5")
