"""Runner: the base class of a task. A task declares its traits and supplies the parts of a run;
:mod:`hf_tokplug.lifecycle` fires every hook, in the documented order, around them. Register a task with
``tokplug_register_runners`` (the built-in ones live in :mod:`hf_tokplug.runners`).

Parts (each has a working default for a transformers model; override what your task needs):

    check(offline)                      task checks before anything loads (model/task fit, data, trainer args)
    read_data(ctx) -> {split: raw}      raw splits, before the tokenizer (bad data fails before weights load)
    load_tokenizer(ctx)                 the model's own tokenizer
    configure_tokenizer(ctx, tok)       the task's own tokens / settings, before tokplug_prepare_tokenizer
    load_model(ctx)                     the model (unless a plugin's tokplug_load_model returned one)
    peft_config(ctx) / attach_adapter   the adapter config (None: no adapter) and how it is attached
    configure_model(ctx)                after tokplug_post_model_load (e.g. the pad id in the model config)
    examples(ctx, raw) -> {split: ds}   the examples the trainer sees (tokplug_prepare_dataset follows)
    base_collator(ctx)                  the collator (tokplug_wrap_collator wraps it)
    make_trainer(ctx, train, eval, collator, callbacks)   the trainer (traits.trainer)
    train(ctx, data)                    the task's own loop (traits.trains without a trainer)
    finish(ctx, trainer, data)          after training: evaluation, samples; may set what is saved
                                        (``ctx.model`` / ``ctx.tokenizer``)
    load_pretrained(ctx, folder, manifest)   hf_tokplug.from_pretrained: model and tokenizer from a saved folder
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar

from . import lifecycle, manager, toy
from .errors import PluginError, RecipeError
from .lifecycle import Run, has_accelerator, jsonable
from .recipe import Recipe, dump_resolved
from .traits import TaskTraits

__all__ = ["Runner", "jsonable"]


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: the run would not reach the Hub either, so what is not cached is an error."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class _RawConfig:
    """config.json's fields as attributes (remote-code models, read without running their code)."""

    def __init__(self, raw: dict[str, Any]):
        self.__dict__.update(raw)
        self.model_type = raw.get("model_type")
        self.auto_map = raw.get("auto_map")

    def get_text_config(self) -> Any:
        return self


