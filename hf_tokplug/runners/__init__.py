"""Tasks. The host's own are registered by :mod:`hf_tokplug.builtins`; plugins add theirs with
``tokplug_register_runners``. Look them up with ``hf_tokplug.manager.registries().runners``."""

from .base import Runner

__all__ = ["Runner"]
