"""The ``tara`` plugin: token-masked LoRA for diffusion-UNet training tasks, the token alignment loss, adapter
metadata, and training-free composition of several TARA adapters in a Diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_tokplug.plugin import SD_ATTENTION_TARGETS, Plugin, PluginError, hookimpl, write_json_atomic

from .config import TARAConfig
from .masking import (META_FILE, MaskState, compose, cross_attention_layers, install, patch_pipeline, read_meta,
                      token_mask, word_ids)



class TARAPlugin(Plugin):
    config_class = TARAConfig
    citation = """@inproceedings{tara2026,
  title={TARA: Token-Aware LoRA for Composable Personalization in Diffusion Models},
  booktitle={AAAI Conference on Artificial Intelligence},
  year={2026}
}"""
    test_configs = {
        "noop": {"rare_token": "sks", "class_word": "square", "mask": False, "align_weight": 0.0},
        "active": {"rare_token": "sks", "class_word": "square"},
    }
    test_traits = {"model_kind": "diffusion_unet", "trains": True}  # conformance: a diffusion training task

    def __init__(self, name: str, config: TARAConfig | None = None):
        super().__init__(name, config)
        self.state: MaskState | None = None
        self.captured: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.class_variants: list[list[int]] | None = None
        self.rare_variants: list[list[int]] | None = None

    @property
    def training(self) -> bool:
        return self.config.rare_token is not None

    # ------------------------------------------------------------------------------------------------ setup

    @staticmethod
    @hookimpl
    def tokplug_register_commands(register):
        from .cli import configure_generate, run_generate

        register("tara-generate", "render images with composed TARA adapters", configure_generate, run_generate)

    @hookimpl
    def tokplug_validate(self, ctx):
        c = self.config
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, model_kind="diffusion_unet")
        if ctx.traits is not None and ctx.traits.trains:
            if not c.rare_token or not c.class_word:
                raise PluginError("TARA training needs rare_token and class_word", where=self.where,
                                  fix="e.g. rare_token: sks, class_word: dog (the instance prompt names both)")
            # the training prompt, when the task takes one in its options (DreamBooth-style tasks)
            prompt = ((ctx.recipe.task_options or {}) if ctx.recipe is not None else {}).get("instance_prompt")
            words = (prompt or "").split()
            if prompt is not None and c.rare_token not in words:
                raise PluginError(f"the instance prompt {prompt!r} does not contain the rare token {c.rare_token!r}",
                                  where=f"{self.where}.rare_token", fix="put the rare token in task_options.instance_prompt")
            if prompt is not None and c.align_weight > 0 and c.class_word not in words:
                raise PluginError(
                    f"the token alignment loss needs the class word {c.class_word!r} in the instance prompt {prompt!r}",
                    where=f"{self.where}.class_word",
                    fix="use a prompt like 'a photo of sks dog', or set align_weight: 0")
        for ref in c.compose:
            if ref.startswith((".", "/", "~")) and not (Path(ref).expanduser() / META_FILE).is_file():
                raise PluginError(f"{ref} is not a TARA adapter folder (no {META_FILE})", where=f"{self.where}.compose",
                                  fix="list output folders of diffusion LoRA runs trained with the tara plugin")

    # ------------------------------------------------------------------------------------------------ training

    @hookimpl
    def tokplug_adapter_config(self, ctx, peft_config):
        targets = peft_config.target_modules
        names = set(targets) if isinstance(targets, (list, set, tuple)) else set()
        if {"to_k", "to_v"} - names:
            raise PluginError(f"TARA masks the cross-attention to_k/to_v LoRA, but the adapter targets {targets!r}",
                              where="adapter.target_modules", fix=f"use target_modules: {SD_ATTENTION_TARGETS}")
        return None

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        if not self.training or not hasattr(model, "unet"):
            return
        self.rare_variants = word_ids(model.tokenizer, self.config.rare_token)
        # mask off: plain LoRA, no concept is masked, but the prompt ids are still recorded for the alignment loss
        concepts = {"default": self.config.rare_token} if self.config.mask else {}
        self.state = install(model.unet, model.text_encoder, model.tokenizer, concepts)
        self.class_variants = word_ids(model.tokenizer, self.config.class_word)
        if self.config.align_weight > 0:
            for name, module in cross_attention_layers(model.unet).items():
                if name.endswith("to_k"):
                    module.register_forward_hook(self._capture_key, with_kwargs=True)

    def _capture_key(self, module, args, kwargs, output):
        if module.training and torch.is_grad_enabled():
            x = kwargs.get("x", args[0] if args else None)
            self.captured.append((module, x, output))

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs):
        captured, self.captured = self.captured, []
        if self.config.align_weight <= 0 or not captured or self.state is None or self.state.input_ids is None:
            return None
        ids = self.state.input_ids
        rare = token_mask(ids, self.rare_variants)  # (B, T)
        cls = token_mask(ids, self.class_variants)
        rows = (rare.sum(1) > 0) & (cls.sum(1) > 0)  # prior-preservation rows have no rare token
        if not rows.any():
            return None
        losses = []
        for module, x, key in captured:
            with torch.no_grad():
                base = module.base_layer(x)  # the frozen key of every position
            r, c = rare[rows].unsqueeze(-1).to(key.dtype), cls[rows].unsqueeze(-1).to(key.dtype)
            rare_key = (key[rows] * r).sum(1) / r.sum(1)  # (b, D): mean over the rare word's sub-tokens
            class_key = (base[rows] * c).sum(1) / c.sum(1)
            losses.append((rare_key - class_key).abs().mean())
        return {"tara_align": self.config.align_weight * torch.stack(losses).mean()}

    # ------------------------------------------------------------------------------------------------ inference

    @hookimpl
    def tokplug_prepare_pipeline(self, ctx, pipeline):
        if self.config.compose:
            compose(pipeline, self.config.compose, fuse_global=self.config.fuse_global, cache_kv=self.config.cache_kv)
        elif self.state is not None and self.config.mask:
            patch_pipeline(pipeline, self.state)  # sample renders during / after training
        return pipeline

    # ------------------------------------------------------------------------------------------------ results

    def meta(self, ctx) -> dict[str, Any]:
        unet = getattr(ctx.model, "unet", ctx.model)
        config = unet.peft_config["default"] if unet is not None and hasattr(unet, "peft_config") else None
        return {"rare_token": self.config.rare_token, "class_word": self.config.class_word,
                "rank": getattr(config, "r", None), "alpha": getattr(config, "lora_alpha", None),
                "target_modules": sorted(getattr(config, "target_modules", []) or []),
                "masked": ["attn2.to_k", "attn2.to_v"] if self.config.mask else [],
                "align_weight": self.config.align_weight}

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if not self.training or ctx.model is None:
            return
        write_json_atomic(Path(output_dir, META_FILE), self.meta(ctx))
        ctx.add_state_file(self.name, META_FILE)

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        if not (Path(model_dir) / META_FILE).is_file() or ctx.pipeline is None:
            return
        meta = read_meta(model_dir)
        if meta.get("masked"):
            pipe = ctx.pipeline
            self.state = install(pipe.unet, pipe.text_encoder, pipe.tokenizer, {"default": meta["rare_token"]})
            patch_pipeline(pipe, self.state)

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        if self.training:
            return [f"## TARA (token-aware LoRA)\n\nConcept `{c.rare_token}` (class `{c.class_word}`): the cross-attention "
                    f"K/V LoRA deltas apply only at `{c.rare_token}`'s sub-tokens" + ("" if c.mask else " (mask off)")
                    + f"; token alignment loss weight {c.align_weight}. Compose with other TARA adapters: "
                    "`tokplug tara-generate --adapter THIS --adapter OTHER --prompt ...`."]
        if c.compose:
            return ["## TARA composition\n\n" + "\n".join(f"- `{ref}`" for ref in c.compose)]
        return None
