"""Runner: one task's end-to-end flow. Subclasses set the model kind and implement ``execute``.

The order is fixed and documented in docs/design.md: validate (no weights) -> run folder -> tokenizer hooks ->
model hooks -> adapter -> data hooks -> trainer -> train -> evaluate -> save -> push.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, ClassVar

from ..context import RunContext
from ..errors import RecipeError
from ..recipe import Recipe, dump_resolved
from .. import manager, toy


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
    """

    task: ClassVar[str]
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
        self.ctx: RunContext | None = None  # set by run(): the model, tokenizer and plugins after the run

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

    def create_context(self) -> RunContext:
        ctx = RunContext.create(self.recipe.plugins, where=self.source)
        ctx.recipe, ctx.task, ctx.base_model = self.recipe, self.recipe.task, self.recipe.model.name_or_path
        ctx.seed = self.recipe.seed
        ctx.output_dir = Path(self.recipe.output_dir)
        return ctx

    def validate(self, offline: bool = False) -> RunContext:
        """Every check that needs no weights; returns the context with validated plugins."""
        ctx = self.create_context()
        self.check_model(offline)
        self.check_data()
        self.check_train_args()
        ctx.call("tokplug_validate")
        return ctx

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
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(
                toy.resolve(spec.name_or_path), revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                local_files_only=offline,
            )
        except Exception as exc:
            if offline:
                self.notes.append(f"model config of {spec.name_or_path!r} is not cached; model/task check skipped (offline)")
                return None
            raise RecipeError(
                f"cannot load the config of {spec.name_or_path!r}: {exc}",
                where=f"{self.source}: model.name_or_path",
                fix="check the Hub id or local path (and your network / HF token for private models)",
            ) from None

    def check_model(self, offline: bool) -> None:
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
        from ..data import check_dataset_spec

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

    # ------------------------------------------------------------------------------------------------ loading

    def load_tokenizer(self, ctx: RunContext) -> Any:
        from transformers import AutoTokenizer

        spec = self.recipe.model
        location = spec.tokenizer or spec.name_or_path
        if toy.is_toy(location):
            return toy.load_tokenizer(location)
        return AutoTokenizer.from_pretrained(toy.resolve(location), revision=spec.revision, trust_remote_code=spec.trust_remote_code)

    def load_model(self, ctx: RunContext) -> Any:
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

    def add_task_tokens(self, ctx: RunContext, tokenizer: Any) -> None:
        """Tokens the task itself needs (e.g. a mask token), added before the plugins' tokenizer hooks."""

    def trainer_arguments(self, ctx: RunContext, **forced: Any) -> Any:
        """``training_args_class()`` from the recipe's ``train`` block, host defaults, then ``forced`` values."""
        train = dict(self.recipe.train)
        train.pop("resume_from_checkpoint", None)  # resolved by the host, passed to train()
        train.setdefault("report_to", "none")
        # Without an accelerator, TrainingArguments only sets up CPU ranks (gloo under torchrun) with use_cpu.
        train.setdefault("use_cpu", not _has_accelerator())
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

    def build_objects(self, ctx: RunContext) -> None:
        """Tokenizer and model through the hooks, new token rows, adapter."""
        tokenizer = ctx.load_tokenizer(self.load_tokenizer(ctx))
        self.add_task_tokens(ctx, tokenizer)
        ctx.prepare_tokenizer(tokenizer)
        model = ctx.call("tokplug_load_model") or self.load_model(ctx)
        ctx.prepare_model(model, self.recipe.model.pad_to_multiple_of)
        if self.recipe.adapter is not None:
            from transformers import set_seed

            set_seed(self.recipe.seed)  # LoRA init draws from the global RNG: same recipe, same adapter, any process
            ctx.attach_adapter(self.lora_config())
        ctx.post_model_load()

    @classmethod
    def manifest_extras(cls, ctx: RunContext) -> dict[str, Any]:
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
    def load_pretrained(cls, ctx: RunContext, folder: Path, manifest: dict[str, Any]) -> None:
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
        from ..hub import MANIFEST

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

    def write_run_header(self, ctx: RunContext) -> None:
        from ..rundir import record_start, write_text_atomic

        out = Path(self.recipe.output_dir)
        write_text_atomic(
            out / "recipe.resolved.yaml",
            f"# tokplug run {out / 'recipe.resolved.yaml'}\n" + dump_resolved(self.recipe, ctx.plugin_configs()),
        )
        resume = self.resume_checkpoint()
        record_start(
            out, seed=self.recipe.seed, plugins={n: manager.plugin_version(n) for n in ctx.plugins},
            resumed_from=str(resume) if resume else None,
        )

    def run(self) -> dict[str, Any]:
        """Validate, lock the run folder, record the start, then ``execute``; returns the final metrics."""
        from accelerate import PartialState

        from ..rundir import prepare_output_dir

        ctx = self.ctx = self.validate()
        # The distributed state is a process-wide singleton: created here first, it must already know that a
        # machine without an accelerator trains on CPU, or ranks under torchrun/accelerate would each run alone.
        state = PartialState(cpu=not _has_accelerator())
        out = Path(self.recipe.output_dir)
        lock = None
        if state.is_main_process:
            lock = prepare_output_dir(out, overwrite=self.recipe.overwrite, resuming=bool(self.resume_checkpoint()))
        try:
            if state.is_main_process:
                self.write_run_header(ctx)
            state.wait_for_everyone()
            metrics = self.execute(ctx)
            if state.is_main_process:
                ctx.metrics = metrics
                from ..hub import push_folder, save_run

                save_run(ctx, out, metrics, repo_id=self.recipe.hub.repo_id)
                if self.recipe.hub.repo_id:
                    url = push_folder(out, self.recipe.hub.repo_id, private=self.recipe.hub.private, revision=self.recipe.hub.revision)
                    metrics = {**metrics, "hub_commit": url}
            state.wait_for_everyone()
            return metrics
        finally:
            if lock is not None:
                lock.release()

    def execute(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def train_and_evaluate(self, ctx: RunContext, trainer: Any, evald: Any) -> dict[str, Any]:
        """Train (resuming when asked), fire ``tokplug_post_train``, evaluate on ``evald`` and the plugins' metrics."""
        result = trainer.train(resume_from_checkpoint=self.resume_checkpoint())
        ctx.call("tokplug_post_train", model=ctx.model)
        metrics: dict[str, Any] = dict(result.metrics)
        if evald is not None:
            metrics.update(trainer.evaluate())
        metrics.update(ctx.call("tokplug_evaluate"))
        return jsonable(metrics)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))

