"""TGDPO (Zhu et al., ICML 2025): DPO whose per-token log-ratios are weighted by a token-level reward.

With r_t = beta * (log pi_rm(y_t) - log pi_ref(y_t)) from a model pi_rm trained before with plain DPO (no gradient),
the chosen completion's tokens get f_t = 1 + alpha * r_t and the rejected one's f_t = 1 - alpha * r_t, inside DPO's
own loss: -log sigmoid(beta * sum_t f^w_t Delta^w_t - beta * sum_t f^l_t Delta^l_t), Delta_t = log pi - log pi_ref.
The weights go through the host's per-token contract (``tokplug_token_weights``), which multiplies the policy's and
the reference's per-token log-probabilities inside DPOTrainer's loss; pi_rm and pi_ref are scored with the host's
:class:`~hf_tokplug.plugin.FrozenLogProbs` (cached per example for pi_rm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from hf_tokplug.plugin import (
    FrozenLogProbs,
    Plugin,
    PluginConfig,
    PluginError,
    hookimpl,
    is_toy,
    load_frozen_causal_lm,
    reference_log_probs,
    tokenizer_vocab,
    unwrap,
)


class TGDPOConfig(PluginConfig):
    """TGDPO: token-level reward guidance for DPO.

    Args:
        rm_model: pi_rm, the token-reward model: a run folder or Hub repo of a model trained with plain DPO from the
            same base (a full model or a LoRA adapter, which is merged into its base for scoring), or ``toy://NAME``.
            Its tokenizer must be the policy's (checked before any weights load).
        alpha: strength of the guidance: f = 1 +/- alpha * r. 0 disables the plugin (the run is exactly DPO).
            The paper's default is 0.5 (0.5, 1 and 2 end similar; larger converges faster).
        beta_source: the beta inside r: ``policy`` (the trainer's ``beta``, as the reference code does) or ``value``
            (``rm_beta``, the beta pi_rm was trained with).
        rm_beta: the beta of ``beta_source: value``.
        clamp: lower bound of f (e.g. 0.0 keeps every weight non-negative); ``null`` (default, as in the reference)
            leaves f unbounded, so f < 0 when alpha * r <= -1.
        cache: keep pi_rm's per-token log-probabilities per example (one pi_rm forward per distinct pair).
    """

    rm_model: str = Field(description="Token-reward model pi_rm: a DPO run folder, Hub repo or toy://NAME.")
    alpha: float = Field(0.5, ge=0.0, description="Guidance strength (0: plain DPO).")
    beta_source: Literal["policy", "value"] = Field("policy", description="beta inside r: the trainer's or rm_beta.")
    rm_beta: float | None = Field(None, gt=0.0, description="beta for beta_source: value.")
    clamp: float | None = Field(None, description="Lower bound of the weights f (null: none).")
    cache: bool = Field(True, description="Cache pi_rm's per-token log-probabilities per example.")

    @model_validator(mode="after")
    def _beta(self) -> TGDPOConfig:
        if self.beta_source == "value" and self.rm_beta is None:
            raise ValueError("beta_source: value needs rm_beta (the beta pi_rm was trained with)")
        return self


class TGDPOPlugin(Plugin):
    config_class = TGDPOConfig
    paper = "https://arxiv.org/abs/2506.14574"
    citation = """@inproceedings{zhu2025tgdpo,
  title={{TGDPO}: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization},
  author={Zhu, Mingkang and Chen, Xi and Wang, Zhongdao and Yu, Bei and Zhao, Hengshuang and Jia, Jiaya},
  booktitle={International Conference on Machine Learning},
  year={2025}
}"""
    test_traits = {"roles": ("chosen", "rejected")}  # conformance: a preference task
    test_configs = {"noop": {"rm_model": "toy://qwen2", "alpha": 0.0},
                    "active": {"rm_model": "toy://qwen2", "alpha": 1.0}}

    def __init__(self, name: str, config: TGDPOConfig):
        super().__init__(name, config)
        self.rm: FrozenLogProbs | None = None
        self.ref: FrozenLogProbs | None = None
        self.checked = False
        self.beta = 0.0

    @property
    def active(self) -> bool:
        return self.config.alpha > 0

    # ------------------------------------------------------------------------------------------------ checks

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True,
                               roles=("chosen", "rejected"))
        if ctx.recipe is None or not self.active:
            return
        spec = ctx.recipe.model
        try:
            policy = tokenizer_vocab(spec.tokenizer or spec.name_or_path)
        except Exception:  # a Hub model not reachable now (the host checks the location): compared at trainer creation
            return
        self._check_tokenizer(policy, offline_ok=True)

    def _check_tokenizer(self, policy: dict[str, int], offline_ok: bool = False) -> None:
        location = self.config.rm_model
        local = Path(location).expanduser()
        if location.startswith((".", "/", "~")) and not local.exists():
            raise PluginError(f"rm_model {location!r} is a path, and there is nothing there", where=f"{self.where}.rm_model",
                              fix="give the folder of a DPO run (e.g. runs/dpo after `tokplug run recipes/dpo.yaml`)")
        try:
            theirs = tokenizer_vocab(location)
        except Exception as exc:
            if offline_ok and not local.exists() and not is_toy(location):
                return  # a Hub repo not reachable now: checked again when the trainer is built
            raise PluginError(f"cannot load the tokenizer of rm_model {location!r}: {exc}", where=f"{self.where}.rm_model",
                              fix="give the folder (or Hub repo) of a model trained with plain DPO from the same base") from None
        if theirs != policy:
            raise PluginError(f"rm_model {location!r} has another tokenizer than the policy ({len(theirs)} vs "
                              f"{len(policy)} tokens): its token log-probabilities would not line up",
                              where=f"{self.where}.rm_model",
                              fix="use a reward model trained with the policy's tokenizer and chat template")
        self.checked = True

    # ------------------------------------------------------------------------------------------------ models

    @hookimpl
    def tokplug_post_trainer_create(self, ctx, trainer):
        if not self.active:
            return
        if not self.checked:
            self._check_tokenizer(ctx.tokenizer.gettokenizer_vocab())
        policy = unwrap(trainer.model)
        param = next(policy.parameters())
        self.rm = FrozenLogProbs(load_frozen_causal_lm(self.config.rm_model, dtype=param.dtype, what="rm_model",
                                                     where=f"{self.where}.rm_model").to(param.device), cache=self.config.cache)
        self.ref = reference_log_probs(trainer)
        self.beta = self.config.rm_beta if self.config.beta_source == "value" else float(trainer.args.beta)

    # ------------------------------------------------------------------------------------------------ weights

    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        if not self.active or self.rm is None:
            return None
        chosen, rejected = batch.rows("chosen"), batch.rows("rejected")
        if not (chosen.any() or rejected.any()):
            return None
        reward = self.beta * (self.rm(batch) - self.ref(batch))  # (B, T) output frame; 0 where not scored
        sign = chosen.float() - rejected.float()  # +1 chosen, -1 rejected, 0 other rows
        weights = 1.0 + self.config.alpha * sign[:, None] * reward
        if self.config.clamp is not None:
            weights = weights.clamp(min=self.config.clamp)
        scored = batch.scored
        weights = torch.where(scored, weights, torch.ones_like(weights))
        split = "train" if ctx.trainer is None or ctx.trainer.model.training else "eval"
        for role, rows in (("chosen", chosen), ("rejected", rejected)):
            mask = scored & rows[:, None]
            if mask.any():
                self.log(ctx, f"weight_{role}", float(weights[mask].mean()), split)
        if scored.any():
            self.log(ctx, "token_reward", float(reward[scored].mean()), split)
        return weights

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        return [f"## TGDPO\n\nDPO with token-level reward guidance from `{c.rm_model}` (alpha {c.alpha}, beta from "
                f"{c.beta_source}{'' if c.clamp is None else f', weights clamped at {c.clamp}'})."]
