"""The `tokplug` command: each subcommand, and bad input giving one clear message with nothing written."""

from __future__ import annotations

import json

import pytest

from hf_tokplug.cli import main
from hf_tokplug.rundir import RunLock


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plugins_json_lists_tutorial_plugin(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["zloss"]["version"] == "0.1.0" and "tokplug_loss_terms" in rows["zloss"]["hooks"]


def test_validate_ok(capsys, recipe_file):
    code, out, _ = run_cli(capsys, "validate", str(recipe_file(plugins={"zloss": {}})), "--show")
    assert code == 0 and "ok" in out and "chunk_size: 1024" in out


def test_recipes_ls_and_cp(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "recipes", "ls")
    assert code == 0 and "quickstart" in out
    code, _, _ = run_cli(capsys, "recipes", "cp", "quickstart", str(tmp_path))
    assert code == 0 and (tmp_path / "quickstart.yaml").read_text().startswith("# tokplug run")
    code, _, err = run_cli(capsys, "recipes", "cp", "quickstart", str(tmp_path))
    assert code == 2 and "--force" in err


def test_preview_shows_labels_and_pads(capsys, recipe_file):
    code, out, _ = run_cli(capsys, "preview", str(recipe_file()), "-n", "2", "--max-tokens", "200")
    assert code == 0
    assert "masked" in out and "pad" in out and "example 1" in out


BAD_INPUTS = [
    # (overrides, expected text in the error)
    (["modle.name_or_path=x"], "unknown key"),
    (["train.max_steps=[1"], "max_steps"),
    (["adapter.r=many"], "adapter.r"),
    (["plugins.nope={}"], "unknown plugin 'nope'"),
    (["plugins.zloss.weight=-1"], "plugins.zloss"),
    (["data.train.path=json", "data.train.data_files=missing.jsonl"], "data file not found: missing.jsonl"),
    (["train.max_stepz=3"], "did you mean 'max_steps'"),
    (["task=no_such_task"], "unknown task 'no_such_task'"),
    (["model.name_or_path=toy://nope"], "unknown embedded model"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS)
def test_bad_input_clear_error_nothing_written(capsys, recipe_file, tmp_path, overrides, expected):
    path = recipe_file()
    code, out, err = run_cli(capsys, "run", str(path), *overrides)
    assert code == 2
    assert expected in err and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_traceback(recipe_file):
    from hf_tokplug.errors import RecipeError

    with pytest.raises(RecipeError):
        main(["--debug", "run", str(recipe_file()), "modle.x=1"])


def test_task_model_mismatch(capsys, recipe_file, tmp_path):
    from transformers import ViTConfig

    vision = tmp_path / "vision"  # a config only: the check must fail before any weights are looked for
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vision)
    code, _, err = run_cli(capsys, "run", str(recipe_file()), f"model.name_or_path={vision}")
    assert code == 2 and "'vit' model" in err and "AutoModelForCausalLM" in err


def test_output_folder_locked_by_running_run(capsys, recipe_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        code, _, err = run_cli(capsys, "run", str(recipe_file()))
    finally:
        lock.release()
    assert code == 2 and "in use by a running run" in err
    assert [p.name for p in out.iterdir()] == [".tokplug.lock"]


def test_non_empty_output_needs_overwrite(capsys, recipe_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "run", str(recipe_file()))
    assert code == 2 and "not empty" in err and "not written by tokplug" in err  # overwrite would not help
    code, _, err = run_cli(capsys, "run", str(recipe_file()), "overwrite=true")
    assert code == 2 and "not written by tokplug" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the failed runs left nothing behind
    assert (out / "keep.txt").read_text() == "mine"


def test_prepare_task_evaluates_and_saves_without_training(capsys, recipe_file, tmp_path):
    code, out, err = run_cli(capsys, "run", str(recipe_file(task="causal_lm_prepare", plugins={"zloss": {"weight": 0.1}})),
                             "data.eval={path: toy://kjv-chat, split: eval}", "data.max_samples=8")
    assert code == 0, err
    run_dir = tmp_path / "out"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_zloss/z" in metrics and "train_loss" not in metrics
    assert (run_dir / "model.safetensors").is_file() and json.loads((run_dir / "tokplug.json").read_text())["task"] == "causal_lm_prepare"
