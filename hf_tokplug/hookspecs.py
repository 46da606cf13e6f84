"""Every hook a plugin can implement: typed signature, when it fires, and how results combine.

Implement a hook with ``@hf_tokplug.hookimpl`` on a method of your plugin class; the method may accept any subset
of the arguments listed here. Plugins run in recipe order unless a hookimpl sets ``tryfirst``/``trylast``.

Aggregation rules (the ``rule`` of each spec, enforced by :class:`hf_tokplug.manager.HookCaller`):

- ``broadcast``: every implementation is called; return values are ignored.
- ``first``: implementations are called until one returns something other than ``None``; that value is used.
- ``chain``: each implementation receives the value returned by the previous one (``None`` keeps it unchanged).
- ``extend``: each implementation returns a list (or ``None``); the lists are concatenated.
- ``merge``: each implementation returns a dict (or ``None``); keys are namespaced ``<plugin>/<key>`` and the
  dicts are merged (so two plugins never overwrite each other).

Every spec here is documented in docs/hooks.md (a test fails when one is missing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from .context import RunContext

PROJECT = "hf_tokplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

RULES = ("broadcast", "first", "chain", "extend", "merge")

# name -> (phase, rule, chained argument or None)
HOOK_RULES: dict[str, tuple[str, str, str | None]] = {}


def _spec(phase: str, rule: str, chained: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    assert rule in RULES and (rule == "chain") == (chained is not None)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        HOOK_RULES[fn.__name__] = (phase, rule, chained)
        return hookspec(firstresult=rule == "first")(fn)

    return deco


# --------------------------------------------------------------------------------------------------------------
# setup: before anything is loaded
# --------------------------------------------------------------------------------------------------------------


@_spec("setup", "broadcast")
def tokplug_register_runners(register: Callable[[str, type], None]) -> None:
    """Register tasks (runner classes) by calling ``register(task_name, RunnerClass)``.

    Fires: once per plugin manager, when tasks are first looked up (recipe validation, ``tokplug run``).
    Rule: broadcast. Called on every *installed* plugin, enabled in the recipe or not, so that a task a plugin
    provides can be named in any recipe. Registering a task name twice is an error.
    """


@_spec("setup", "broadcast")
def tokplug_register_token_inits(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register strategies for initialising new embedding rows: ``register(name, fn)``.

    ``fn(request, **options) -> Tensor | None`` receives a :class:`hf_tokplug.tokens.TokenInitRequest` (the
    matrix, the old vocabulary size, the token ids and strings, ``side`` ``"input"`` or ``"output"``) and returns
    the new rows (one per token id, shaped like the matrix's rows), or ``None`` to leave them as they are.
    Any plugin that adds tokens uses them through :func:`hf_tokplug.tokens.add_tokens`.

    Fires: once per plugin manager, when token-init strategies are first looked up.
    Rule: broadcast, on every installed plugin. Registering a name twice is an error.
    """


@_spec("setup", "broadcast")
def tokplug_register_commands(register: Callable[..., None]) -> None:
    """Add ``tokplug`` subcommands: ``register(name, help, configure, run)``.

    ``configure(parser)`` adds arguments to an :class:`argparse.ArgumentParser`; ``run(args) -> int`` executes
    the command and returns the exit code.

    Fires: once when the ``tokplug`` CLI builds its parser.
    Rule: broadcast, on every installed plugin. A name that clashes with a built-in command is an error.
    """


@_spec("setup", "broadcast")
def tokplug_validate(ctx: RunContext) -> None:
    """Check the recipe and the combination of plugins; raise :class:`hf_tokplug.PluginError` for bad input.

    ``ctx.recipe`` and every enabled plugin's validated config are available; no tokenizer, model or data has been
    loaded. Name the key and the fix in the error.

    Fires: after the recipe and plugin configs are validated, before any weights or data load (also in
    ``tokplug validate`` and ``hf_tokplug.apply``).
    Rule: broadcast.
    """


# --------------------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------------------


@_spec("tokenizer", "first")
def tokplug_load_tokenizer(ctx: RunContext) -> Any:
    """Return a tokenizer to use instead of the model's own, or ``None`` to keep it.

    ``ctx.base_tokenizer`` holds the model's own tokenizer (loaded from ``model.tokenizer`` or
    ``model.name_or_path``, or the one passed to ``hf_tokplug.apply``) and stays available to every later hook: a
    plugin that swaps the vocabulary (TokenAdapt) reads the old pieces from it and rebuilds the model's embedding
    matrices in ``tokplug_adapt_embeddings``.

    Fires: once per run, before ``tokplug_prepare_tokenizer`` and before the model is loaded (also in
    ``hf_tokplug.apply``, where a returned tokenizer becomes ``ctx.tokenizer``).
    Rule: first result.
    """


