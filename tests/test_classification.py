"""The host's sequence_classification task on toy BERT: train, evaluate, save, restore; clear data errors."""

from __future__ import annotations

import pytest
import torch

import hf_tokplug
from hf_tokplug.cli import runner_for
from hf_tokplug.errors import TokPlugError

from conftest import run_recipe

SECTIONS = {"task": "sequence_classification", "model": {"name_or_path": "toy://bert"},
            "data": {"train": "toy://kjv-books", "eval": {"path": "toy://kjv-books", "split": "eval"}, "max_samples": 64,
                     "max_length": 48}}


@pytest.mark.parametrize("adapter", [None, {"r": 4, "target_modules": ["query", "value"]}])
def test_trains_evaluates_and_restores(tmp_path, adapter):
    runner, metrics = run_recipe(tmp_path, "cls", **SECTIONS, adapter=adapter)
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["train_loss"] > 0
    restored = hf_tokplug.from_pretrained(tmp_path / "cls")
    assert restored.model.config.id2label == {0: "Genesis", 1: "Matthew", 2: "Proverbs", 3: "Ruth"}
    ids = restored.tokenizer(["And Ruth said, Intreat me not to leave thee"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(restored.model.eval()(**ids).logits, runner.ctx.model.eval()(**ids).logits)


def test_missing_label_column_is_named(tmp_path, recipe_file):
    path = recipe_file(**SECTIONS, task_options={"label_field": "book"})
    with pytest.raises(TokPlugError, match="no column 'book'"):
        runner_for(str(path), []).run()
