"""hf_tokplug: token-level methods as pluggy plugins for Transformers, PEFT, TRL and Diffusers.

Three ways in:

- recipes: ``tokplug run recipes/quickstart.yaml train.max_steps=50``
- your own trainer: ``ctx = hf_tokplug.apply(model, tokenizer, plugins={...})`` then ``ctx.attach(trainer)``
- Hub artifacts: ``ctx.save_pretrained(dir)`` / ``tokplug push`` and ``hf_tokplug.from_pretrained(dir_or_repo)``

Plugin authors: everything a plugin needs is in :mod:`hf_tokplug.plugin` (re-exported here).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import PluginError, RecipeError, RunDirError, TokPlugError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .plugin import _LAZY as _PLUGIN_SURFACE  # noqa: E402
from .plugin import MODEL_KINDS, Plugin, PluginConfig, TaskTraits  # noqa: E402

_LAZY = {
    **{name: f"plugin:{name}" for name in _PLUGIN_SURFACE},
    "apply": "lifecycle:apply",
    "from_pretrained": "lifecycle:from_pretrained",
    "TokPlugCallback": "callback:TokPlugCallback",
    "trainer_class": "training:trainer_class",
    "generate": "inference:generate",
    "diffusion_generate": "inference:diffusion_generate",
    "load_recipe": "recipe:load_recipe",
    "register_plugin": "manager:register_plugin",
    "unregister_plugin": "manager:unregister_plugin",
}


def __getattr__(name: str) -> Any:  # heavy modules (torch, transformers) load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'hf_tokplug' has no attribute {name!r}")


__all__ = [
    "MODEL_KINDS", "Plugin", "PluginConfig", "PluginError", "RecipeError", "RunDirError", "TaskTraits", "TokPlugError",
    "__version__", "hookimpl", *_LAZY,
]
