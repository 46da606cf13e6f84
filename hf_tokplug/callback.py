"""TokPlugCallback: per-step jsonl log, plugin state in every checkpoint, plugin state restored on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .hub import MANIFEST, check_state_files, manifest
from .rundir import LOG_FILE, write_json_atomic, write_text_atomic

PROGRESS = "tokplug_progress.json"  # in each checkpoint: the run's loss sum and token count up to that step


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
    - on every checkpoint: the plugins' ``tokplug_save`` into the checkpoint folder, the run's progress (loss sum,
      tokens seen) and ``tokplug.json`` last (a checkpoint without it is incomplete); then checkpoint rotation
      (``save_total_limit``, which the host takes over from Trainer so that older checkpoints are deleted only
      once the new one is complete).
    - on resume: ``tokplug_restore`` from the checkpoint being resumed, the token count carried on, and log lines
      past it dropped (a torn last line, from a kill mid-write, too).
    """

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.save_total_limit: int | None = None  # set by take_rotation()
        self.prior: dict[str, Any] | None = None  # the resumed checkpoint's progress

    def take_rotation(self, args: Any) -> None:
        """Rotate checkpoints here, after the new one is complete, instead of inside Trainer's save (which deletes
        the old ones before the plugins' state and the manifest are in the new one)."""
        if getattr(args, "save_total_limit", None):
            self.save_total_limit = args.save_total_limit
            args.save_total_limit = None

    def _log_path(self, args: Any) -> Path:
        return Path(args.output_dir) / LOG_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (checkpoint / MANIFEST).is_file():
                self.ctx.call("tokplug_restore", model_dir=str(checkpoint))
            self.prior = read_progress(checkpoint)
            trainer = getattr(self.ctx, "trainer", None)
            if self.prior and trainer is not None and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = self.prior.get("tokens", 0)  # TRL's num_tokens: the whole run's
            path = self._log_path(args)
            if state.is_world_process_zero and path.is_file():
                kept = [row for row in (_parse(line) for line in path.read_text(encoding="utf-8").splitlines())
                        if row is not None and row.get("step", 0) <= state.global_step]
                write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))

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
            write_json_atomic(checkpoint / PROGRESS, self.progress(state))
            save_plugin_state(self.ctx, checkpoint)
            if self.save_total_limit:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=args.output_dir, save_total_limit=self.save_total_limit,
                                   best_model_checkpoint=state.best_model_checkpoint)

    def progress(self, state: Any) -> dict[str, Any]:
        """The run's training-loss sum and token count up to ``state.global_step`` (this session's part from the
        trainer, plus the resumed checkpoint's)."""
        trainer = getattr(self.ctx, "trainer", None)
        prior = self.prior or {"loss_sum": 0.0, "step": 0}
        session = 0.0
        if trainer is not None and hasattr(trainer, "_total_loss_scalar"):
            pending = getattr(trainer, "_tr_loss", 0.0)
            session = float(trainer._total_loss_scalar) + float(pending.item() if hasattr(pending, "item") else pending)
        out = {"step": state.global_step, "loss_sum": prior["loss_sum"] + session,
               "num_input_tokens_seen": getattr(state, "num_input_tokens_seen", 0)}
        if trainer is not None and hasattr(trainer, "_total_train_tokens"):
            out["tokens"] = int(trainer._total_train_tokens)
        return out


def read_progress(checkpoint: Path) -> dict[str, Any] | None:
    path = Path(checkpoint) / PROGRESS
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None


def _parse(line: str) -> dict[str, Any] | None:
    """One trainer_log.jsonl row; ``None`` for a blank or torn line (a kill mid-write)."""
    try:
        row = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
