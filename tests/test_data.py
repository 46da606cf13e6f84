"""The host's tokenization equals TRL's own SFT preparation, format by format (so plugins see what TRL would train on)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_tokplug import toy
from hf_tokplug.data import tokenize_dataset
from hf_tokplug.errors import RecipeError
from hf_tokplug.recipe import DataSpec

CONVERSATIONAL_PC = [
    {"prompt": [{"role": "user", "content": "Say yes"}], "completion": [{"role": "assistant", "content": "yes"}]},
    {"prompt": [{"role": "user", "content": "Count"}], "completion": [{"role": "assistant", "content": "one two"}]},
]


def _trl_prepared(dataset, **config):
    from trl import SFTConfig, SFTTrainer

    from hf_tokplug.toy import resolve
    from transformers import AutoModelForCausalLM

    args = SFTConfig(output_dir="/tmp/unused", bf16=False, use_cpu=True, report_to="none", shuffle_dataset=False, **config)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(resolve("toy://llama")), args=args,
                         train_dataset=dataset, processing_class=toy.load_toy_tokenizer())
    return trainer.train_dataset


@pytest.mark.parametrize("name,spec,trl_config,masked", [
    ("toy://kjv-chat", {"assistant_only_loss": True}, {"assistant_only_loss": True}, True),
    ("toy://kjv-chat", {}, {}, False),  # TRL's default: the whole conversation is trained
    ("toy://kjv-completion", {}, {}, True),  # completion-only by default
    ("toy://kjv-completion", {"completion_only_loss": False}, {"completion_only_loss": False}, False),
    ("toy://kjv-text", {}, {}, False),
    ("conversational-prompt-completion", {}, {}, True),
])
def test_matches_trl_preparation(name, spec, trl_config, masked):
    raw = Dataset.from_list(CONVERSATIONAL_PC) if name.startswith("conv") else toy.load_toy_dataset(name).select(range(24))
    ours = tokenize_dataset(raw, toy.load_toy_tokenizer(), DataSpec(max_length=48, **spec))
    theirs = _trl_prepared(raw, max_length=48, **trl_config)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    assert any(-100 in row for row in ours["labels"]) == masked


def test_unknown_format_is_a_clear_error():
    with pytest.raises(RecipeError, match="cannot tell the data format"):
        tokenize_dataset(Dataset.from_list([{"body": "x"}]), toy.load_toy_tokenizer(), DataSpec())


def test_template_without_generation_markers():
    tok = toy.load_toy_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(RecipeError, match="marks no assistant tokens"):
        tokenize_dataset(toy.load_toy_dataset("toy://kjv-chat").select(range(2)), tok, DataSpec(assistant_only_loss=True))


def test_a_bare_data_file_loads_with_its_builder(tmp_path, recipe_file):
    import json

    from conftest import read_log
    from hf_tokplug.cli import runner_for

    path = tmp_path / "chat.jsonl"
    rows = toy.load_toy_dataset("toy://kjv-chat", "train").select(range(16))
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    assert DataSpec(train=str(path)).train.model_dump(include={"path", "data_files"}) == {"path": "json",
                                                                                          "data_files": str(path)}
    assert DataSpec(train={"path": "x.csv", "split": "train"}).train.path == "csv"
    runner = runner_for(str(recipe_file(data={"train": str(path), "max_samples": 16})), [])
    runner.run()
    assert [r for r in read_log(tmp_path / "out") if "loss" in r]
