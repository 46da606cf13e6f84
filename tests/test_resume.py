"""A run killed with SIGKILL after a checkpoint, then resumed, ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_recipe, read_log, write_recipe

pytestmark = pytest.mark.slow

TRAIN = {"max_steps": 30, "save_steps": 10, "save_strategy": "steps", "per_device_train_batch_size": 16,
         "logging_steps": 1, "learning_rate": 2e-3}


def _tokplug(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "hf_tokplug.cli", *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    sections = {"train": TRAIN, "data": {"max_length": 128, "max_samples": 512}, "plugins": {"zloss": {"weight": 0.01}}}
    full = write_recipe(tmp_path / "full.yaml", base_recipe(tmp_path / "full", **sections))
    killed = write_recipe(tmp_path / "killed.yaml", base_recipe(tmp_path / "killed", **sections))

    proc = _tokplug("run", str(killed), wait=False)
    marker = tmp_path / "killed" / "checkpoint-10" / "tokplug.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached its first checkpoint"
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it could be killed"

    resumed = _tokplug("run", str(killed), "train.resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = _tokplug("run", str(full))
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(name):
        return {r["step"]: r["loss"] for r in read_log(tmp_path / name) if "loss" in r}

    a, b = losses("full"), losses("killed")
    assert sorted(a) == sorted(b) == list(range(1, 31))  # log lines past the checkpoint were not duplicated
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    wa, wb = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    starts = json.loads((tmp_path / "killed" / "run_info.json").read_text())["starts"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith("checkpoint-10")
    za = json.loads((tmp_path / "full" / "zloss_state.json").read_text())
    zb = json.loads((tmp_path / "killed" / "zloss_state.json").read_text())
    assert za["log_z_count"] == zb["log_z_count"]  # plugin state restored from the checkpoint, not restarted
    assert torch.isclose(torch.tensor(za["log_z_sum"]), torch.tensor(zb["log_z_sum"]), rtol=1e-4)


def test_resuming_a_finished_run_trains_no_extra_step(tmp_path):
    import torch

    from conftest import read_log, run_recipe

    train = {"save_strategy": "steps", "save_steps": 2}
    first, _ = run_recipe(tmp_path, "run", train=train)
    weights = {k: v.clone() for k, v in first.ctx.model.state_dict().items()}
    with pytest.warns(UserWarning, match="last step: nothing left to train"):
        again, _ = run_recipe(tmp_path, "run", train={**train, "resume_from_checkpoint": True}, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    state = again.ctx.model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # exactly the uninterrupted run's final weights
