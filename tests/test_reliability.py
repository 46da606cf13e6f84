"""Nothing lost: kills at every moment of a run's end resume exactly; the run folder rules (rollback, overwrite,
staging leftovers, checkpoint rotation); broken installed plugins are isolated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, base_recipe, read_log, run_recipe, write_recipe
from hf_tokplug.cli import main

# ------------------------------------------------------------------------------------------------ kills

KILL_TRAIN = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1,
              "per_device_train_batch_size": 4, "learning_rate": 2e-3}
MOMENTS = {
    "before-last-checkpoint": ("step:3", {}),
    "during-last-checkpoint": ("checkpoint:4", {}),
    "after-last-checkpoint": ("after-checkpoint:4", {}),
    "during-final-eval": ("final-eval", {}),
    "during-final-save": ("final-save", {}),
    "during-last-checkpoint-save-total-limit": ("checkpoint:4", {"save_total_limit": 1}),
}


def _spawn(recipe: Path, *overrides: str, kill_at: str = "") -> subprocess.Popen:
    env = {**os.environ, "TOKPLUG_KILL_AT": kill_at, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_run.py"), "run", str(recipe), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _recipe(tmp: Path, name: str, **train) -> Path:
    recipe = base_recipe(tmp / name, plugins={"killer": {}, "zloss": {"weight": 1e-3}}, data={"eval_size": 8},
                         train={**KILL_TRAIN, **train})
    return write_recipe(tmp / f"{name}.yaml", recipe)


@pytest.mark.slow
def test_kill_at_each_moment_then_resume_matches_the_uninterrupted_run(tmp_path):
    reference = _spawn(_recipe(tmp_path, "reference"))
    killed = {name: _spawn(_recipe(tmp_path, name, **extra), kill_at=when) for name, (when, extra) in MOMENTS.items()}
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    for name, proc in killed.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == -9, f"{name} was not killed ({proc.returncode}): {text[-2000:]}"
        assert not (tmp_path / name / "metrics.json").exists()
    resumed = {name: _spawn(tmp_path / f"{name}.yaml", "train.resume_from_checkpoint=true") for name in MOMENTS}
    ref_weights = load_file(str(tmp_path / "reference" / "model.safetensors"))
    ref_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    ref_losses = [r["loss"] for r in read_log(tmp_path / "reference") if "loss" in r]
    for name, proc in resumed.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {text[-3000:]}"
        run = tmp_path / name
        weights = load_file(str(run / "model.safetensors"))
        diff = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        assert diff <= 1e-6, f"{name}: final weights differ by {diff}"
        assert [r["loss"] for r in read_log(run) if "loss" in r] == pytest.approx(ref_losses, abs=1e-6), name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], abs=1e-5), name  # the whole run's
        assert metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], abs=1e-6), name
        assert metrics["eval_num_tokens"] == ref_metrics["eval_num_tokens"], name  # TRL's token count: the whole run
        assert not list(run.glob(".saving-*")), f"{name}: staging leftovers were not cleaned"
        assert json.loads((run / "zloss_state.json").read_text())["log_z_count"] == \
            json.loads((tmp_path / "reference" / "zloss_state.json").read_text())["log_z_count"], name
    kept = sorted(p.name for p in (tmp_path / "during-last-checkpoint-save-total-limit").glob("checkpoint-*"))
    assert kept == ["checkpoint-4"], kept  # resumed from checkpoint-2 (kept: the new one was never complete)


# ------------------------------------------------------------------------------------------------ run folder


def test_failed_run_before_training_leaves_nothing_and_does_not_block_the_rerun(capsys, tmp_path, monkeypatch):
    from hf_tokplug.task import Runner

    def broken(self, ctx):
        raise OSError("the disk is full")

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(out))
    monkeypatch.setattr(Runner, "load_tokenizer", broken)  # a failure after the run folder was opened
    with pytest.raises(OSError):
        main(["run", str(recipe)])
    assert not out.exists()  # rolled back: no lock, no resolved recipe, no run_info
    monkeypatch.undo()
    assert main(["run", str(recipe)]) == 0
    assert (out / "tokplug.json").is_file()


def test_a_runs_resolved_recipe_reproduces_it_into_another_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_recipe(tmp_path, "run", plugins={"zloss": {"weight": 1e-3}})
    resolved = tmp_path / "run" / "recipe.resolved.yaml"
    first_line = resolved.read_text().splitlines()[0]
    assert first_line == f"# reproduce: tokplug run {resolved} output_dir={tmp_path / 'run'}-repro"
    assert main(["run", str(resolved), f"output_dir={tmp_path / 'run'}-repro"]) == 0, capsys.readouterr().err
    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "run-repro" / "model.safetensors"))
    assert all((a[k] - b[k]).abs().max().item() == 0 for k in a)


def test_leftovers_of_a_killed_early_run_are_cleared(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.resolved.yaml").write_text("task: causal_lm_sft\n")
    (out / "run_info.json").write_text(json.dumps({"starts": [{}]}))
    (out / ".tokplug.lock").write_text("")
    with pytest.warns(UserWarning, match="cleared the leftovers"):
        run_recipe(tmp_path, "run")
    assert (out / "tokplug.json").is_file()


def test_overwrite_deletes_only_what_runs_wrote(tmp_path):
    out = tmp_path / "run"
    run_recipe(tmp_path, "run", train={"save_strategy": "steps", "save_steps": 2})
    (out / "my_notes.md").write_text("keep me")
    (out / ".saving-dead").mkdir()  # a staging folder left by a killed save
    written = set(json.loads((out / "run_info.json").read_text())["written"])
    assert {"model.safetensors", "tokplug.json", "README.md", "metrics.json"} <= written
    with pytest.warns(UserWarning, match="kept 1 file"):
        run_recipe(tmp_path, "run", overwrite=True, train={"max_steps": 2})
    assert (out / "my_notes.md").read_text() == "keep me"
    assert not (out / ".saving-dead").exists() and not (out / "checkpoint-4").exists()
    assert len(json.loads((out / "run_info.json").read_text())["starts"]) == 1  # a fresh record


def test_resuming_a_finished_run_cleans_staging_and_says_it_is_finished(tmp_path):
    train = {"save_strategy": "steps", "save_steps": 4}
    run_recipe(tmp_path, "run", train=train)
    (tmp_path / "run" / ".saving-x1").mkdir()
    with pytest.warns(UserWarning, match="nothing left to train"):
        _, metrics = run_recipe(tmp_path, "run", train={**train, "resume_from_checkpoint": True})
    assert metrics["resumed_finished_run"] == 1 and metrics["train_loss"] > 0
    assert not (tmp_path / "run" / ".saving-x1").exists()


def test_save_total_limit_is_applied_after_the_checkpoint_is_complete(tmp_path):
    runner, _ = run_recipe(tmp_path, "run", train={"save_strategy": "steps", "save_steps": 1, "save_total_limit": 2})
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert all((tmp_path / "run" / n / "tokplug.json").is_file() for n in names)
    assert runner.ctx.trainer.args.save_total_limit is None  # taken over by the host's callback


def test_a_torn_log_line_does_not_break_resume(tmp_path):
    train = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    run_recipe(tmp_path, "run", train=train)
    log = tmp_path / "run" / "trainer_log.jsonl"
    lines = log.read_text().splitlines()[:2]
    log.write_text("\n".join(lines) + '\n{"step": 3, "lo')  # killed mid-write
    for name in ("model.safetensors", "tokplug.json"):
        (tmp_path / "run" / name).unlink()
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    run_recipe(tmp_path, "run", train={**train, "resume_from_checkpoint": True})
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ plugins


def _fake_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hf_tokplug]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


def test_a_broken_installed_plugin_is_skipped_with_a_warning(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "broken_pkg", {"broken": "broken_mod:Plugin", "invalid": "invalid_mod:Bad"},
                       {"broken_mod": "raise RuntimeError('cannot import me')\n",
                        "invalid_mod": "from hf_tokplug import Plugin, hookimpl\n"
                                       "class Bad(Plugin):\n    @hookimpl\n    def tokplug_no_such_hook(self):\n        pass\n"})
    _fake_distribution(site, "twin_a", {"twin": "twin_mod:Plugin"}, {"twin_mod": "from hf_tokplug import Plugin\n"})
    _fake_distribution(site, "twin_b", {"twin": "twin_mod:Plugin"}, {})
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "out"))

    def tokplug(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_tokplug.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    listed = tokplug("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert "cannot import me" in rows["broken"]["error"] and rows["zloss"]["error"] is None
    assert "tokplug_no_such_hook" in rows["invalid"]["error"] and "two packages" in rows["twin"]["error"]
    assert "'broken' = 'broken_mod:Plugin' (package broken_pkg)" in listed.stderr  # the warning names both
    ok = tokplug("validate", str(recipe))
    assert ok.returncode == 0, ok.stderr  # runs that do not enable it are not affected
    bad = tokplug("validate", str(recipe), "plugins.broken={}")
    assert bad.returncode == 2 and "plugin 'broken'" in bad.stderr and "broken_pkg" in bad.stderr
    assert "Traceback" not in bad.stderr
