"""``tokplug`` with a ``killer`` plugin that SIGKILLs its own process at a chosen moment (tests/test_reliability.py).

    TOKPLUG_KILL_AT=step:3 | checkpoint:4 | after-checkpoint:4 | final-eval | final-save  python tests/kill_run.py run R

``checkpoint:N`` dies while checkpoint-N is being written (the model is in it, the plugins' state and manifest are
not); ``after-checkpoint:N`` right after checkpoint-N is complete; ``final-eval`` in the final evaluation;
``final-save`` half-way through the final save (model files staged, nothing moved). Unset, it does nothing, so the
uninterrupted reference run and the resumed run use the same recipe.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from hf_tokplug import Plugin, hookimpl
from hf_tokplug.cli import main
from hf_tokplug.manager import register_plugin

WHEN = os.environ.get("TOKPLUG_KILL_AT", "")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Callback(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if WHEN == f"step:{state.global_step}":
            die()

    def on_save(self, args, state, control, **kwargs):  # runs after the host's callback completed the checkpoint
        if WHEN == f"after-checkpoint:{state.global_step}":
            die()


class Killer(Plugin):
    @hookimpl
    def tokplug_callbacks(self, ctx):
        return [_Callback()]

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        name = Path(output_dir).name
        if WHEN == f"checkpoint:{name.removeprefix('checkpoint-')}" or (WHEN == "final-save" and name.startswith(".saving-")):
            die()

    @hookimpl
    def tokplug_evaluate(self, ctx):
        if WHEN == "final-eval":
            die()
        return {}


if __name__ == "__main__":
    register_plugin("killer", Killer)
    sys.exit(main(sys.argv[1:]))
