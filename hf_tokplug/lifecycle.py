"""The run order: the one place that fires the lifecycle hooks, for every task and for ``hf_tokplug.apply``.

    validate      task checks (recipe, model config, data, trainer arguments), then tokplug_validate
    data          the task reads its raw splits (no hooks yet: bad data fails before anything is written)
    run folder    lock, recipe.resolved.yaml, run_info.json                      (recipe runs, main process)
    tokenizer     task loads the model's own -> tokplug_load_tokenizer (may swap) -> task tokens
                  -> tokplug_prepare_tokenizer
    model         tokplug_load_model or the task's loader -> tokplug_adapt_embeddings -> resize + init added rows
                  -> tokplug_prepare_model -> [tokplug_adapter_config -> adapter] -> tokplug_post_model_load
    examples      task tokenizes each split -> tokplug_prepare_dataset (per split) -> tokplug_wrap_collator
    trainer       tokplug_callbacks -> task builds the trainer -> loss terms attached -> tokplug_post_trainer_create
    train         trainer.train() (or the task's own loop) -> tokplug_post_train
    results       the task's own evaluation / generation -> tokplug_evaluate -> save: tokplug_save, manifest,
                  tokplug_model_card -> push

A task (:class:`hf_tokplug.plugin.Runner`) supplies parts only: how to load the tokenizer, the model, the data and the
trainer, and what to do after training. Its traits (``Runner.traits``) say which phases apply; hooks a trait rules
out never fire (:meth:`hf_tokplug.traits.TaskTraits.skipped_hooks`). Every chain hook's return value is the value
used from then on (``ctx.model``, ``ctx.tokenizer``, ``ctx.collator``). Inference hooks fire from
:mod:`hf_tokplug.inference`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from . import manager, toy
from .checks import looks_local
from .callback import TokPlugCallback, read_progress, save_plugin_state
from .context import RunContext
from .errors import PluginError, TokPlugError
from .hub import push_folder, read_manifest, save_run
from .inference import prepare_pipeline
from .modeling import output_module_name, peft_base
from .tokens import AddedToken, resize_and_init, trainable_token_ids
from .traits import TaskTraits
from .training import attach_loss_terms


class Run(RunContext):
    """The context recipe runs, ``apply`` and ``from_pretrained`` return: a :class:`RunContext` with the
    own-trainer steps bound as methods (each is the lifecycle function of the same name)."""

    def prepare_dataset(self, dataset: Any, split: str) -> Any:
        """Run the ``tokplug_prepare_dataset`` chain over one split of your tokenized data."""
        return prepare_dataset(self, dataset, split)

    def wrap_collator(self, collator: Any) -> Any:
        """Run the ``tokplug_wrap_collator`` chain over your collator; pass the result to your trainer (plugins
        that change batches, e.g. rainbow padding, act only through it)."""
        return wrap_collator(self, collator)

    def attach(self, trainer: Any) -> Any:
        """Hook this context into your own trainer instance: the plugins' collator wrappers (unless its collator came
        from :meth:`wrap_collator`), loss terms, plugin metrics, the per-step log and plugin state in checkpoints
        (``tokplug_callbacks``, then ``tokplug_post_trainer_create``). Returns the trainer."""
        return attach(self, trainer)

    def prepare_pipeline(self, pipeline: Any) -> Any:
        """Run the ``tokplug_prepare_pipeline`` chain over a Diffusers pipeline (e.g. TARA composition)."""
        return prepare_pipeline(self, pipeline)

    def save_pretrained(self, output_dir: str | os.PathLike, **kwargs: Any) -> Path:
        """Write model, tokenizer, plugin state, tokplug.json and a model card into ``output_dir``."""
        return save(self, Path(output_dir), **kwargs)

    def push_to_hub(self, repo_id: str, *, folder: str | os.PathLike | None = None, private: bool = True,
                    **kwargs: Any) -> str:
        """Save (unless ``folder`` holds a saved run already) and upload with huggingface_hub; returns the commit URL."""
        if folder is None:
            folder = self.save_pretrained(self.output_dir or f"tokplug-{repo_id.split('/')[-1]}")
        return push_folder(Path(folder), repo_id, private=private, **kwargs)


# ------------------------------------------------------------------------------------------------------ phases


def validate(task: Any, offline: bool = False) -> RunContext:
    """The task's own checks (no weights), then ``tokplug_validate``; returns the run's context."""
    ctx = task.create_context()
    task.check(offline)
    ctx.traits = task.resolve_traits()
    check_token_weights(ctx)
    ctx.call("tokplug_validate")
    return ctx


def check_token_weights(ctx: RunContext) -> None:
    """Plugins that weight the main loss per token need a task whose loss applies the weights."""
    weighers = ctx.hooks.implementers("tokplug_token_weights")
    if weighers and ctx.traits is not None and not ctx.traits.token_weights:
        raise PluginError(
            f"plugin(s) {weighers} weight the main loss per token (tokplug_token_weights), but task {ctx.task!r} does "
            "not apply token weights (trait token_weights=False)",
            where=f"plugins.{weighers[0]}",
            fix="use a task whose main loss is per token (SFT, DPO, GRPO, masked diffusion), or remove the plugin",
        )


def build_tokenizer(ctx: RunContext, base: Any, task: Any = None) -> Any:
    """``base`` (the model's own tokenizer) -> ``tokplug_load_tokenizer`` -> task tokens -> ``tokplug_prepare_tokenizer``."""
    ctx.base_tokenizer = base
    ctx.tokenizer = ctx.call("tokplug_load_tokenizer") or base
    if task is not None:
        task.configure_tokenizer(ctx, ctx.tokenizer)
    ctx.call("tokplug_prepare_tokenizer", tokenizer=ctx.tokenizer)
    return ctx.tokenizer


def build_model(ctx: RunContext, task: Any = None, *, model: Any = None, peft_config: Any = None,
                pad_to_multiple_of: int | None = None, seed: int | None = None) -> Any:
    """Load (``tokplug_load_model`` or the task; ``model`` when given), adapt the embeddings, resize and initialise
    added rows, ``tokplug_prepare_model``, then the adapter and ``tokplug_post_model_load``."""
    if model is None:
        model = ctx.call("tokplug_load_model") or task.load_model(ctx)
    ctx.model = model
    ctx.model = ctx.call("tokplug_adapt_embeddings", model=ctx.model)
    resize_and_init(ctx, ctx.model, pad_to_multiple_of)
    ctx.model = ctx.call("tokplug_prepare_model", model=ctx.model)
    if task is not None:
        peft_config = task.peft_config(ctx)
    if peft_config is not None:
        if seed is not None:
            from transformers import set_seed

            set_seed(seed)  # LoRA init draws from the global RNG: same recipe, same adapter, any process
        peft_config = adapter_config(ctx, peft_config)
        ctx.model = task.attach_adapter(ctx, ctx.model, peft_config) if task is not None else attach_peft(ctx.model, peft_config)
    ctx.call("tokplug_post_model_load", model=ctx.model)
    if task is not None:
        task.configure_model(ctx)
    return ctx.model


def attach_peft(model: Any, peft_config: Any) -> Any:
    """``peft.get_peft_model``: how an adapter is attached unless a task attaches its own (diffusion UNets)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def adapter_config(ctx: RunContext, peft_config: Any) -> Any:
    """Make added tokens trainable (``trainable_token_indices``; an untied head in ``modules_to_save``), then the
    ``tokplug_adapter_config`` chain."""
    ids = trainable_token_ids(ctx)
    if ids:
        indices = peft_config.trainable_token_indices
        if indices is None:
            peft_config.trainable_token_indices = list(ids)
        elif isinstance(indices, list):
            peft_config.trainable_token_indices = sorted(set(indices) | set(ids))
        else:
            key = next(iter(indices), "embed_tokens")
            indices[key] = sorted(set(indices.get(key, [])) | set(ids))
        head = output_module_name(ctx.model)
        if head is not None:
            # An untied LM head needs its new rows trained too. TRL's fused loss reads `lm_head.weight`
            # directly (it rejects tuner layers there), so the head is trained and saved in full.
            saved = list(peft_config.modules_to_save or [])
            if head not in saved:
                peft_config.modules_to_save = [*saved, head]
    return ctx.call("tokplug_adapter_config", peft_config=peft_config)


def build_examples(ctx: RunContext, task: Any, raw: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The task's examples per split through ``tokplug_prepare_dataset``, and its collator through
    ``tokplug_wrap_collator``; for tasks whose traits rule the data hooks out, the examples alone (no collator)."""
    splits = task.examples(ctx, raw)
    if not ctx.traits.dataset_hooks:
        return splits, None
    data = {split: prepare_dataset(ctx, ds, split) for split, ds in splits.items()}
    collator = wrap_collator(ctx, task.base_collator(ctx)) if data else None
    return data, collator


def runner_for(recipe_path: str, overrides: list[str]) -> Any:
    """The task runner of the recipe at ``recipe_path`` with ``key=value`` overrides (``tokplug run``'s first step)."""
    from .errors import RecipeError
    from .manager import registries
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    source = recipe_path + (" (with command-line overrides)" if overrides else "")
    runners = registries().runners
    if recipe.task not in runners:
        raise RecipeError(
            f"unknown task {recipe.task!r}; available: {', '.join(sorted(runners))}",
            where=f"{source}: task",
            fix="pick one of the available tasks, or install the plugin that provides this one",
        )
    runner = runners[recipe.task](recipe, source)
    runner.recipe_path = recipe_path
    return runner


def prepare_examples(recipe: Any, overrides: list[str] | None = None, *, rows: int | None = None
                     ) -> tuple[RunContext, dict[str, Any], Any]:
    """The run's data phases without a model: what ``tokplug preview`` shows and what offline scoring commands
    (``tokplug cdpo-score``) score, so both see exactly the examples the trainer will.

    ``recipe`` is a recipe path (with ``overrides``) or a task runner. Runs validate, the raw data (the first
    ``rows`` training rows when given), the tokenizer phase, the task's examples and ``tokplug_prepare_dataset``
    per split, and the wrapped collator. ``ctx.model`` is ``None`` throughout: data hooks that need the model
    (scoring with it) must skip then. Returns ``(ctx, examples per split, collator)``; nothing is written.
    """
    from .errors import RecipeError

    runner = recipe
    if isinstance(recipe, (str, os.PathLike)):
        runner = runner_for(str(recipe), list(overrides or []))
    ctx = runner.validate()
    spec = runner.recipe
    if not ctx.traits.dataset_hooks or spec.data is None or spec.data.train is None:
        raise RecipeError(f"task {spec.task!r} has no training examples that pass the data hooks",
                          where=f"{runner.source}: data.train", fix="add data.train, or run the recipe instead")
    raw = runner.read_data(ctx)
    if rows is not None:
        raw = {"train": raw["train"].select(range(min(rows, len(raw["train"]))))}
    build_tokenizer(ctx, runner.load_tokenizer(ctx), runner)  # the same ids as in the run
    data, collator = build_examples(ctx, runner, raw)
    return ctx, data, collator


def prepare_dataset(ctx: RunContext, dataset: Any, split: str) -> Any:
    return ctx.call("tokplug_prepare_dataset", dataset=dataset, split=split)


def wrap_collator(ctx: RunContext, collator: Any) -> Any:
    ctx.collator = ctx.call("tokplug_wrap_collator", collator=collator)
    return ctx.collator


def callbacks(ctx: RunContext) -> list[Any]:
    """``TokPlugCallback`` (per-step log, plugin state in checkpoints) and the ``tokplug_callbacks`` list."""
    return [TokPlugCallback(ctx), *ctx.call("tokplug_callbacks")]


def build_trainer(ctx: RunContext, task: Any, data: dict[str, Any], collator: Any) -> Any:
    """``tokplug_callbacks`` -> the task's trainer (given the callbacks) -> loss terms and logging attached ->
    ``tokplug_post_trainer_create``."""
    if not (ctx.traits.trainer and data):
        return None
    trainer = task.make_trainer(ctx, data.get("train"), data.get("eval"), collator, callbacks(ctx))
    return trainer_created(ctx, trainer)


# Own trainers ctx.attach covers (and their subclasses): transformers' Trainer and these TRL trainers.
ATTACHABLE = ("Trainer", "SFTTrainer", "DPOTrainer", "RewardTrainer", "GRPOTrainer")
# ... of which these score tokens through per-token log-probabilities, where token weights apply.
WEIGHTED = ("SFTTrainer", "DPOTrainer", "GRPOTrainer")


def check_trainer(ctx: RunContext, trainer: Any) -> None:
    """Refuse, at attach time, a trainer the host cannot serve (naming it and what is covered)."""
    mro = type(trainer).__mro__
    names = [cls.__name__ for cls in mro]
    trl = next((cls.__name__ for cls in mro if cls.__module__.startswith("trl.")), None)
    covered = ", ".join(ATTACHABLE)
    if "Trainer" not in names or trl is not None and trl not in ATTACHABLE and trl != "_BaseTrainer":
        raise TokPlugError(f"ctx.attach does not cover {type(trainer).__name__} ({trl or 'not a transformers Trainer'})",
                           fix=f"use one of: {covered} (or a subclass); other trainers are not supported yet")
    weighers = ctx.hooks.implementers("tokplug_token_weights")
    if weighers and not getattr(trainer, "tokplug_applies_token_weights", False) and not set(names) & set(WEIGHTED):
        raise TokPlugError(f"plugin(s) {weighers} return token weights, but {type(trainer).__name__}'s loss is not "
                           "per token", fix=f"token weights apply on {', '.join(WEIGHTED)}; remove the plugin here")


def attach(ctx: RunContext, trainer: Any) -> Any:
    """``ctx.attach(trainer)`` on your own trainer: its data collator goes through ``tokplug_wrap_collator`` (unless
    it came from ``ctx.wrap_collator``), the callbacks are added to it, then as in a recipe run."""
    check_trainer(ctx, trainer)
    collator = getattr(trainer, "data_collator", None)
    if collator is not None and collator is not ctx.collator:
        trainer.data_collator = wrap_collator(ctx, collator)
    for callback in callbacks(ctx):
        trainer.add_callback(callback)
    return trainer_created(ctx, trainer)


def trainer_created(ctx: RunContext, trainer: Any) -> Any:
    """Wrap this trainer instance's ``compute_loss`` and ``log`` (loss terms, plugin metrics, tokens/s; no class is
    patched), then fire ``tokplug_post_trainer_create``."""
    attach_loss_terms(trainer, ctx)
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(callback, TokPlugCallback):
            callback.take_rotation(trainer.args)
    ctx.trainer = trainer
    ctx.call("tokplug_post_trainer_create", trainer=trainer)
    return trainer


def train(ctx: RunContext, task: Any, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming when asked) or run the task's own loop; nothing for tasks that do not train.

    Resuming from a checkpoint written at the run's last step does not train again (Trainer would run one step
    past it): the checkpoint's weights and plugin state are loaded, and the run goes on to evaluate and save.
    """
    if not ctx.traits.trains:
        return {}
    if trainer is None:
        return dict(task.train(ctx, data) or {})
    checkpoint = task.resume_checkpoint()
    prior = read_progress(Path(checkpoint)) if checkpoint is not None else None
    if checkpoint is not None and finished_at(Path(checkpoint), trainer.args):
        trainer._load_from_checkpoint(checkpoint)
        ctx.call("tokplug_restore", model_dir=checkpoint)
        warnings.warn(f"{checkpoint} is the run's last step: nothing left to train, evaluating and saving it")
        metrics: dict[str, Any] = {"resumed_finished_run": 1}
        if prior and prior.get("step"):
            metrics["train_loss"] = prior["loss_sum"] / prior["step"]
            if "tokens" in prior and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = prior["tokens"]  # TRL reports the run's token count with eval
        return metrics
    metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    step = trainer.state.global_step
    if prior and step and "train_loss" in metrics:
        # Trainer averages over the steps of this session only; the run's loss covers every step
        session = metrics["train_loss"] * (step - prior["step"])
        metrics["train_loss"] = (prior["loss_sum"] + session) / step
    return metrics


def finished_at(checkpoint: Path, args: Any) -> bool:
    """Whether ``checkpoint`` already holds the last step of the run ``args`` describe: ``max_steps`` reached, or
    (epoch-based runs) the checkpoint's own run had the same epochs and ended there."""
    path = checkpoint / "trainer_state.json"
    if not path.is_file():
        return False
    state = json.loads(path.read_text(encoding="utf-8"))
    step = state.get("global_step", 0)
    if args.max_steps and args.max_steps > 0:
        return step >= args.max_steps
    return bool(state.get("max_steps")) and step >= state["max_steps"] and \
        state.get("num_train_epochs") == args.num_train_epochs


