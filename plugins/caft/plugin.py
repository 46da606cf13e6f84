"""The ``caft`` plugin: builds/loads the heads, adds their losses through ``tokplug_loss_terms``, saves them."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from hf_tokplug.plugin import Plugin, PluginError, TokenLoss, hookimpl, local_folder, peft_base, write_json_atomic

from .config import CAFTConfig
from .heads import CAFTHeads, build_heads, head_losses

HEADS_FILE = "caft_heads.safetensors"
META_FILE = "caft_heads.json"
ATTR = "caft_heads"


def schedule_value(name: str, step: int, total: int) -> float:
    """s(step) for a schedule; T = total steps (see CAFTConfig.schedule)."""
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    return {
        "rsine": math.sin((1.0 - frac) * math.pi / 2),
        "sine": math.sin(frac * math.pi / 2),
        "linear": 1.0 - frac,
        "linear_up": frac,
        "constant": 1.0,
    }[name]


STAGE_A_FIX = "run Stage A first (e.g. tokplug run recipes/caft_heads.yaml) and point heads_path at its output folder"


def _resolve_heads_dir(location: str) -> Path:
    return local_folder(location, what="heads_path", where="plugins.caft.heads_path", fix=STAGE_A_FIX,
                        allow_patterns=[HEADS_FILE, META_FILE])


class CAFTPlugin(Plugin):
    config_class = CAFTConfig
    paper = "https://github.com/michaelchen-lab/caft-llm"
    citation = """@misc{caft2025,
  title={Improving large language models with concept-aware fine-tuning},
  year={2025},
  howpublished={\\url{https://github.com/michaelchen-lab/caft-llm}}
}"""
    test_configs = {"noop": {"alpha": 0.0}, "active": {"num_heads": 2, "train_heads": True, "alpha": 0.1}}

    def __init__(self, name: str, config: CAFTConfig):
        super().__init__(name, config)
        self.heads: CAFTHeads | None = None

    @property
    def active(self) -> bool:
        return self.config.num_heads > 0 and self.config.weight > 0

    def meta(self, model: Any) -> dict[str, Any]:
        cfg = model.config.get_text_config()
        return {
            "num_heads": self.config.num_heads, "head_type": self.config.head_type,
            "init_layer": self.config.init_layer, "unembedding": self.config.unembedding,
            "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "vocab_size": model.get_output_embeddings().weight.shape[0],
            "head_input": "final hidden state after the backbone's norm",
        }

    # ------------------------------------------------------------------------------------------------ checks

    @hookimpl
    def tokplug_validate(self, ctx):
        where = self.where
        if ctx.traits is not None:  # heads predict token t+1+i from a causal LM's states, scored on token labels
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True)
            if self.active and not set(self.config.roles) & set(ctx.traits.roles):
                raise PluginError(
                    f"caft trains its heads on rows with roles {self.config.roles}; task {ctx.task!r}'s rows are "
                    f"{list(ctx.traits.roles)}", where=f"{where}.roles",
                    fix=f"set roles to include one of {list(ctx.traits.roles)} (e.g. roles: [{ctx.traits.roles[0]}])")
        if not self.active:
            return
        adapter = ctx.recipe.adapter if ctx.recipe is not None else None
        if self.config.stage == "heads" and adapter is not None:
            raise PluginError(
                "stage heads trains the heads on a frozen base model; an adapter would be trained too",
                where=where, fix="remove the adapter block (~adapter) for Stage A",
            )
        if self.config.stage == "finetune" and self.config.heads_path is None and not self.config.train_heads:
            raise PluginError(
                "stage finetune with frozen heads needs trained heads",
                where=f"{where}.heads_path",
                fix="run Stage A (recipes/caft_heads.yaml) and set heads_path to its output, or set train_heads: true",
            )
        local = Path(self.config.heads_path or "").expanduser()
        if self.config.heads_path and local.is_dir() and not (local / HEADS_FILE).is_file():
            raise PluginError(f"no {HEADS_FILE} in {local}", where=f"{where}.heads_path", fix=STAGE_A_FIX)

    # ------------------------------------------------------------------------------------------------ model

    @hookimpl
    def tokplug_prepare_model(self, ctx, model):
        # Before any adapter: the heads copy clean decoder layers, and are attached as a submodule so the
        # optimizer, checkpoints and device moves see them.
        if not self.active:
            return None
        heads = build_heads(model, self.config.num_heads, self.config.head_type, self.config.init_layer,
                            self.config.unembedding)
        if self.config.heads_path is not None:
            self.load_heads(heads, _resolve_heads_dir(self.config.heads_path), model)
        setattr(model, ATTR, heads)
        self.heads = heads
        return None

    @hookimpl
    def tokplug_adapter_config(self, ctx, peft_config):
        if self.heads is None:
            return None
        # Keep the heads out of LoRA (all-linear would otherwise wrap their projections).
        ours = rf"(.*\.)?{ATTR}\..*"
        current = peft_config.exclude_modules
        if current is None:
            peft_config.exclude_modules = ours
        elif isinstance(current, str):
            peft_config.exclude_modules = f"(?:{current})|(?:{ours})"
        else:
            names = "|".join(re.escape(n) for n in current)
            peft_config.exclude_modules = rf"(?:(.*\.)?(?:{names}))|(?:{ours})"
        return peft_config

    @hookimpl
    def tokplug_post_model_load(self, ctx, model):
        if self.heads is None:
            return
        if self.config.stage == "heads":
            for p in model.parameters():
                p.requires_grad_(False)
            self.heads.requires_grad_(True)
        else:
            self.heads.requires_grad_(self.config.train_heads)
            if ctx.recipe is not None and ctx.recipe.adapter is None and not self.config.train_lm_head:
                peft_base(model).get_output_embeddings().requires_grad_(False)

    def load_heads(self, heads: CAFTHeads, folder: Path, base: Any) -> None:
        meta_path, weights = folder / META_FILE, folder / HEADS_FILE
        if not weights.is_file():
            raise PluginError(f"no {HEADS_FILE} in {folder}", where=f"{self.where}.heads_path",
                              fix="point heads_path at the output folder of a Stage A (stage: heads) run")
        saved = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        mine = self.meta(base)
        clash = {k: (saved[k], mine[k]) for k in ("num_heads", "head_type", "unembedding", "hidden_size", "vocab_size")
                 if k in saved and saved[k] != mine[k]}
        if clash:
            raise PluginError(f"heads in {folder} do not fit this model/config: {clash} (saved, here)",
                              where=f"{self.where}.heads_path", fix="train heads for this model and config")
        heads.load_state_dict(load_file(str(weights), device=str(base.get_output_embeddings().weight.device)))

    # ------------------------------------------------------------------------------------------------ loss

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
        if not self.active or self.heads is None:
            return None
        if outputs.last_hidden_state is None:
            raise PluginError("caft needs the backbone's hidden states, which this model does not expose")
        state = ctx.trainer.state if ctx.trainer is not None else None
        s = schedule_value(self.config.schedule_name, state.global_step, state.max_steps) if state else 1.0
        base = peft_base(ctx.model)
        batch = batch.only(*self.config.roles)  # e.g. a preference pair's chosen completions only
        losses = head_losses(self.heads, base, outputs.last_hidden_state, batch.labels, batch.attention_mask,
                             self.config.chunk_size, self.config.checkpoint_heads)
        split = "train" if model.training else "eval"
        terms, selection = {}, 0.0
        for i, hl in enumerate(losses, start=1):
            weight = self.config.weight * self.config.beta**i * s
            terms[f"head_{i}"] = TokenLoss(weight * hl.loss_sum, hl.count)
            n = max(hl.count, 1)
            mean = float(hl.loss_sum.detach()) / n
            self.log(ctx, f"head_{i}_loss", mean, split)
            self.log(ctx, f"head_{i}_acc", float(hl.correct) / n, split)
            selection += self.config.beta**i * mean
        self.log(ctx, "selection", selection, split)  # sum_i beta^i loss_i: metric_for_best_model: caft/selection
        self.log(ctx, "schedule", s, split)
        return terms

    # ------------------------------------------------------------------------------------------------ results

    @hookimpl
    def tokplug_post_train(self, ctx, model):
        base = peft_base(model)
        if self.heads is not None and hasattr(base, ATTR):
            delattr(base, ATTR)  # the saved model is a plain HF model; the heads are saved on their own

    def saves_heads(self) -> bool:
        return self.heads is not None and (
            self.config.stage == "heads" or self.config.keep_heads or self.config.train_heads
        )

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if not self.saves_heads():
            return
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()},
                  os.path.join(output_dir, HEADS_FILE))
        write_json_atomic(Path(output_dir, META_FILE), self.meta(peft_base(ctx.model)))
        ctx.add_state_file(self.name, HEADS_FILE)
        ctx.add_state_file(self.name, META_FILE)

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        folder = Path(model_dir)
        if not (folder / HEADS_FILE).is_file() or self.config.num_heads == 0:
            return
        base = peft_base(ctx.model)
        if self.heads is None:  # hf_tokplug.from_pretrained: rebuild the heads on the restored model
            self.heads = build_heads(base, self.config.num_heads, self.config.head_type, self.config.init_layer,
                                     self.config.unembedding)
            setattr(base, ATTR, self.heads)
        self.load_heads(self.heads, folder, base)

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        return [
            "## CAFT (concept-aware fine-tuning)\n\n"
            f"Stage `{c.stage}` with {c.num_heads} auxiliary `{c.head_type}` heads (head i predicts token t+1+i from "
            f"the final hidden state), weights alpha={c.weight} x beta^i (beta={c.beta}), schedule `{c.schedule_name}`. "
            + ("The heads are saved beside the model (`caft_heads.safetensors`)." if self.saves_heads()
               else "The heads were dropped: this is a plain model.")
        ]