@_spec("tokenizer", "broadcast")
def tokplug_prepare_tokenizer(ctx: RunContext, tokenizer: Any) -> None:
    """Modify the tokenizer in place (add special tokens, set templates).

    Tokens added here must be recorded with :func:`hf_tokplug.tokens.add_tokens` (or ``ctx.record_added_tokens``)
    so that the model side resizes and initialises them.

    Fires: once per run, after the tokenizer is loaded and before the model is loaded.
    Rule: broadcast.
    """


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------


@_spec("model", "first")
def tokplug_load_model(ctx: RunContext) -> Any:
    """Return the model to use instead of loading ``model.name_or_path``, or ``None``.

    Fires: once per run, after the tokenizer hooks. Not called by ``hf_tokplug.apply``.
    Rule: first result.
    """


@_spec("model", "chain", "model")
def tokplug_adapt_embeddings(ctx: RunContext, model: Any) -> Any:
    """Rebuild the model's vocabulary-sized matrices for ``ctx.tokenizer``; return a replacement or ``None``.

    For plugins that replaced the tokenizer in ``tokplug_load_tokenizer``: the model still has the rows of
    ``ctx.base_tokenizer``. After this hook, row ``i`` of the input (and untied output) embeddings must mean token
    ``i`` of ``ctx.tokenizer``, ignoring ``ctx.added_tokens``: the host then creates and initialises the rows of
    tokens that plugins added in ``tokplug_prepare_tokenizer`` with their requested strategies, as usual.

    Fires: once per run, right after the model is loaded, before added-token rows are created.
    Rule: chain on ``model``.
    """


@_spec("model", "chain", "model")
def tokplug_prepare_model(ctx: RunContext, model: Any) -> Any:
    """Modify or replace the base model (before adapters). Return a replacement, or ``None`` to keep it.

    The host has already resized the embeddings for tokens recorded in ``ctx.added_tokens`` and initialised their
    rows with the requested strategy before this hook fires.

    Fires: once per run, after the model is loaded and new token rows are initialised.
    Rule: chain on ``model``.
    """


@_spec("model", "chain", "peft_config")
def tokplug_adapter_config(ctx: RunContext, peft_config: Any) -> Any:
    """Adjust the PEFT config before the adapter is created; return a replacement or ``None``.

    Typical uses: make new-token rows trainable (``trainable_token_indices``), keep extra modules out of
    ``target_modules``. The host already adds the ids of ``ctx.added_tokens`` whose record asks for trainable rows.

    Fires: once per run that uses an adapter, right before ``peft.get_peft_model``.
    Rule: chain on ``peft_config``.
    """


@_spec("model", "broadcast")
def tokplug_post_model_load(ctx: RunContext, model: Any) -> None:
    """Inspect or register things on the final model (after adapters); ``ctx.model`` is the same object.

    Fires: once per run, after the adapter (if any) is attached and before data is prepared.
    Rule: broadcast.
    """


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


@_spec("data", "chain", "dataset")
def tokplug_prepare_dataset(ctx: RunContext, dataset: Any, split: str) -> Any:
    """Transform a tokenized dataset split (columns ``input_ids`` and ``labels``, plus the raw columns).

    Return a replacement dataset or ``None`` to keep it. ``split`` is ``"train"`` or ``"eval"``.

    Fires: once per split, after the host has tokenized it (also in ``tokplug preview``).
    Rule: chain on ``dataset``.
    """


@_spec("data", "chain", "collator")
def tokplug_wrap_collator(ctx: RunContext, collator: Callable[[list[dict]], dict]) -> Any:
    """Wrap the data collator: return a callable that usually calls the one it received. ``None`` keeps it.

    Wrap rather than replace: the collator you receive may already carry another plugin's behaviour.

    Fires: once per run, after the datasets are prepared (also in ``tokplug preview`` and ``ctx.wrap_collator``).
    Rule: chain on ``collator``.
    """


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------