def finish(ctx: RunContext, task: Any, trainer: Any, data: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """``tokplug_post_train`` (tasks that train), the task's own results (evaluation, samples), ``tokplug_evaluate``."""
    metrics = dict(metrics)
    if ctx.traits.trains:
        ctx.call("tokplug_post_train", model=ctx.model)
    metrics.update(task.finish(ctx, trainer, data) or {})
    metrics.update(ctx.call("tokplug_evaluate"))
    return jsonable(metrics)


def recover(ctx: RunContext, out: Path, error: BaseException) -> TokPlugError:
    """After training, something failed (a plugin's hook, the evaluation, the save): write the trained model as it
    is, with no plugin involved, into ``<output_dir>/recovered-model`` and return the error to raise, which names
    what failed and where the model is."""
    from .rundir import RECOVERED, record_written

    folder = out / RECOVERED
    record_written(out, [RECOVERED])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if ctx.model is not None and hasattr(ctx.model, "save_pretrained"):
            ctx.model.save_pretrained(folder)
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(folder)
        where = f"the trained model was saved to {folder} (plain save_pretrained, without plugin state)"
    except Exception as exc:  # even the plain save failed: say so, keep the first error
        where = f"saving the trained model to {folder} failed too ({type(exc).__name__}: {exc})"
    message = error.message if isinstance(error, TokPlugError) else f"{type(error).__name__}: {error}"
    cls = type(error) if isinstance(error, TokPlugError) else TokPlugError
    return cls(f"the run failed after training: {message}; {where}",
                        where=getattr(error, "where", None),
                        fix=(getattr(error, "fix", None) or "fix the cause above") + f"; load the model from {folder}")


def save(ctx: RunContext, output_dir: Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None,
         run_folder: bool = False) -> Path:
    """Model, tokenizer, ``tokplug_save`` + manifest, metrics and the model card (``tokplug_model_card``), staged
    and moved into ``output_dir`` (manifest last). ``run_folder``: ``output_dir`` is a recipe run's folder, whose
    run_info.json lists what runs wrote there (``overwrite`` deletes only that)."""
    from .rundir import record_written

    record = (lambda names: record_written(output_dir, names)) if run_folder else None
    return save_run(ctx, output_dir, metrics, repo_id, save_state=save_plugin_state,
                    sections=lambda: ctx.call("tokplug_model_card"), record=record)


# ------------------------------------------------------------------------------------------------------ entry points


def run(task: Any) -> dict[str, Any]:
    """A recipe run: validate, lock the run folder, record the start, every phase, save, push; returns the metrics."""
    from accelerate import PartialState

    from .rundir import prepare_output_dir

    ctx = task.ctx = validate(task)
    raw = task.read_data(ctx)  # before the run folder: data that does not fit the task leaves nothing behind
    # The distributed state is a process-wide singleton: created here first, it must already know that a
    # machine without an accelerator trains on CPU, or ranks under torchrun/accelerate would each run alone.
    state = PartialState(cpu=not has_accelerator())
    recipe = task.recipe
    out = Path(recipe.output_dir)
    folder = None
    if state.is_main_process:
        folder = prepare_output_dir(out, overwrite=recipe.overwrite, resuming=bool(task.resume_checkpoint()),
                                    recipe_path=getattr(task, "recipe_path", None))
        for note in folder.notes:
            warnings.warn(note)
    trained = False
    try:
        if state.is_main_process:
            task.write_run_header(ctx)
        state.wait_for_everyone()
        build_tokenizer(ctx, task.load_tokenizer(ctx), task)
        if ctx.traits.builds_model:
            build_model(ctx, task, pad_to_multiple_of=recipe.model.pad_to_multiple_of, seed=recipe.seed)
        data, collator = build_examples(ctx, task, raw)
        trainer = build_trainer(ctx, task, data, collator)
        trained = True  # from here on the run folder keeps what it has (checkpoints, logs)
        metrics = train(ctx, task, trainer, data)
        try:
            metrics = finish(ctx, task, trainer, data, metrics)
            if state.is_main_process:
                ctx.metrics = metrics
                save(ctx, out, metrics, repo_id=recipe.hub.repo_id, run_folder=True)
        except Exception as exc:
            if not (ctx.traits.trains and state.is_main_process):
                raise
            raise recover(ctx, out, exc) from exc
        if state.is_main_process:
            if recipe.hub.repo_id:
                url = push_folder(out, recipe.hub.repo_id, private=recipe.hub.private, revision=recipe.hub.revision)
                metrics = {**metrics, "hub_commit": url}
        state.wait_for_everyone()
        return metrics
    except BaseException:
        if folder is not None and not trained:
            folder.rollback()  # failed before training: the folder is as it was (a corrected rerun is not blocked)
        raise
    finally:
        if folder is not None:
            folder.release()


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
    """Patch a user's model and tokenizer with plugins; use the result in your own trainer.

    The same phases as a recipe run, up to the model: validate -> tokenizer hooks (a plugin may swap it) -> model
    hooks (adapt embeddings, resize and initialise added rows, prepare) -> adapter (when ``peft_config`` is given)
    -> post_model_load. ``tokplug_load_model`` does not fire (the model is yours). Afterwards use ``ctx.model`` /
    ``ctx.tokenizer`` (a plugin may replace either), ``ctx.wrap_collator(collator)`` for your data collator (the
    collator hooks fire only there), and ``ctx.attach(trainer)`` for loss terms, logging and plugin state.

    ``task`` names how ``hf_tokplug.from_pretrained`` reloads the saved model and which traits plugins see; by
    default it is the first registered training task whose model kind fits the model (causal LMs: SFT).

    Example::

        ctx = hf_tokplug.apply(model, tokenizer, plugins={"my_plugin": {"weight": 0.1}}, peft_config=LoraConfig(r=8))
        trainer = ctx.attach(SFTTrainer(model=ctx.model, processing_class=ctx.tokenizer, args=...,
                                        train_dataset=..., data_collator=ctx.wrap_collator(collator)))
        trainer.train()
        ctx.save_pretrained("out")
    """
    runners = manager.registries().runners
    if task is not None and task not in runners:
        raise TokPlugError(f"unknown task {task!r}; registered: {', '.join(sorted(runners))}",
                           fix="pass one of the registered tasks, or leave task unset")
    ctx = Run.create(plugins or {}, seed=seed)
    ctx.task = task or infer_task(model)
    ctx.traits = getattr(runners[ctx.task], "traits", None) if ctx.task else None
    ctx.base_model = getattr(getattr(model, "config", None), "_name_or_path", None)
    check_token_weights(ctx)
    ctx.call("tokplug_validate")
    build_tokenizer(ctx, tokenizer)
    build_model(ctx, model=model, peft_config=peft_config, pad_to_multiple_of=pad_to_multiple_of)
    return ctx


def model_kind(model: Any) -> str | None:
    """The :data:`~hf_tokplug.traits.MODEL_KINDS` entry a transformers model belongs to, or ``None``."""
    from transformers.models.auto import modeling_auto as auto

    base = peft_base(model)
    name = type(base).__name__
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    decoder = model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    for kind, mapping in (("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("masked_lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
                          ("causal_classifier" if decoder else "encoder", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                          ("encoder", auto.MODEL_MAPPING_NAMES)):
        if name in set(mapping.values()):
            return kind
    return None


def infer_task(model: Any) -> str | None:
    """The first registered training task (registration order) whose traits' model kind fits ``model``."""
    kind = model_kind(model)
    for name, runner in manager.registries().runners.items():
        traits: TaskTraits | None = getattr(runner, "traits", None)
        if kind is not None and traits is not None and traits.model_kind == kind and traits.trains and traits.trainer:
            return name
    return None


def from_pretrained(path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                    allow_pickle: bool = False) -> RunContext:
    """Restore model, tokenizer and plugin state from a saved folder or a Hub repo; returns the RunContext.

    The folder is checked first: tokplug.json's schema and version, every file it lists present with its saved size
    (a save that did not finish, or a truncated or swapped file, is refused), plugin state files inside the folder,
    and no pickle weights unless ``allow_pickle=True`` (hf_tokplug saves safetensors only). Then the manifest's
    plugins are instantiated from their saved configs, the task loads the model and tokenizer
    (``Runner.load_pretrained``), and ``tokplug_restore`` fires. Every failure names the folder (and the plugin).
    """
    folder = Path(path_or_repo)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(path_or_repo), revision=revision, token=token))
    data = read_manifest(folder, check_files=True, allow_pickle=allow_pickle)
    for entry in data["plugins"]:
        installed = manager.plugin_version(entry["name"])
        if entry.get("version") and installed and installed != entry["version"]:
            warnings.warn(f"plugin {entry['name']!r} was saved with version {entry['version']}, {installed} is installed")
    ctx = Run.create([(p["name"], p["config"]) for p in data["plugins"]], where=str(folder / "tokplug.json"))
    ctx.task, ctx.base_model, ctx.output_dir = data.get("task"), data.get("base_model"), folder
    try:
        ctx.added_tokens = [AddedToken(**t) for t in data.get("added_tokens", [])]
    except TypeError as exc:
        raise TokPlugError(f"{folder / 'tokplug.json'}: invalid added_tokens entry ({exc})",
                           fix="save the model again; do not edit a saved folder by hand") from None
    runners = manager.registries().runners
    if ctx.task not in runners:
        raise TokPlugError(
            f"{folder / 'tokplug.json'}: task {ctx.task!r} is not available",
            fix="install the plugin that provides the task (for hf_tokplug.apply, pass task=...)",
        )
    ctx.traits = getattr(runners[ctx.task], "traits", None)
    base = data.get("base_model")
    if data.get("adapter") and isinstance(base, str) and not toy.is_toy(base) and looks_local(base) \
            and not Path(base).expanduser().exists():
        raise TokPlugError(f"{folder / 'tokplug.json'}: the adapter's base model {base!r} is a path that does not exist",
                           fix="restore the base model at that path, or load the adapter with peft onto the base "
                               "model yourself")
    try:
        runners[ctx.task].load_pretrained(ctx, folder, data)
    except TokPlugError:
        raise
    except Exception as exc:
        raise TokPlugError(f"{folder}: loading the saved model failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                           fix="the folder's weights or tokenizer files are damaged or were replaced: save or "
                               "download it again (--debug shows the traceback)") from exc
    for entry in data["plugins"]:
        ctx.state_files[entry["name"]] = list(entry.get("state_files", []))
    ctx.call("tokplug_restore", model_dir=str(folder))
    return ctx


# ------------------------------------------------------------------------------------------------------ helpers


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain JSON values (tensors and numpy scalars become floats)."""
    return json.loads(json.dumps(metrics, default=float))
