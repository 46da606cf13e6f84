"""The ``dynamic_tokenization`` plugin: merges every batch on the fly in front of the model's embeddings.

Encoders (models without an LM head: ``AutoModel``, ``...ForSequenceClassification``): after the adapter is
attached, a forward pre-hook on the backbone turns ``input_ids`` into dynamic tokens (``inputs_embeds``) at a merge
level drawn per training batch from ``merges`` (``eval_merges`` in evaluation mode), so LoRA adapters learn to work
at any level; any Trainer, pipeline or plain ``model(**batch)`` call goes through it. Decoders keep their
``input_ids`` path (generation owns its positions): prefill with :func:`decoder.prefill_generate`, or generate over
an expanded vocabulary with the ``dyntok_generate`` task. The tasks ``dyntok_hypernet`` (train a hypernetwork) and
``dyntok_generate`` are registered here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from hf_tokplug.plugin import Plugin, PluginError, hookimpl, local_folder, peft_base

from .config import DynamicTokenizationConfig
from .embeddings import HYPERNET_FILE, HYPERNET_META, load_hypernet, save_hypernet
from .encoder import BackboneHook, DynamicEncoder

HYPERNET_FIX = "train one with `tokplug run recipes/dyntok_hypernet.yaml` and set plugins.dynamic_tokenization.hypernet_path to its output folder"


def resolve_hypernet(location: str, where: str) -> Path:
    """A local folder holding the hypernetwork, or a Hub repo fetched into the cache."""
    path = local_folder(location, what="hypernet_path", where=where, fix=HYPERNET_FIX,
                        allow_patterns=[HYPERNET_FILE, HYPERNET_META])
    if not (path / HYPERNET_FILE).is_file() or not (path / HYPERNET_META).is_file():
        raise PluginError(f"{path} has no {HYPERNET_FILE} + {HYPERNET_META}", where=where, fix=HYPERNET_FIX)
    return path


def backbone_of(model: Any) -> Any:
    base = peft_base(model)
    return getattr(base, base.base_model_prefix, base), base


class DynamicTokenizationPlugin(Plugin):
    config_class = DynamicTokenizationConfig
    paper = "https://arxiv.org/abs/2411.18553"
    citation = """@inproceedings{feher2025retrofitting,
  title={Retrofitting (Large) Language Models with Dynamic Tokenization},
  author={Feher, Darius and Vuli{\\'c}, Ivan and Minixhofer, Benjamin},
  booktitle={Proceedings of ACL},
  year={2025}
}"""
    test_configs = {"noop": {"merges": 0}, "active": {"merges": [0, 30], "eval_merges": 10}}
    test_traits = {"model_kind": "encoder", "token_labels": False, "trains": True}  # conformance: an encoder task

    def __init__(self, name: str, config: DynamicTokenizationConfig):
        super().__init__(name, config)
        self.rng = random.Random(0)
        self.encoder: DynamicEncoder | None = None
        self.hook: BackboneHook | None = None
        self.handle: Any = None
        self.hypernet_dir: Path | None = None  # resolved in tokplug_validate

    @staticmethod
    @hookimpl
    def tokplug_register_runners(register):
        from .tasks import DyntokGenerate, DyntokHypernet

        register(DyntokHypernet.task, DyntokHypernet)
        register(DyntokGenerate.task, DyntokGenerate)

    # ------------------------------------------------------------------------------------------------ checks

    @hookimpl
    def tokplug_validate(self, ctx):
        where = self.where
        traits = ctx.traits
        if traits is not None and self.config.active and traits.model_kind in ("causal_classifier", "masked_lm"):
            # a decoder's sequence head pools at the last real token of input_ids, which merging moves
            traits.require(self.name, task=ctx.task, model_kind=("encoder", "causal_lm"))
        if traits is not None and self.config.active and (traits.token_labels or traits.model_kind == "diffusion_unet"):
            # merging changes sequence lengths: token-level labels would no longer line up
            what = "token-level labels" if traits.token_labels else f"model_kind {traits.model_kind!r}"
            raise PluginError(
                f"dynamic tokenization changes sequence lengths, so it cannot serve task {ctx.task!r} ({what})",
                where=where,
                fix="use a task without token-level labels (sequence classification with an encoder; "
                    "dyntok_hypernet or dyntok_generate for decoders), or set merges: 0",
            )
        if self.config.embedding == "hypernet" and self.config.hypernet_path is None:
            raise PluginError("embedding: hypernet needs a trained hypernetwork", where=f"{where}.hypernet_path",
                              fix=HYPERNET_FIX)
        if self.config.hypernet_path is not None:  # before any weights load: a folder here, or fetched from the Hub
            self.hypernet_dir = resolve_hypernet(self.config.hypernet_path, f"{where}.hypernet_path")
        self.rng = random.Random(ctx.seed)

    @hookimpl
    def tokplug_prepare_tokenizer(self, ctx, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise PluginError(f"dynamic tokenization needs a fast (Rust) tokenizer for offsets; got {type(tokenizer).__name__}",
                              where=self.where, fix="load the tokenizer with use_fast=True")

    # ------------------------------------------------------------------------------------------------ model

    def level(self, training: bool) -> int:
        if not training:
            return self.config.evaluation_merges
        low, high = self.config.merge_range
        return self.rng.randint(low, high)

    def install(self, ctx: Any, model: Any, hypernet_dir: Path | None) -> None:
        if self.handle is not None:
            self.handle.remove()
        backbone, base = backbone_of(model)
        hypernet = load_hypernet(hypernet_dir, base) if hypernet_dir is not None else None
        self.encoder = DynamicEncoder(base, ctx.tokenizer, self.config.embedding, hypernet, self.config.mode,
                                      self.config.cache_size)
        if base.get_output_embeddings() is not None or not self.config.active:
            return  # a decoder keeps its ids path (see the module docstring); merges 0 installs nothing
        self.hook = BackboneHook(self.encoder, backbone, self.level)
        self.hook.on_batch = lambda training, before, after, floor: self.log_batch(ctx, training, before, after, floor)
        self.handle = backbone.register_forward_pre_hook(self.hook, with_kwargs=True)

    def log_batch(self, ctx: Any, training: bool, before: int, after: int, floor: int) -> None:
        split = "train" if training else "eval"
        self.log(ctx, "length_reduction", 1 - after / max(before, 1), split)
        self.log(ctx, "reduction_pct", 100 * (before - after) / max(before - floor, 1), split)

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        self.install(ctx, model, self.hypernet_dir)

    # ------------------------------------------------------------------------------------------------ results

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if self.encoder is None or self.encoder.hypernet is None:
            return
        save_hypernet(self.encoder.hypernet, output_dir, source=self.config.hypernet_path)
        ctx.add_state_file(self.name, HYPERNET_FILE)
        ctx.add_state_file(self.name, HYPERNET_META)

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        if ctx.model is None or ctx.tokenizer is None:
            return
        saved = Path(model_dir)
        has_net = (saved / HYPERNET_FILE).is_file()
        self.install(ctx, ctx.model, saved if has_net else None)

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        low, high = c.merge_range
        level = f"{low}" if low == high else f"{low}-{high} (drawn per batch)"
        return [f"## Dynamic tokenization\n\nBatch-level dynamic BPE in front of the embeddings: {level} merges per "
                f"training batch, {c.evaluation_merges} in evaluation, validity `{c.mode}`; dynamic-token rows by "
                f"`{c.embedding}`. Restore with `hf_tokplug.from_pretrained` to get the merging back."]