@_spec("train", "merge")
def tokplug_loss_terms(ctx: RunContext, model: Any, inputs: dict, outputs: Any) -> dict[str, Any] | None:
    """Return named extra loss terms for this micro-batch, already weighted: ``{"name": value}``.

    A value is a scalar tensor (a mean over this micro-batch) or a :class:`hf_tokplug.TokenLoss` (a sum over
    tokens and its token count), which the host normalises exactly like the main token loss under gradient
    accumulation. ``outputs`` is a :class:`hf_tokplug.training.ForwardCapture` with the main loss, the model's
    own output, the backbone's last hidden state and ``shift`` (output t is scored against label t + shift: 1
    for causal LMs, 0 for masked-diffusion LMs). Return ``None`` or ``{}`` to add nothing.

    Fires: on every training and evaluation micro-batch, after the main loss is computed.
    Rule: merge; keys are namespaced as ``<plugin>/<name>``; the values are summed into the loss and logged
    one by one.
    """


@_spec("train", "extend")
def tokplug_callbacks(ctx: RunContext) -> list[Any] | None:
    """Return extra :class:`transformers.TrainerCallback` instances for the trainer.

    Fires: once per run, when the trainer is created (also by ``ctx.attach``).
    Rule: extend (the lists are concatenated).
    """


@_spec("train", "broadcast")
def tokplug_post_trainer_create(ctx: RunContext, trainer: Any) -> None:
    """Inspect or configure the trainer after it is built (``ctx.trainer`` is the same object).

    Fires: exactly once per run, after the trainer is created and before training starts.
    Rule: broadcast.
    """


@_spec("train", "broadcast")
def tokplug_post_train(ctx: RunContext, model: Any) -> None:
    """Act on the trained model (e.g. drop auxiliary modules) before evaluation and saving.

    Fires: exactly once per run, after ``trainer.train()`` returns.
    Rule: broadcast.
    """


# --------------------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------------------


@_spec("inference", "chain", "kwargs")
def tokplug_prepare_generation(ctx: RunContext, model: Any, kwargs: dict) -> dict | None:
    """Adjust ``generate`` keyword arguments (or swap in ``inputs_embeds``); return new kwargs or ``None``.

    Fires: on every ``hf_tokplug.generate(ctx, ...)`` call, before the model generates.
    Rule: chain on ``kwargs``.
    """


@_spec("inference", "chain", "text")
def tokplug_postprocess_text(ctx: RunContext, text: str) -> str | None:
    """Post-process one decoded generation; return the new text or ``None`` to keep it.

    Fires: on every decoded sequence produced by ``hf_tokplug.generate``.
    Rule: chain on ``text``.
    """


@_spec("inference", "chain", "pipeline")
def tokplug_prepare_pipeline(ctx: RunContext, pipeline: Any) -> Any:
    """Modify or replace a Diffusers pipeline (e.g. inject adapters); return a replacement or ``None``.

    Fires: once per pipeline built by a runner or by ``ctx.prepare_pipeline(pipeline)``.
    Rule: chain on ``pipeline``.
    """


# --------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------


@_spec("results", "merge")
def tokplug_evaluate(ctx: RunContext) -> dict[str, float] | None:
    """Return metrics computed on the final model: ``{"name": value}``; written to metrics.json.

    Fires: once per run, after training (or preparation) and the trainer's own evaluation.
    Rule: merge; keys are namespaced as ``<plugin>/<name>``.
    """


@_spec("results", "broadcast")
def tokplug_save(ctx: RunContext, output_dir: str) -> None:
    """Write this plugin's state files into ``output_dir`` (safetensors or JSON, never pickle).

    Record every file written with ``ctx.add_state_file(plugin_name, filename)`` so the manifest lists it.

    Fires: for the final output folder and for every trainer checkpoint (through ``TokPlugCallback``).
    Rule: broadcast.
    """


@_spec("results", "broadcast")
def tokplug_restore(ctx: RunContext, model_dir: str) -> None:
    """Restore this plugin's state from ``model_dir`` (written by ``tokplug_save``).

    ``ctx.model`` and ``ctx.tokenizer`` are loaded; the plugin's config comes from the manifest.

    Fires: in ``hf_tokplug.from_pretrained`` and when a run resumes from a checkpoint.
    Rule: broadcast.
    """


@_spec("results", "extend")
def tokplug_model_card(ctx: RunContext) -> list[str] | None:
    """Return Markdown sections for the model card (usage notes, results, the method's citation is automatic).

    Fires: once per saved output folder, when README.md is written.
    Rule: extend (the lists are concatenated).
    """