class Runner:
    """Base class for tasks registered with ``tokplug_register_runners``.

    Class attributes:
        task: the recipe's ``task`` value.
        description: one line for ``tokplug recipes ls`` / docs.
        needs_data: whether ``data.train`` is required.
        auto_class: the transformers Auto class name that loads the model.
        model_mapping: name of the transformers mapping (in ``transformers.models.auto.modeling_auto``) whose model
            types fit this task; ``None`` skips the check.
        options_class: pydantic model of the recipe's ``task_options`` block (``None``: the task takes none).
        traits: what the task is (:class:`hf_tokplug.traits.TaskTraits`); plugins check it, the lifecycle skips
            the phases it rules out. Override :meth:`resolve_traits` when they depend on the recipe's model.
    """

    task: ClassVar[str]
    traits: ClassVar[TaskTraits]  # required: what the task is
    description: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    model_mapping: ClassVar[str | None] = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    options_class: ClassVar[type | None] = None

    def __init__(self, recipe: Recipe, source: str = "<recipe>"):
        self.recipe = recipe
        self.source = source
        self.options = self.parse_options()
        self.notes: list[str] = []
        self._configs: dict[bool, Any] = {}
        self.ctx: Run | None = None  # set by run(): the model, tokenizer and plugins after the run
        self.recipe_path: str | None = None  # the recipe file (set by the CLI): overwrite never deletes it

    # ------------------------------------------------------------------------------------------------ checks

    def parse_options(self) -> Any:
        from pydantic import ValidationError

        raw = self.recipe.task_options
        if self.options_class is None:
            if raw:
                raise RecipeError(f"task {self.task!r} takes no task_options", where=f"{self.source}: task_options",
                                  fix="remove the task_options block")
            return None
        try:
            return self.options_class.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise RecipeError(
                f"invalid task option {key!r}: {err['msg']}", where=f"{self.source}: task_options.{key}",
                fix=f"valid options of {self.task}: {', '.join(self.options_class.model_fields)}",
            ) from None

    def create_context(self) -> Run:
        ctx = Run.create(self.recipe.plugins, where=self.source)
        ctx.recipe, ctx.task, ctx.base_model = self.recipe, self.recipe.task, self.recipe.model.name_or_path
        ctx.seed = self.recipe.seed
        ctx.output_dir = Path(self.recipe.output_dir)
        return ctx

    def validate(self, offline: bool = False) -> Run:
        """Every check that needs no weights (the task's, then ``tokplug_validate``); returns the run's context."""
        return lifecycle.validate(self, offline)

    def run(self) -> dict[str, Any]:
        """The whole run (:func:`hf_tokplug.lifecycle.run`); returns the final metrics."""
        return lifecycle.run(self)

    def resolve_traits(self) -> TaskTraits:
        """This run's traits (the class's ``traits``; a task whose model kind follows the recipe overrides it)."""
        traits = getattr(type(self), "traits", None)
        if not isinstance(traits, TaskTraits):
            raise PluginError(f"task {self.task!r} ({type(self).__module__}.{type(self).__qualname__}) declares no "
                              "traits", fix="set `traits = TaskTraits(model_kind=..., ...)` on the runner class "
                              "(docs/writing-a-plugin.md, 'Adding a task')")
        return traits

    def check(self, offline: bool) -> None:
        """The task's checks before anything loads: locations, model/task fit, data, trainer arguments, the adapter."""
        self.check_locations(offline)
        self.check_model(offline)
        self.check_data()
        self.check_train_args()
        self.check_run_folder()
        if self.resolve_traits().adapter == "none" and self.recipe.adapter is not None:
            raise RecipeError(f"task {self.task!r} trains no adapter", where=f"{self.source}: adapter",
                              fix="remove the adapter block (~adapter)")
        self.check_adapter(offline)

    def check_locations(self, offline: bool) -> None:
        """``model.name_or_path`` / ``model.tokenizer``: a ``toy://`` name that exists, a local folder that exists, or
        a valid Hub id (a path that is neither is an error here, not a Hub lookup later)."""
        from .checks import check_location

        spec = self.recipe.model
        check_location(spec.name_or_path, f"{self.source}: model.name_or_path")
        if spec.tokenizer is not None:
            check_location(spec.tokenizer, f"{self.source}: model.tokenizer")

    def check_run_folder(self) -> None:
        """``output_dir`` is a folder (or does not exist yet); ``resume_from_checkpoint`` points at a checkpoint."""
        out = Path(self.recipe.output_dir)
        if out.exists() and not out.is_dir():
            raise RecipeError(f"output_dir {out} is a file", where=f"{self.source}: output_dir",
                              fix="choose a folder path (e.g. output_dir=runs/my-run)")
        value = self.recipe.train.get("resume_from_checkpoint")
        if value in (None, False):
            return
        if value is True:
            self.resume_checkpoint()  # the latest complete checkpoint must exist
            return
        if not isinstance(value, str) or not Path(value).is_dir():
            raise RecipeError(f"train.resume_from_checkpoint {value!r} is not a checkpoint folder",
                              where=f"{self.source}: train.resume_from_checkpoint",
                              fix="give the path of a checkpoint-N folder, or `true` for the latest in output_dir")
        if not (Path(value) / "trainer_state.json").is_file():
            raise RecipeError(f"{value} holds no trainer_state.json: not a (complete) Trainer checkpoint",
                              where=f"{self.source}: train.resume_from_checkpoint",
                              fix="point at a checkpoint-N folder written by a run")

    def check_adapter(self, offline: bool) -> None:
        """LoRA ``target_modules`` (and ``modules_to_save``) must name modules of the model: checked on an empty
        (meta-device) model built from the config, so nothing is loaded."""
        from .checks import check_adapter_targets

        if self.recipe.adapter is None or self.auto_class is None or self.model_mapping is None:
            return
        config = self.model_config(offline)
        if config is None or getattr(config, "auto_map", None):
            return  # no config, or remote code (never run by validate): the adapter is checked when it attaches
        check_adapter_targets(self, config)

    def model_config(self, offline: bool) -> Any | None:
        """The model's config (fetched once per runner: validation and loading share it)."""
        if offline not in self._configs:
            self._configs[offline] = self._load_model_config(offline)
        return self._configs[offline]

    def _load_model_config(self, offline: bool) -> Any | None:
        spec = self.recipe.model
        if toy.is_toy(spec.name_or_path):
            try:
                return toy.toy_config(spec.name_or_path)
            except Exception as exc:
                raise RecipeError(str(exc), where=f"{self.source}: model.name_or_path") from None
        from transformers import AutoConfig, PretrainedConfig

        asked_offline, offline = offline, offline or _hub_offline()
        try:
            if spec.trust_remote_code:
                # Never run the model's own code to validate: config.json's fields are enough for the checks
                # (model_type, auto_map); `tokplug run` executes the remote code when it loads the model.
                raw, _ = PretrainedConfig.get_config_dict(toy.resolve(spec.name_or_path), revision=spec.revision,
                                                          local_files_only=offline)
                return _RawConfig(raw)
            return AutoConfig.from_pretrained(
                toy.resolve(spec.name_or_path), revision=spec.revision, trust_remote_code=False,
                local_files_only=offline,
            )
        except Exception as exc:
            if asked_offline:  # `validate --offline`: what is not cached is skipped, with a note
                self.notes.append(f"model config of {spec.name_or_path!r} is not cached; model/task check skipped (offline)")
                return None
            from .checks import location_problem

            raise RecipeError(
                f"cannot load the config of {spec.name_or_path!r}: {location_problem(spec.name_or_path, exc)}",
                where=f"{self.source}: model.name_or_path",
                fix="check the Hub id or local path (and your network / HF token for private models)",
            ) from None

    def check_model(self, offline: bool) -> None:
        from .checks import check_attn_implementation

        check_attn_implementation(self.recipe.model.attn_implementation, f"{self.source}: model.attn_implementation")
        config = self.model_config(offline)
        if config is None or self.model_mapping is None:
            return
        from transformers.models.auto import modeling_auto

        mapping = getattr(modeling_auto, self.model_mapping)
        remote = self.recipe.model.trust_remote_code and self.auto_class in (getattr(config, "auto_map", None) or {})
        if config.model_type not in mapping and not remote:
            raise RecipeError(
                f"task {self.task!r} needs a model loadable with {self.auto_class}; "
                f"{self.recipe.model.name_or_path!r} is a {config.model_type!r} model",
                where=f"{self.source}: model.name_or_path",
                fix="pick a model that fits the task, or a task that fits the model (`tokplug recipes ls`)",
            )

    def check_data(self) -> None:
        from .data import check_dataset_spec

        data = self.recipe.data
        if self.needs_data and (data is None or data.train is None):
            raise RecipeError(
                f"task {self.task!r} needs training data", where=f"{self.source}: data.train",
                fix="add `data: {train: toy://kjv-chat}` or point data.train at your dataset",
            )
        if data is not None:
            for key, spec in (("data.train", data.train), ("data.eval", data.eval)):
                if spec is not None:
                    check_dataset_spec(spec, key, self.source)

    def training_args_class(self) -> type:
        from transformers import TrainingArguments

        return TrainingArguments

    def check_train_args(self) -> None:
        """Unknown keys and wrong types under ``train`` are errors before anything loads."""
        import dataclasses
        import typing

        from pydantic import TypeAdapter, ValidationError

        cls = self.training_args_class()
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in self.recipe.train.items():
            if key in fields and key in hints and key != "resume_from_checkpoint":  # the host resolves `true`
                try:
                    adapter = TypeAdapter(hints[key])
                except Exception:  # an annotation pydantic cannot express: Trainer checks it at run time
                    adapter = None
                if adapter is not None:
                    try:
                        adapter.validate_python(value)
                    except ValidationError as exc:
                        raise RecipeError(
                            f"invalid value {value!r} for trainer argument {key!r}: {exc.errors()[0]['msg']}",
                            where=f"{self.source}: train.{key}",
                            fix=f"expected {hints[key]}",
                        ) from None
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                raise RecipeError(
                    f"unknown trainer argument {key!r} for {cls.__name__}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                    where=f"{self.source}: train.{key}",
                    fix=f"use a field of {cls.__module__}.{cls.__name__}",
                )
        if "output_dir" in self.recipe.train:
            raise RecipeError("set output_dir at the top level of the recipe, not under train", where=f"{self.source}: train.output_dir")
        from .checks import check_train_values

        data = self.recipe.data
        has_eval = data is not None and (data.eval is not None or bool(data.eval_size))
        check_train_values(self.recipe.train, self.source, has_eval=has_eval)

    # ------------------------------------------------------------------------------------------------ parts

    def read_data(self, ctx: Run) -> dict[str, Any]:
        """The recipe's raw splits (``{"train": ds, "eval": ds}``; missing ones left out)."""
        from .data import load_data

        if self.recipe.data is None:
            return {}
        train, evald = load_data(self.recipe.data, self.recipe.seed, self.source)
        return {split: ds for split, ds in (("train", train), ("eval", evald)) if ds is not None}

    def load_tokenizer(self, ctx: Run) -> Any:
        from transformers import AutoTokenizer

        spec = self.recipe.model
        location = spec.tokenizer or spec.name_or_path
        if toy.is_toy(location):
            return toy.load_tokenizer(location)
        return AutoTokenizer.from_pretrained(toy.resolve(location), revision=spec.revision, trust_remote_code=spec.trust_remote_code)

    def configure_tokenizer(self, ctx: Run, tokenizer: Any) -> None:
        """The task's own tokenizer needs (a mask token, a pad token), before the plugins' tokenizer hooks."""

    def load_model(self, ctx: Run) -> Any:
        import transformers

        spec = self.recipe.model
        kwargs = dict(spec.kwargs)
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        kwargs.update(self.model_kwargs())
        auto = getattr(transformers, self.auto_class)
        return auto.from_pretrained(
            toy.resolve(spec.name_or_path), dtype=spec.dtype, revision=spec.revision,
            trust_remote_code=spec.trust_remote_code, **kwargs,
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments the task needs (e.g. a classifier's labels)."""
        return {}

    def lora_config(self) -> Any:
        from peft import LoraConfig

        a = self.recipe.adapter
        return LoraConfig(
            r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
            modules_to_save=list(a.modules_to_save) if a.modules_to_save else None, task_type="CAUSAL_LM", **a.kwargs,
        )

    def peft_config(self, ctx: Run) -> Any | None:
        """The adapter config (``None``: no adapter): the recipe's ``adapter:`` block as a PEFT LoraConfig."""
        return self.lora_config() if self.recipe.adapter is not None else None

    def attach_adapter(self, ctx: Run, model: Any, peft_config: Any) -> Any:
        return lifecycle.attach_peft(model, peft_config)

    def configure_model(self, ctx: Run) -> None:
        """After ``tokplug_post_model_load``: settings that tie the model to the tokenizer (a pad id, say)."""

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        """The examples per split, as the trainer will see them (the default keeps the raw splits)."""
        return dict(raw)

    def base_collator(self, ctx: Run) -> Any:
        """The data collator the plugins' ``tokplug_wrap_collator`` wraps."""
        from transformers import default_data_collator

        return default_data_collator

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        """The trainer for ``traits.trainer`` tasks, built with ``callbacks`` (the host's and the plugins')."""
        raise NotImplementedError(f"task {self.task!r} declares trainer=True but builds none")

    def train(self, ctx: Run, data: dict[str, Any]) -> dict[str, Any]:
        """The task's own training loop (``traits.trains`` without a trainer); returns metrics."""
        raise NotImplementedError(f"task {self.task!r} declares trains=True without a trainer but has no loop")

    def finish(self, ctx: Run, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        """After training: the trainer's evaluation on the eval split (tasks add samples, generation...)."""
        if trainer is not None and data.get("eval") is not None:
            return trainer.evaluate()
        return {}

    def trainer_arguments(self, ctx: Run, **forced: Any) -> Any:
        """``training_args_class()`` from the recipe's ``train`` block, host defaults, then ``forced`` values."""
        train = dict(self.recipe.train)
        train.pop("resume_from_checkpoint", None)  # resolved by the host, passed to train()
        train.setdefault("report_to", "none")
        # Without an accelerator, TrainingArguments only sets up CPU ranks (gloo under torchrun) with use_cpu.
        train.setdefault("use_cpu", not has_accelerator())
        if ctx.hooks.has("tokplug_loss_terms"):
            # Loss terms use parameters after the DDP forward; "find unused" would mark them unused first and
            # DDP would then see their gradients twice.
            train.setdefault("ddp_find_unused_parameters", False)
        train.update(forced)
        cls = self.training_args_class()
        try:
            return cls(output_dir=self.recipe.output_dir, **train)
        except (TypeError, ValueError) as exc:
            raise RecipeError(
                f"invalid trainer arguments: {exc}", where=f"{self.source}: train",
                fix=f"see the {cls.__name__} documentation for the field",
            ) from None

    @classmethod
    def manifest_extras(cls, ctx: Run) -> dict[str, Any]:
        """Task facts a restore needs (e.g. a classifier's labels), saved as ``task_state`` in the manifest."""
        return {}

    @classmethod
    def pretrained_model_kwargs(cls, manifest: dict[str, Any]) -> dict[str, Any]:
        """``from_pretrained`` arguments for the base model under a saved adapter, from the manifest."""
        return {}

    @classmethod
    def pretrained_auto_class(cls, location: str) -> str:
        """The Auto class that loads the saved model at ``location`` (tasks whose model class varies override it)."""
        return cls.auto_class

    @classmethod
    def load_pretrained(cls, ctx: Run, folder: Path, manifest: dict[str, Any]) -> None:
        """Set ``ctx.tokenizer`` and ``ctx.model`` from a saved folder (``hf_tokplug.from_pretrained``)."""
        import transformers
        from transformers import AutoTokenizer

        adapter = (folder / "adapter_config.json").is_file()
        weights = toy.resolve(manifest["base_model"]) if adapter else str(folder)
        auto = getattr(transformers, cls.pretrained_auto_class(weights))
        ctx.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if adapter:
            from peft import PeftModel

            base = auto.from_pretrained(weights, **cls.pretrained_model_kwargs(manifest))
            current = base.get_input_embeddings().weight.shape[0]
            rows = manifest.get("embedding_rows") or max(current, len(ctx.tokenizer))
            if current != rows:
                base.resize_token_embeddings(rows, mean_resizing=False)
            ctx.model = PeftModel.from_pretrained(base, str(folder))
        else:
            ctx.model = auto.from_pretrained(str(folder))

    # ------------------------------------------------------------------------------------------------ run folder

    def resume_checkpoint(self) -> str | None:
        """``train.resume_from_checkpoint``: a path, or ``true`` for the latest *complete* checkpoint.

        A run killed while Trainer was writing a checkpoint leaves that folder partial; TokPlugCallback writes
        tokplug.json only after Trainer finished the checkpoint, so folders without it are skipped.
        """
        value = self.recipe.train.get("resume_from_checkpoint")
        if not value:
            return None
        if value is not True:
            return str(value)
        from .hub import MANIFEST

        out = Path(self.recipe.output_dir)
        complete = sorted(
            (p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / MANIFEST).is_file()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        if not complete:
            raise RecipeError(
                f"train.resume_from_checkpoint is true but {out} has no complete checkpoint",
                where=f"{self.source}: train.resume_from_checkpoint",
                fix="start a fresh run (drop the key, set overwrite: true), or give a checkpoint path",
            )
        return str(complete[-1])

    def write_run_header(self, ctx: Run) -> None:
        from .rundir import record_start, write_text_atomic

        out = Path(self.recipe.output_dir)
        write_text_atomic(
            out / "recipe.resolved.yaml",
            f"# reproduce: tokplug run {out / 'recipe.resolved.yaml'} output_dir={out}-repro\n"
            + dump_resolved(self.recipe, ctx.plugin_configs()),
        )
        resume = self.resume_checkpoint()
        record_start(
            out, seed=self.recipe.seed, plugins={n: manager.plugin_version(n) for n in ctx.plugins},
            resumed_from=str(resume) if resume else None,
        )
