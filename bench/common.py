"""Shared by the benchmarks: a step timer callback and a plugin that adds it to recipe runs."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback

from hf_tokplug import Plugin, hookimpl


class StepTimer(TrainerCallback):
    """Wall time between optimizer steps (synchronised with the GPU when one is used)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def median(self, warmup: int = 5) -> float:
        """Median step time after ``warmup`` steps."""
        ends = self.ends[warmup:]
        return statistics.median(b - a for a, b in zip(ends, ends[1:]))


class TimerPlugin(Plugin):
    """Adds ``TimerPlugin.timer`` to a recipe run's callbacks, and nothing else (the run stays plugin-free)."""

    timer: StepTimer | None = None

    @hookimpl
    def tokplug_callbacks(self, ctx):
        return [TimerPlugin.timer] if TimerPlugin.timer is not None else []
