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
- ``product``: each implementation returns a tensor (or ``None``); the tensors are multiplied (``None`` if all
  returned ``None``).

docs/hooks.md is generated from this module (``python scripts/gen_docs.py``; a test fails when it is stale). The
run order that fires these hooks is :mod:`hf_tokplug.lifecycle`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from .context import RunContext

PROJECT = "hf_tokplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

RULES = ("broadcast", "first", "chain", "extend", "merge", "product")

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

    A runner class derives from :class:`hf_tokplug.plugin.Runner`, declares its ``traits``
    (:class:`hf_tokplug.plugin.TaskTraits`) and supplies the parts of a run (docs/writing-a-plugin.md, "Adding a
    task"); the host's own tasks are registered the same way (entry point ``hf_tokplug``).

    Fires: once per plugin manager, when tasks are first looked up (recipe validation, ``tokplug run``).
    Rule: broadcast. Called on every *installed* plugin, enabled in the recipe or not, so that a task a plugin
    provides can be named in any recipe. Registering a task name twice is an error.

    Example::

        class MyPlugin(hf_tokplug.Plugin):
            @staticmethod
            @hf_tokplug.hookimpl
            def tokplug_register_runners(register):
                register("my_task", MyRunner)  # MyRunner subclasses hf_tokplug.plugin.Runner
    """


@_spec("setup", "broadcast")
def tokplug_register_token_inits(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register strategies for initialising new embedding rows: ``register(name, fn)``.

    ``fn(request, **options) -> Tensor | None`` returns the new rows, shaped ``(len(request.token_ids), hidden)``,
    or ``None`` to leave them as they are. ``options`` is the ``init_options`` dict of the ``add_tokens`` call.
    ``request`` is a :class:`hf_tokplug.plugin.TokenInitRequest`:

    - ``ctx``: the run context (``ctx.tokenizer`` holds the new tokens; ``ctx.base_tokenizer`` the model's own);
    - ``weight``: the whole matrix after resizing, ``(vocab, hidden)``, detached (read it, do not write it);
    - ``old_vocab_size``: rows ``[0, old_vocab_size)`` existed before any token was added;
      ``old_rows`` is ``weight[:old_vocab_size]``;
    - ``token_ids`` / ``tokens``: the ids and strings of the rows to fill, aligned;
    - ``side``: ``"input"`` (embedding) or ``"output"`` (LM head; called only when it is untied);
    - ``token_id(token)``: the id of any token string of the tokenizer (e.g. the EOS to copy).

    Any plugin that adds tokens names a strategy in :func:`hf_tokplug.plugin.add_tokens` (``init=``); built in:
    ``mean`` (``noise_std``, ``seed``), ``normal``, ``copy`` (``token``, ``noise_std``, ``seed``).

    Fires: once per plugin manager, when token-init strategies are first looked up.
    Rule: broadcast, on every installed plugin. Registering a name twice is an error.

    Example::

        def init_zero(request, **options):
            return request.old_rows.new_zeros(len(request.token_ids), request.old_rows.shape[1])

        class MyPlugin(hf_tokplug.Plugin):
            @staticmethod
            @hf_tokplug.hookimpl
            def tokplug_register_token_inits(register):
                register("zero", init_zero)  # now `init="zero"` works in any plugin's add_tokens call
    """


@_spec("setup", "broadcast")
def tokplug_register_commands(register: Callable[..., None]) -> None:
    """Add ``tokplug`` subcommands: ``register(name, help, configure, run)``.

    ``configure(parser)`` adds arguments to an :class:`argparse.ArgumentParser`; ``run(args) -> int`` executes
    the command and returns the exit code.

    Fires: once when the ``tokplug`` CLI builds its parser.
    Rule: broadcast, on every installed plugin. A name that clashes with a built-in command is an error.

    Example::

        @staticmethod
        @hf_tokplug.hookimpl
        def tokplug_register_commands(register):
            def configure(parser):
                parser.add_argument("corpus")

            def run(args):
                print("training on", args.corpus)
                return 0

            register("my-train-tokenizer", "train a tokenizer", configure, run)  # tokplug my-train-tokenizer FILE
    """


@_spec("setup", "broadcast")
def tokplug_validate(ctx: RunContext) -> None:
    """Check the task and the combination of plugins; raise :class:`hf_tokplug.PluginError` for bad input.

    Every enabled plugin's validated config is available (``self.config``); no tokenizer, model or data has been
    loaded. What the task is: ``ctx.traits`` (:class:`hf_tokplug.plugin.TaskTraits`: model kind, label shift, batch
    fields, trains, ...): check it with ``ctx.traits.require(self.name, task=ctx.task, ...)``, which raises an error
    naming the missing trait; never compare ``ctx.task`` with a task's name (a task from another package would get
    the wrong behaviour). ``ctx.traits`` is ``None`` only when ``hf_tokplug.apply`` could not tell the model's kind.
    ``ctx.recipe`` is the validated recipe in recipe runs and ``None`` under ``hf_tokplug.apply`` and
    ``from_pretrained``. Name the key (``where=self.where`` is ``plugins.<name>``) and the fix in the error.

    Fires: after the task's own checks, before any weights or data load (also in ``tokplug validate`` and
    ``hf_tokplug.apply``).
    Rule: broadcast.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_validate(self, ctx):
            if ctx.traits is not None:  # heads predict token t+1+i: a causal LM with token-level labels
                ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True)
            if ctx.recipe is not None and ctx.recipe.adapter is None and self.config.heads_trainable:
                raise hf_tokplug.PluginError("heads_trainable needs an adapter", where=self.where,
                                             fix="add an adapter block or set heads_trainable: false")
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

    Example::

        @hf_tokplug.hookimpl
        def tokplug_load_tokenizer(self, ctx):
            return AutoTokenizer.from_pretrained(self.config.tokenizer)  # ctx.base_tokenizer keeps the old one
    """


@_spec("tokenizer", "broadcast")
def tokplug_prepare_tokenizer(ctx: RunContext, tokenizer: Any) -> None:
    """Modify the tokenizer in place (add special tokens, set templates).

    Add tokens with :func:`hf_tokplug.plugin.add_tokens` so that the model side resizes and initialises them:
    ``add_tokens(ctx, tokenizer, tokens, *, plugin, special=True, init="mean", init_options=None, trainable=True)``
    returns the ids of all ``tokens`` in order (tokens the tokenizer already has keep their ids and are not
    recorded). ``special=True`` adds them as special tokens (``skip_special_tokens`` removes them when decoding);
    ``init`` names a registered token-init strategy and ``init_options`` its keyword arguments (JSON-serialisable:
    they are saved in tokplug.json); ``trainable=True`` puts their rows in PEFT's ``trainable_token_indices`` under
    LoRA (and an untied LM head in ``modules_to_save``). The task's own tokens (e.g. a mask token) are added first.

    Fires: once per run, after the tokenizer is loaded and before the model is loaded.
    Rule: broadcast.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_prepare_tokenizer(self, ctx, tokenizer):
            pads = [f"<pad_{i}>" for i in range(self.config.num_pads)]
            self.pad_ids = hf_tokplug.add_tokens(ctx, tokenizer, pads, plugin=self.name, init="copy",
                                                 init_options={"token": tokenizer.eos_token, "noise_std": 0.01})
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

    Example (TokenAdapt, abridged)::

        @hf_tokplug.hookimpl
        def tokplug_adapt_embeddings(self, ctx, model):
            if ctx.tokenizer is not ctx.base_tokenizer:
                self.report = transplant(model, ctx.base_tokenizer, ctx.tokenizer, self.config)
    """


@_spec("model", "chain", "model")
def tokplug_prepare_model(ctx: RunContext, model: Any) -> Any:
    """Modify or replace the base model (before adapters). Return a replacement, or ``None`` to keep it.

    The host has already resized the embeddings for tokens recorded in ``ctx.added_tokens`` and initialised their
    rows with the requested strategy before this hook fires. A returned replacement is the model from then on
    (``ctx.model``, the adapter, the trainer, the saved folder). For a diffusion task the model is the task's
    module (``model.unet``, ``model.text_encoder``, ``model.vae``, ``model.tokenizer``).

    Fires: once per run, after the model is loaded and new token rows are initialised (also in ``apply``).
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
    """Transform one split of the task's examples, as the trainer will see them.

    Language tasks pass a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (plus the raw columns); a
    diffusion task a list of example dicts; the fields are the task's ``ctx.traits.batch_fields``. Return a
    replacement or ``None`` to keep it. ``split`` is ``"train"`` or ``"eval"``. Own trainers: ``ctx.prepare_dataset``.

    Fires: once per split, after the task has tokenized it (also in ``tokplug preview``); not for tasks whose traits
    have ``dataset_hooks=False``.
    Rule: chain on ``dataset``.
    """


@_spec("data", "chain", "collator")
def tokplug_wrap_collator(ctx: RunContext, collator: Callable[[list[dict]], dict]) -> Any:
    """Wrap the data collator: return a callable that usually calls the one it received. ``None`` keeps it.

    Wrap rather than replace: the collator you receive may already carry another plugin's behaviour. Own
    trainers: ``ctx.attach(trainer)`` wraps the trainer's ``data_collator`` unless it already came from
    ``ctx.wrap_collator(collator)``.

    Fires: once per run, after the datasets are prepared (also in ``tokplug preview``, ``ctx.wrap_collator`` and
    ``ctx.attach``).
    Rule: chain on ``collator``.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_wrap_collator(self, ctx, collator):
            def collate(examples):
                batch = collator(examples)
                batch["labels"][batch["labels"] == ctx.tokenizer.pad_token_id] = -100
                return batch

            return collate
    """


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------


@_spec("train", "merge")
def tokplug_loss_terms(ctx: RunContext, model: Any, inputs: dict, outputs: Any, batch: Any) -> dict[str, Any] | None:
    """Return named extra loss terms for this micro-batch, already weighted: ``{"name": value}``.

    A value is a scalar tensor (a mean over this micro-batch, divided by the accumulation steps when the trainer
    leaves that to the loss) or a :class:`hf_tokplug.TokenLoss` ``(sum, count)``: ``sum`` over this micro-batch's
    tokens, ``count`` the number of tokens in it. The *gradient* uses ``sum`` normalised exactly like the main
    token loss (divided by ``num_items_in_batch``, the label tokens of the whole optimizer step on all ranks, when
    the trainer does so), so gradient accumulation stays exact; ``count`` only makes the *logged* value
    ``sum / count``, a per-token mean. ``outputs`` is a :class:`hf_tokplug.plugin.ForwardCapture` with the main
    loss, the model's own output, the backbone's last hidden state and ``shift`` (the task's
    ``traits.label_shift``: output t is scored against label t + shift; 1 for causal LMs, 0 for masked-diffusion
    LMs). ``batch`` is a :class:`hf_tokplug.plugin.TokenBatch`, the same view whichever trainer runs (SFT, DPO,
    reward, GRPO, a plain ``Trainer``): ``batch.labels`` (input frame, ``-100`` where nothing is scored),
    ``batch.scored`` / ``batch.targets`` (output frame), ``batch.roles`` (``sft``, ``chosen``, ``rejected``,
    ``policy``), ``batch.advantages``; read it rather than trainer-specific keys of ``inputs`` (a DPO batch has no
    ``labels``). Return ``None`` or ``{}`` to add nothing. A method that changes the main objective's form rather
    than adding to it returns a :class:`hf_tokplug.plugin.MainLoss` (at most one plugin per run): it replaces the
    trainer's main loss of the micro-batch, and the other terms are added to it. Metrics that are not losses: ``self.log(ctx, name,
    value, split)`` (logged as ``<plugin>/<name>``; pass ``split="train" if model.training else "eval"``).

    Fires: on every training and evaluation micro-batch, after the main loss is computed (tasks whose traits
    have ``trainer=True``).
    Rule: merge; keys are namespaced as ``<plugin>/<name>``; the values are summed into the loss and logged
    one by one.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
            mask = batch.scored  # (B, T): output positions the trainer scores
            per_token = self.head_loss(outputs.last_hidden_state, batch.targets)  # (B, T), your own computation
            self.log(ctx, "tokens", float(mask.sum()), "train" if model.training else "eval")
            return {"head_1": hf_tokplug.TokenLoss(self.config.weight * per_token[mask].sum(), mask.sum())}
    """


@_spec("train", "product")
def tokplug_token_weights(ctx: RunContext, batch: Any) -> Any:
    """Return a weight per scored token of this micro-batch for the *main* loss, or ``None`` (all 1).

    ``batch`` is the :class:`hf_tokplug.plugin.TokenBatch` of the forward (``batch.scored``, ``batch.targets``,
    ``batch.roles``, ``batch.advantages``); return a ``(B, T)`` tensor in the same output frame (weights at
    positions that are not scored are ignored). The host multiplies every plugin's weights and applies them inside
    the task's own main loss, keeping the trainer's normalisation: SFT cross-entropy per token (divided by
    ``num_items_in_batch`` as before), DPO's per-token log-probabilities before their sums (policy and reference,
    so ``sum_t w_t (log pi - log pi_ref)``, whatever the loss type), GRPO's per-token policy term (exact on-policy,
    ``num_iterations: 1``), the masked-diffusion LLaDA loss per masked token. All weights 1 gives the unweighted
    losses exactly; a weight 0 removes exactly that token's gradient. Weights carry no gradient (they are
    detached).

    Fires: on every training and evaluation micro-batch, before the forward (tasks whose traits have
    ``token_weights=True``; on your own trainer, TRL's SFT, DPO and GRPO trainers).
    Rule: product (several plugins' weights multiply).

    Example::

        @hf_tokplug.hookimpl
        def tokplug_token_weights(self, ctx, batch):
            weights = torch.ones(batch.targets.shape, device=batch.targets.device)
            weights[batch.targets == self.noise_id] = 0.0  # never learn to emit the noise token
            return weights
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

    Record every file written with ``ctx.add_state_file(plugin_name, filename)`` so the manifest lists it. Write
    with ``hf_tokplug.plugin.write_json_atomic`` / safetensors' ``save_file``.

    Fires: for the final output folder and for every trainer checkpoint (through ``TokPlugCallback``).
    Rule: broadcast.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_save(self, ctx, output_dir):
            safetensors.torch.save_file(self.heads.state_dict(), os.path.join(output_dir, "heads.safetensors"))
            ctx.add_state_file(self.name, "heads.safetensors")
    """


@_spec("results", "broadcast")
def tokplug_restore(ctx: RunContext, model_dir: str) -> None:
    """Restore this plugin's state from ``model_dir`` (written by ``tokplug_save``).

    ``ctx.model`` and ``ctx.tokenizer`` are loaded; the plugin's config comes from the manifest. A folder may lack
    your files (saved before your plugin had state, or by a config that saves none): check before reading.

    Fires: in ``hf_tokplug.from_pretrained`` (after the task loaded the model) and when a run resumes from a
    checkpoint (at the start of training).
    Rule: broadcast.

    Example::

        @hf_tokplug.hookimpl
        def tokplug_restore(self, ctx, model_dir):
            path = os.path.join(model_dir, "heads.safetensors")
            if os.path.isfile(path):
                self.heads.load_state_dict(safetensors.torch.load_file(path))
    """


@_spec("results", "extend")
def tokplug_model_card(ctx: RunContext) -> list[str] | None:
    """Return Markdown sections for the model card (usage notes, results, the method's citation is automatic).

    Fires: once per saved output folder, when README.md is written.
    Rule: extend (the lists are concatenated).
    """
