"""Artifacts: the run folder's files, the model card metadata, push and restore through the Hub API.

The Hub's network is replaced by tests/fake_hub.py (transport only; huggingface_hub's client code is real).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import hf_tokplug
from hf_tokplug.cli import main

from conftest import base_recipe, read_log, run_recipe, write_recipe
from fake_hub import fake_hub


def test_run_folder_contents(tmp_path):
    run_recipe(tmp_path, "run", plugins={"zloss": {"weight": 0.1}}, adapter={"r": 4})
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokplug.json", "recipe.resolved.yaml",
            "metrics.json", "trainer_log.jsonl", "README.md", "run_info.json"} <= names
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]
    manifest = json.loads((out / "tokplug.json").read_text())
    assert manifest["task"] == "causal_lm_sft" and manifest["base_model"] == "toy://llama" and manifest["adapter"]
    assert manifest["plugins"][0] == {"name": "zloss", "version": "0.1.0", "config": {"weight": 0.1, "chunk_size": 1024},
                                      "state_files": ["zloss_state.json"]}
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "hf-tokplug" in meta["tags"] and "tokplug-zloss" in meta["tags"]
    assert "## z-loss" in card and "@article{chowdhery2022palm" in card and "## Recipe" in card
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["plugins"]["zloss"] == {"weight": 0.1, "chunk_size": 1024}
    info = json.loads((out / "run_info.json").read_text())
    assert info["starts"][0]["seed"] == 0 and info["starts"][0]["versions"]["transformers"]
    row = [r for r in read_log(out) if "loss" in r][-1]
    assert {"step", "loss", "lr", "zloss/z"} <= set(row) and row["tokens_per_second"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] > 0


def test_plain_transformers_loads_full_finetune(tmp_path):
    from transformers import AutoModelForCausalLM

    runner, _ = run_recipe(tmp_path, "full")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    ids = torch.tensor([[4, 433, 270]])
    torch.testing.assert_close(model(ids).logits, runner.ctx.model.eval()(ids).logits)


def test_push_and_restore_from_repo_id(tmp_path, monkeypatch, capsys):
    run_recipe(tmp_path, "run", plugins={"zloss": {"weight": 0.1}})
    with fake_hub(monkeypatch) as hub:
        assert main(["push", str(tmp_path / "run"), "--repo-id", "me/tiny"]) == 0
        files = hub.repos["me/tiny"]["files"]
        assert hub.repos["me/tiny"]["private"] is True
        assert "model.safetensors" in files and "tokplug.json" in files and "README.md" in files
        assert not [f for f in files if f.startswith("checkpoint-") or f.endswith(".lock") or f == "run_info.json"]
        ctx = hf_tokplug.from_pretrained("me/tiny")
    assert ctx.plugins["zloss"].log_z_count > 0 and ctx.task == "causal_lm_sft"
    assert "pushed" in capsys.readouterr().out


def test_recipe_hub_repo_id_pushes_at_end(tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "out", hub={"repo_id": "me/auto", "private": False}))
    with fake_hub(monkeypatch) as hub:
        assert main(["run", str(path)]) == 0
    assert hub.repos["me/auto"]["private"] is False and "tokplug.json" in hub.repos["me/auto"]["files"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train_loss"] > 0


SECRET = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmNoPqR"


def test_credentials_never_reach_written_files(tmp_path):
    from hf_tokplug.rundir import redact_argv

    from conftest import run_recipe

    run_recipe(tmp_path, "run", model={"name_or_path": "toy://llama", "kwargs": {"token": SECRET}},
               train={"hub_token": SECRET})
    for name in ("recipe.resolved.yaml", "README.md", "run_info.json", "tokplug.json"):
        text = (tmp_path / "run" / name).read_text()
        assert SECRET not in text, name
    assert "token: '***'" in (tmp_path / "run" / "recipe.resolved.yaml").read_text()
    assert redact_argv(["run", "r.yaml", f"train.hub_token={SECRET}", f"x={SECRET}", "data.max_length=5"]) == [
        "run", "r.yaml", "train.hub_token=***", "x=hf_***", "data.max_length=5"]


def test_push_refuses_a_folder_that_holds_a_token(tmp_path):
    from hf_tokplug.errors import TokPlugError
    from hf_tokplug.hub import push_folder

    from conftest import run_recipe

    run_recipe(tmp_path, "run")
    (tmp_path / "run" / "notes.txt").write_text(f"my token is {SECRET}\n")
    with pytest.raises(TokPlugError, match="looks like a Hugging Face token"):
        push_folder(tmp_path / "run", "me/run")
