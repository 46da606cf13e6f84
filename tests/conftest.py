"""Shared fixtures. Everything runs real transformers / PEFT / TRL objects on the embedded toy models.

The toy-model cache lives in a per-session temporary folder, so tests never depend on (or write to) the user's
~/.cache. Plugin auto-loading from entry points stays on: the conformance suite tests installed plugins, and
tests that need a controlled set register plugins inline and unregister them in `finally`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_TOKPLUG_CACHE", tempfile.mkdtemp(prefix="tokplug-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


def base_recipe(output_dir: Path, **sections: Any) -> dict[str, Any]:
    """A fast causal_lm_sft recipe on toy://llama: 4 steps of batch 4, no checkpoints."""
    recipe: dict[str, Any] = {
        "task": "causal_lm_sft",
        "model": {"name_or_path": "toy://llama"},
        "data": {"train": "toy://kjv-chat", "max_samples": 64, "max_length": 64, "assistant_only_loss": True},
        "plugins": {},
        "train": {
            "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
            "save_strategy": "no", "gradient_checkpointing": False, "seed": 0, "disable_tqdm": True,
        },
        "output_dir": str(output_dir),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_recipe(tmp_path: Path, name: str = "run", **sections: Any):
    """Run a recipe in-process; returns (runner, metrics)."""
    from hf_tokplug.cli import runner_for

    out = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", base_recipe(out, **sections))
    runner = runner_for(str(path), [])
    metrics = runner.run()
    return runner, metrics


def assert_run_refused(tmp_path: Path, capsys: Any, expected: str, **sections: Any) -> str:
    """``tokplug run`` of a base recipe with ``sections`` exits 2 naming ``expected``, without a traceback, and
    writes nothing; returns stderr."""
    from hf_tokplug.cli import main

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(out, **sections))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not out.exists()
    return err


def token_log_probs(logits: Any, targets: Any) -> Any:
    """log p(targets) per output position from logits, 0 where not scored (-100): computed plainly, to check the
    host's scorers and the plugins built on them against."""
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked.masked_fill(targets == -100, 0.0)


def model_token_log_probs(model: Any, batch: Any) -> Any:
    """:func:`token_log_probs` of ``model``'s plain forward over a TokenBatch's rows (no gradient)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_log_probs(logits, batch.targets)


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def recipe_file(tmp_path):
    def make(**sections: Any) -> Path:
        return write_recipe(tmp_path / "recipe.yaml", base_recipe(tmp_path / "out", **sections))

    return make
