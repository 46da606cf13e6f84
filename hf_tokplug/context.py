"""RunContext: what every hook receives as ``ctx``: the plugins of one run, their configs and state, the task's
traits and the objects being built.

Recipe runs, ``hf_tokplug.apply`` and ``hf_tokplug.from_pretrained`` each build one (a
:class:`hf_tokplug.lifecycle.Run`, which adds the own-trainer steps ``attach``, ``wrap_collator``,
``save_pretrained``...); plugins meet here (``ctx.added_tokens``, ``ctx.state``) instead of importing each other.
This class fires no hook itself beyond :meth:`RunContext.call`: the run order lives in :mod:`hf_tokplug.lifecycle`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manager
from .manager import HookCaller
from .recipe import Recipe
from .tokens import AddedToken
from .traits import TaskTraits


@dataclass
class RunContext:
    """State shared by the host and the plugins during one run.

    Attributes:
        plugins: enabled plugin instances by name, in recipe order.
        hooks: dispatcher for the enabled plugins (``ctx.call(name, ...)`` adds ``ctx=self``).
        recipe: the validated recipe; ``None`` under ``hf_tokplug.apply`` and ``hf_tokplug.from_pretrained``
            (read options from your own config, not from the recipe, when it is ``None``).
        task: the task name, when known (for messages; check ``traits``, never the name).
        traits: what the task declares it is (:class:`hf_tokplug.traits.TaskTraits`), set before
            ``tokplug_validate``; ``None`` only when ``apply`` could not tell the kind of model.
        base_model: what the model was loaded from (``toy://llama``, a Hub id or a folder).
        tokenizer, model, collator, trainer, pipeline: the objects being built, set as they are.
        base_tokenizer: the model's own tokenizer; differs from ``tokenizer`` when a plugin swapped it in
            ``tokplug_load_tokenizer``.
        added_tokens: tokens added by plugins, with their init strategy (see :mod:`hf_tokplug.tokens`).
        state: free per-plugin storage, ``ctx.state[plugin_name][key]`` (the host keeps its own bookkeeping in
            ``host``, never here).
        state_files: files each plugin wrote in the last save (listed in tokplug.json).
        metrics: final metrics (metrics.json).
        seed: the run's seed.
    """

    plugins: dict[str, Any]
    hooks: HookCaller
    recipe: Recipe | None = None
    task: str | None = None
    traits: TaskTraits | None = None
    base_model: str | None = None
    tokenizer: Any = None
    base_tokenizer: Any = None
    model: Any = None
    collator: Any = None
    trainer: Any = None
    pipeline: Any = None
    output_dir: Path | None = None
    added_tokens: list[AddedToken] = field(default_factory=list)
    state: dict[str, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))
    state_files: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    metrics: dict[str, float] = field(default_factory=dict)
    seed: int = 42
    pending_logs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    host: dict[str, Any] = field(default_factory=dict)  # the host's per-run bookkeeping (tokens/s, queued terms)

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def create(cls, plugins: dict[str, Any] | list[tuple[str, Any]], *, where: str | None = None, **kwargs: Any) -> RunContext:
        """Instantiate and validate the named plugins (``{name: config dict}``, in order) and build a context."""
        items = plugins.items() if isinstance(plugins, dict) else plugins
        instances = {
            name: manager.instantiate(name, raw, where=f"{where}: plugins.{name}" if where else f"plugins.{name}")
            for name, raw in items
        }
        hooks = HookCaller(manager.build_run_manager(list(instances.values())))
        return cls(plugins=instances, hooks=hooks, **kwargs)

    @property
    def token_inits(self) -> dict[str, Any]:
        return manager.registries().token_inits

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call a hook on the enabled plugins with this context (``ctx=self`` is added)."""
        return self.hooks(hook, ctx=self, **kwargs)

    def plugin_configs(self) -> dict[str, dict[str, Any]]:
        return {name: p.config_dict() if hasattr(p, "config_dict") else {} for name, p in self.plugins.items()}

    # ------------------------------------------------------------------------------------------------ logging, state

    def log(self, plugin: str, name: str, value: float, split: str = "train") -> None:
        """Queue a plugin metric as ``<plugin>/<name>``; it is averaged into the trainer's next log line of ``split``.

        Namespaced like loss terms and metrics, so two plugins never overwrite each other (a plugin passes its
        instance name, ``self.name``; :meth:`hf_tokplug.Plugin.log` does it for you). ``split="eval"`` values land
        in the evaluation's metrics as ``eval_<plugin>/<name>`` (usable as ``metric_for_best_model:
        <plugin>/<name>``); ``"train"`` values in the next training log line. From ``tokplug_loss_terms`` pass
        ``"train" if model.training else "eval"``.
        """
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.pending_logs[f"{split}:{plugin}/{name}"].append(float(value))

    def add_state_file(self, plugin: str, filename: str) -> None:
        """Record a file ``plugin`` wrote in ``tokplug_save``, so the manifest lists it."""
        if filename not in self.state_files[plugin]:
            self.state_files[plugin].append(filename)
