"""What a task is, declared by the task and checked by plugins: :class:`TaskTraits`.

A plugin never matches task names: it asks the run's traits (``ctx.traits``) for what it needs, with
:meth:`TaskTraits.require`, so a task an outside package registers works with every plugin whose needs its traits
meet, and gets an error naming the missing trait otherwise. ``ctx.traits`` is set before ``tokplug_validate``
fires (recipe runs, ``hf_tokplug.apply``, ``hf_tokplug.from_pretrained``); it is ``None`` only when the kind of
model could not be told (``apply`` on a model no registered task declares), and checks then pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import PluginError

#: Model kinds a task can declare.
#:
#: - ``causal_lm``: a decoder with an LM head, trained left to right (``AutoModelForCausalLM``).
#: - ``masked_lm``: a bidirectional model with per-position logits (masked-diffusion LMs, ``AutoModelForMaskedLM``).
#: - ``encoder``: an encoder without an LM head (``AutoModel``, ``...ForSequenceClassification``).
#: - ``causal_classifier``: a causal-LM backbone with a sequence-classification head, scoring at the last real token
#:   (reward models: ``LlamaForSequenceClassification``).
#: - ``diffusion_unet``: a Diffusers denoising UNet with its text encoder and VAE.
MODEL_KINDS = ("causal_lm", "masked_lm", "encoder", "causal_classifier", "diffusion_unet")
ADAPTERS = ("optional", "required", "none")
GENERATES = (None, "text", "images")


@dataclass(frozen=True)
class TaskTraits:
    """A task's declaration of what it is (``Runner.traits``); plugins validate against it.

    Args:
        model_kind: one of :data:`MODEL_KINDS` (causal_lm, masked_lm, encoder, causal_classifier, diffusion_unet).
        label_shift: output position t is scored against ``labels[:, t + label_shift]``: 1 for causal LMs, 0 for
            masked-diffusion LMs; ``None`` when the task has no token-level labels (sequence labels, images).
        batch_fields: the keys of a training batch (the collator's output) that plugins may read or change, e.g.
            ``("input_ids", "labels", "pad_mask")``.
        trains: the task updates weights (``tokplug_post_train`` fires after training).
        trainer: a transformers ``Trainer`` runs the loop (``tokplug_callbacks``, ``tokplug_post_trainer_create``
            and ``tokplug_loss_terms`` fire, checkpoints carry plugin state).
        dataset_hooks: the task's examples pass ``tokplug_prepare_dataset`` and ``tokplug_wrap_collator``.
        builds_model: the task loads a model (the model-phase hooks fire).
        adapter: ``optional`` (a recipe's ``adapter:`` block adds LoRA), ``required`` (the task always trains an
            adapter) or ``none`` (an ``adapter:`` block is an error).
        generates: what the task itself produces: ``"text"``, ``"images"`` or ``None``.
        token_weights: the task's main loss applies ``tokplug_token_weights`` per token (SFT, DPO, GRPO, masked
            diffusion); a plugin returning weights is refused on a task without it.
        roles: the roles its batch rows take (:class:`hf_tokplug.plugin.TokenBatch`): ``"sft"``, ``"chosen"`` /
            ``"rejected"`` (preference pairs), ``"policy"`` (RL samples); ``("sft",)`` by default.
    """

    model_kind: str
    label_shift: int | None = 1
    batch_fields: tuple[str, ...] = ("input_ids", "attention_mask", "labels")
    trains: bool = True
    trainer: bool = True
    dataset_hooks: bool = True
    builds_model: bool = True
    adapter: str = "optional"
    generates: str | None = None
    roles: tuple[str, ...] = ("sft",)
    token_weights: bool = False

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.generates not in GENERATES:
            raise ValueError(f"generates must be one of {GENERATES}, got {self.generates!r}")

    @property
    def token_labels(self) -> bool:
        """The task scores tokens: its batches' :class:`~hf_tokplug.plugin.TokenBatch` carries token-level labels
        aligned with the outputs by ``label_shift`` (SFT labels, DPO's completions, GRPO's samples)."""
        return self.label_shift is not None

    def with_(self, **changes: Any) -> TaskTraits:
        """A copy with some traits changed (a task whose model kind depends on the recipe's model)."""
        return replace(self, **changes)

    def skipped_hooks(self, *, adapter: bool = True, renders: bool = True) -> frozenset[str]:
        """Lifecycle hooks a run of this task never fires (``adapter``: the run attaches one; ``renders``: it draws
        images). Inference hooks (``tokplug_prepare_generation``, ``tokplug_postprocess_text``) fire only from the
        inference functions, and ``tokplug_restore`` only when a folder is restored."""
        skipped: set[str] = set()
        if not self.builds_model:
            skipped |= {"tokplug_load_model", "tokplug_adapt_embeddings", "tokplug_prepare_model",
                        "tokplug_adapter_config", "tokplug_post_model_load"}
        if self.adapter == "none" or not adapter and self.adapter != "required":
            skipped.add("tokplug_adapter_config")
        if not self.dataset_hooks:
            skipped |= {"tokplug_prepare_dataset", "tokplug_wrap_collator"}
        if not self.trainer:
            skipped |= {"tokplug_callbacks", "tokplug_post_trainer_create", "tokplug_loss_terms"}
        if not self.trains:
            skipped.add("tokplug_post_train")
        if self.generates != "images" or not renders:
            skipped.add("tokplug_prepare_pipeline")
        return frozenset(skipped)

    def require(self, plugin: str, *, task: str | None = None, model_kind: str | tuple[str, ...] | None = None,
                token_labels: bool | None = None, batch_fields: tuple[str, ...] = (), trains: bool | None = None,
                trainer: bool | None = None, roles: tuple[str, ...] = ()) -> None:
        """Raise :class:`hf_tokplug.PluginError` naming the first trait this task lacks for ``plugin``.

        Example (in ``tokplug_validate``)::

            if ctx.traits is not None:
                ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True)
        """
        name = f"task {task!r}" if task else "this task"
        where = f"plugins.{plugin}"
        if model_kind is not None:
            kinds = (model_kind,) if isinstance(model_kind, str) else tuple(model_kind)
            if self.model_kind not in kinds:
                raise PluginError(
                    f"plugin {plugin!r} needs a task with model_kind {' or '.join(kinds)}; {name} has model_kind "
                    f"{self.model_kind!r}", where=where,
                    fix=f"use a task whose traits have model_kind {kinds[0]!r} (`tokplug recipes ls`), or remove the plugin")
        if token_labels is not None and self.token_labels != token_labels:
            has = "has" if self.token_labels else "has no"
            raise PluginError(
                f"plugin {plugin!r} needs a task {'with' if token_labels else 'without'} token-level labels; {name} "
                f"{has} token-level labels (label_shift={self.label_shift}, batch_fields={list(self.batch_fields)})",
                where=where, fix="use a task that fits the plugin, or remove the plugin")
        absent = [r for r in roles if r not in self.roles]
        if absent:
            raise PluginError(
                f"plugin {plugin!r} needs rows with role(s) {absent}; {name}'s rows are {list(self.roles)}",
                where=where, fix="use a task whose batches carry them (preference pairs: preference_dpo), or remove "
                "the plugin")
        missing = [f for f in batch_fields if f not in self.batch_fields]
        if missing:
            raise PluginError(
                f"plugin {plugin!r} needs batch field(s) {missing}; {name}'s batches carry {list(self.batch_fields)}",
                where=where, fix="use a task whose batches carry them, or remove the plugin")
        for trait, wanted in (("trains", trains), ("trainer", trainer)):
            if wanted is not None and getattr(self, trait) != wanted:
                raise PluginError(
                    f"plugin {plugin!r} needs a task with {trait}={wanted}; {name} has {trait}={getattr(self, trait)}",
                    where=where, fix="use a task that fits the plugin, or remove the plugin")
