"""RunContext: the plugins of one run, their configs and state, and the objects being built.

Every hook receives it as ``ctx``. Recipe runs, ``hf_tokplug.apply`` and ``hf_tokplug.from_pretrained`` all build
one; plugins meet here (``ctx.added_tokens``, ``ctx.state``) instead of importing each other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manager
from .manager import HookCaller
from .recipe import Recipe
from .tokens import AddedToken, resize_and_init, trainable_token_ids


@dataclass
class RunContext:
    """State shared by the host and the plugins during one run.

    Attributes:
        plugins: enabled plugin instances by name, in recipe order.
        hooks: dispatcher for the enabled plugins (``ctx.call(name, ...)`` adds ``ctx=self``).
        recipe: the validated recipe (``None`` for ``hf_tokplug.apply``).
        task: the task name, when known.
        base_model: what the model was loaded from (``toy://llama``, a Hub id or a folder).
        tokenizer, model, collator, trainer, pipeline: the objects being built, set as they are.
        base_tokenizer: the model's own tokenizer; differs from ``tokenizer`` when a plugin swapped it in
            ``tokplug_load_tokenizer``.
        added_tokens: tokens added by plugins, with their init strategy (see :mod:`hf_tokplug.tokens`).
        state: free per-plugin storage, ``ctx.state[plugin_name][key]``.
        state_files: files each plugin wrote in the last save (listed in tokplug.json).
        metrics: final metrics (metrics.json).
        seed: the run's seed.
    """

    plugins: dict[str, Any]
    hooks: HookCaller
    recipe: Recipe | None = None
    task: str | None = None
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

    # ------------------------------------------------------------------------------------------------ phases

    def load_tokenizer(self, base_tokenizer: Any) -> Any:
        """Record the model's own tokenizer and let a plugin swap it (``tokplug_load_tokenizer``)."""
        self.base_tokenizer = base_tokenizer
        self.tokenizer = self.call("tokplug_load_tokenizer") or base_tokenizer
        return self.tokenizer

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        self.tokenizer = tokenizer
        self.call("tokplug_prepare_tokenizer", tokenizer=tokenizer)
        return tokenizer

    def prepare_model(self, model: Any, pad_to_multiple_of: int | None = None) -> Any:
        """Adapt the embeddings to a swapped tokenizer, resize for added tokens and initialise their rows, then run
        the ``tokplug_prepare_model`` chain."""
        self.model = model
        model = self.model = self.call("tokplug_adapt_embeddings", model=model)
        resize_and_init(self, model, pad_to_multiple_of)
        self.model = self.call("tokplug_prepare_model", model=model)
        return self.model

    def adapter_config(self, peft_config: Any) -> Any:
        """Make added tokens trainable (``trainable_token_indices``) and run the ``tokplug_adapter_config`` chain."""
        ids = trainable_token_ids(self)
        if ids:
            indices = peft_config.trainable_token_indices
            if indices is None:
                peft_config.trainable_token_indices = list(ids)
            elif isinstance(indices, list):
                peft_config.trainable_token_indices = sorted(set(indices) | set(ids))
            else:
                key = next(iter(indices), "embed_tokens")
                indices[key] = sorted(set(indices.get(key, [])) | set(ids))
            head = _untied_output_module_name(self.model)
            if head is not None:
                # An untied LM head needs its new rows trained too. TRL's fused loss reads `lm_head.weight`
                # directly (it rejects tuner layers there), so the head is trained and saved in full.
                saved = list(peft_config.modules_to_save or [])
                if head not in saved:
                    peft_config.modules_to_save = [*saved, head]
        return self.call("tokplug_adapter_config", peft_config=peft_config)

    def attach_adapter(self, peft_config: Any) -> Any:
        from peft import get_peft_model

        self.model = get_peft_model(self.model, self.adapter_config(peft_config))
        return self.model

    def post_model_load(self) -> Any:
        self.call("tokplug_post_model_load", model=self.model)
        return self.model

    def prepare_dataset(self, dataset: Any, split: str) -> Any:
        return self.call("tokplug_prepare_dataset", dataset=dataset, split=split)

    def wrap_collator(self, collator: Any) -> Any:
        """Run the ``tokplug_wrap_collator`` chain over ``collator`` and return the outermost collator."""
        self.collator = self.call("tokplug_wrap_collator", collator=collator)
        return self.collator

    def callbacks(self) -> list[Any]:
        """``TokPlugCallback`` followed by the callbacks plugins add."""
        from .callback import TokPlugCallback

        return [TokPlugCallback(self), *self.call("tokplug_callbacks")]

    def attach(self, trainer: Any) -> Any:
        """Hook this context into a user-built ``Trainer``/``SFTTrainer``: loss terms, logging, plugin state.

        Wraps this trainer instance's ``compute_loss`` and ``log`` (no class is patched), adds the callbacks and
        fires ``tokplug_post_trainer_create``. Returns the trainer.
        """
        from .training import attach_loss_terms

        attach_loss_terms(trainer, self)
        for callback in self.callbacks():
            trainer.add_callback(callback)
        self.set_trainer(trainer)
        return trainer

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer
        self.call("tokplug_post_trainer_create", trainer=trainer)

    def prepare_pipeline(self, pipeline: Any) -> Any:
        self.pipeline = self.call("tokplug_prepare_pipeline", pipeline=pipeline)
        return self.pipeline

    # ------------------------------------------------------------------------------------------------ logging, state

    def log(self, name: str, value: float, split: str = "train") -> None:
        """Queue a plugin metric; it is averaged into the trainer's next log line of that split.

        ``split="eval"`` values land in the evaluation's metrics as ``eval_<name>`` (usable as
        ``metric_for_best_model: <name>``); ``"train"`` values in the next training log line.
        """
        self.pending_logs[f"{split}:{name}"].append(float(value))

    def add_state_file(self, plugin: str, filename: str) -> None:
        if filename not in self.state_files[plugin]:
            self.state_files[plugin].append(filename)

    def save_pretrained(self, output_dir: str | Path, **kwargs: Any) -> Path:
        """Write model, tokenizer, plugin state, tokplug.json and a model card into ``output_dir``."""
        from .hub import save_run

        return save_run(self, Path(output_dir), **kwargs)

    def push_to_hub(self, repo_id: str, *, folder: str | Path | None = None, private: bool = True, **kwargs: Any) -> str:
        """Save (unless ``folder`` holds a saved run already) and upload with huggingface_hub."""
        from .hub import push_folder

        folder = Path(folder) if folder is not None else self.save_pretrained(self.output_dir or f"tokplug-{repo_id.split('/')[-1]}")
        return push_folder(folder, repo_id, private=private, **kwargs)


def _infer_task(model: Any) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "causal_lm_sft" if type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


def _untied_output_module_name(model: Any) -> str | None:
    if model is None or model.get_output_embeddings() is None:
        return None
    out = model.get_output_embeddings()
    if out.weight is model.get_input_embeddings().weight:
        return None
    return next((name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is out), None)


def apply(
    model: Any,
    tokenizer: Any,
    plugins: dict[str, Any] | None = None,
    *,
    peft_config: Any = None,
    task: str | None = None,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
) -> RunContext:
    """Patch a user's model and tokenizer with plugins; use the result in any Trainer/SFTTrainer.

    Runs validate -> load_tokenizer (a plugin may swap it) -> prepare_tokenizer -> adapt_embeddings -> (resize,
    init new rows) -> prepare_model -> adapter (when ``peft_config``
    is given) -> post_model_load. Use ``ctx.model``/``ctx.tokenizer`` afterwards (a plugin may replace the model),
    ``ctx.wrap_collator(collator)`` for your collator, and ``ctx.attach(trainer)`` for loss terms and state.
    ``task`` (inferred for causal LMs) tells ``hf_tokplug.from_pretrained`` how to load the saved model.

    Example::

        ctx = hf_tokplug.apply(model, tokenizer, plugins={"my_plugin": {"weight": 0.1}}, peft_config=LoraConfig(r=8))
        trainer = ctx.attach(SFTTrainer(model=ctx.model, processing_class=ctx.tokenizer, args=..., train_dataset=...))
        trainer.train()
        ctx.save_pretrained("out")
    """
    ctx = RunContext.create(plugins or {}, seed=seed, task=task or _infer_task(model))
    ctx.base_model = getattr(getattr(model, "config", None), "_name_or_path", None)
    ctx.call("tokplug_validate")
    ctx.prepare_tokenizer(ctx.load_tokenizer(tokenizer))
    ctx.prepare_model(model, pad_to_multiple_of)
    if peft_config is not None:
        ctx.attach_adapter(peft_config)
    ctx.post_model_load()
    return ctx
