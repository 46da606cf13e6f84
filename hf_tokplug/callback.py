"""TokPlugCallback: per-step jsonl log, plugin state in every checkpoint, plugin state restored on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .hub import MANIFEST, check_state_files, manifest
from .rundir import LOG_FILE, write_json_atomic


def save_plugin_state(ctx: Any, folder: Path) -> None:
    """Fire ``tokplug_save`` into ``folder`` and write the manifest there (checkpoints and the final folder)."""
    for name in ctx.plugins:
        ctx.state_files[name] = []
    ctx.call("tokplug_save", output_dir=str(folder))
    check_state_files(ctx)
    write_json_atomic(folder / MANIFEST, manifest(ctx))


class TokPlugCallback(TrainerCallback):
    """Add to any ``Trainer``/TRL trainer (``ctx.attach`` does it for you).

    - ``trainer_log.jsonl`` in ``args.output_dir``: one JSON line per log event with ``step``, ``epoch``,
      ``loss``, each plugin loss term (``<plugin>/<term>``), ``lr`` and ``tokens_per_second``.
    - on every checkpoint: the plugins' ``tokplug_save`` into the checkpoint folder, plus ``tokplug.json``.
    - on resume: ``tokplug_restore`` from the checkpoint being resumed, and log lines past it are dropped.
    """

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def _log_path(self, args: Any) -> Path:
        return Path(args.output_dir) / LOG_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (checkpoint / MANIFEST).is_file():
                self.ctx.call("tokplug_restore", model_dir=str(checkpoint))
            path = self._log_path(args)
            if state.is_world_process_zero and path.is_file():
                kept = [
                    line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step
                ]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            row["lr" if key == "learning_rate" else key] = value
        path = self._log_path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            save_plugin_state(self.ctx, checkpoint)
