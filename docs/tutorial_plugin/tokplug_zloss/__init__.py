"""z-loss (PaLM, Chowdhery et al. 2022, sec. 5): ``weight * log(Z)^2`` keeps the softmax normaliser near 1.

The hf_tokplug tutorial plugin (docs/writing-a-plugin.md walks through it). It shows a config class, a validation
hook, a loss term computed from the captured hidden states, a logged metric, state saved with every checkpoint
and restored by ``hf_tokplug.from_pretrained``, and a model-card section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import Field

from hf_tokplug.plugin import Plugin, PluginConfig, TokenLoss, hookimpl, output_logits, write_json_atomic


class ZLossConfig(PluginConfig):
    """Options of the ``zloss`` plugin.

    Args:
        weight: coefficient of ``log(Z)^2``; PaLM used 1e-4. ``0`` disables the term (the plugin does nothing).
        chunk_size: tokens per chunk when projecting hidden states to logits, to bound memory.
    """

    weight: float = Field(1e-4, ge=0.0, description="z-loss coefficient (PaLM: 1e-4); 0 disables it.")
    chunk_size: int = Field(1024, ge=1, description="Tokens per logits chunk.")


class ZLossPlugin(Plugin):
    config_class = ZLossConfig
    paper = "https://arxiv.org/abs/2204.02311"
    citation = """@article{chowdhery2022palm,
  title={PaLM: Scaling Language Modeling with Pathways},
  author={Chowdhery, Aakanksha and others},
  journal={arXiv preprint arXiv:2204.02311},
  year={2022}
}"""
    # Configurations the hf_tokplug conformance suite runs: `noop` must leave training bit-identical.
    test_configs = {"noop": {"weight": 0.0}, "active": {"weight": 0.1}}

    def __init__(self, name, config):
        super().__init__(name, config)
        self.log_z_sum = 0.0  # running statistics, saved with checkpoints
        self.log_z_count = 0

    @hookimpl
    def tokplug_validate(self, ctx):
        # The term is computed on token positions that carry labels: ask the task's traits, never its name.
        # (ctx.traits is None when hf_tokplug.apply could not tell what the model is: nothing to check then.)
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, token_labels=True)

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
        if self.config.weight == 0 or outputs.last_hidden_state is None:
            return None
        # batch.scored: the output positions the trainer scores, whatever the trainer (SFT labels, DPO's chosen and
        # rejected completions, GRPO samples), already aligned by the task's label shift (1 causal, 0 diffusion)
        hidden = outputs.last_hidden_state  # (B, T, H)
        mask = batch.scored[:, -hidden.shape[1]:]  # (B, T)
        rows = hidden[mask]  # (N, H)
        total = rows.new_zeros(())
        for start in range(0, rows.shape[0], self.config.chunk_size):
            # the model's own logits (output layer, and Gemma's soft-capping where the model has it)
            logits = output_logits(ctx.model, rows[start : start + self.config.chunk_size])
            log_z = torch.logsumexp(logits, dim=-1)
            total = total + (log_z.float() ** 2).sum()
            self.log_z_sum += float(log_z.detach().float().sum())
        self.log_z_count += int(rows.shape[0])
        if model.training:
            self.log(ctx, "mean_log_z", self.log_z_sum / max(self.log_z_count, 1))  # logged as zloss/mean_log_z
        return {"z": TokenLoss(self.config.weight * total, rows.shape[0])}

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        state = {"log_z_sum": self.log_z_sum, "log_z_count": self.log_z_count}
        write_json_atomic(Path(output_dir, "zloss_state.json"), state)  # readers never see half a file
        ctx.add_state_file(self.name, "zloss_state.json")

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        path = os.path.join(model_dir, "zloss_state.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            self.log_z_sum, self.log_z_count = state["log_z_sum"], state["log_z_count"]

    @hookimpl
    def tokplug_model_card(self, ctx):
        mean = self.log_z_sum / max(self.log_z_count, 1)
        return [f"## z-loss\n\nTrained with z-loss weight {self.config.weight}; mean log Z over training: {mean:.4f}."]
