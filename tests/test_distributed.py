"""The same recipe under `accelerate launch` with 2 CPU processes trains with both ranks and writes outputs once.

On a machine without GPUs, `accelerate launch --num_processes 2` alone starts one process; `--multi_gpu` selects
its torchrun launcher, and the host's `use_cpu` default makes the ranks join over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_recipe, read_log, write_recipe

pytestmark = pytest.mark.slow


CASES = {
    # loss terms from plugins, computed after the DDP forward: heads (trainable) and z-loss (no own parameters)
    "zloss": {"plugins": {"zloss": {"weight": 0.1}}},
    "caft_stage_a": {"plugins": {"caft": {"stage": "heads", "num_heads": 2}}},
    "rainbow": {"task": "masked_diffusion_sft", "model": {"name_or_path": "toy://gemma-bidir"},
                "task_options": {"pad_to_length": 64}, "plugins": {"rainbow_padding": {"num_pads": 3}}, "adapter": {"r": 4}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accelerate_launch_two_cpu_processes(tmp_path, case):
    sections = {**CASES[case], "train": {"save_steps": 2, "save_strategy": "steps"}}
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "out", **sections))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_tokplug.cli", "run", str(path)]
    # An empty toy cache: both ranks need the model at once (transformers writes model files on rank 0 only).
    env = {**os.environ, "HF_TOKPLUG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    steps = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert steps[-1]["epoch"] == pytest.approx(0.5)  # 64 examples, 4 steps x 2 ranks x batch 4
    assert len(json.loads((out / "run_info.json").read_text())["starts"]) == 1
    assert (out / "checkpoint-4" / "tokplug.json").is_file()
    assert json.loads((out / "tokplug.json").read_text())["plugins"][0]["name"] == next(iter(CASES[case]["plugins"]))
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]
