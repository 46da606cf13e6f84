"""ssToken (ICLR 2026): SFT on the response tokens that still carry signal.

Per response token: REL = l_history - l_current (the per-token NLL of the model before SFT minus the current
model's; min-max normalised per example) and AttnScore = the head-averaged attention mass the token's query puts on
the context (one deep layer of the current model). Score = gamma * Norm(REL) + (1 - gamma) * AttnScore; the top
ceil(rho * L_resp) tokens of each example are kept, the others get weight 0 in the trainer's own cross-entropy
(through ``tokplug_token_weights``).

The history model's per-token log-probabilities are computed once, before training, over the prepared training
examples (``tokplug_prepare_dataset``) and cached on disk as safetensors keyed by the data and model fingerprints;
the current model's losses and attention come from one extra no-gradient forward per micro-batch
(``hf_tokplug.plugin.layer_attention``: that layer's attention recomputed under sdpa).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from hf_tokplug.plugin import (
    FrozenLogProbs,
    Plugin,
    PluginConfig,
    TokenBatch,
    cache_root,
    hookimpl,
    layer_attention,
    unwrap,
)


class SSTokenConfig(PluginConfig):
    """ssToken: token selection for SFT.

    Args:
        gamma: weight of the self-modulated score REL against the attention score (1: REL only, 0: attention only;
            the paper's default 0.5; both extremes still beat full SFT in the paper).
        rho: share of each example's response tokens kept (the paper: 0.6; 0.8 at 14B). 1 keeps all: plain SFT.
        layer: decoder layer whose attention gives AttnScore (Python index; the reference uses the last, -1; deep
            layers beat shallow ones).
        normalizer: ``all`` (default): the trainer's own normalisation, dividing by all response tokens of the step
            (``num_items_in_batch``), so kept tokens weigh as in full SFT; ``kept``: the mean over kept tokens (the
            reference code; weights scaled by scored/kept per micro-batch).
        cache: keep the history model's per-token log-probabilities on disk (safetensors under the tokplug cache,
            keyed by the data and model fingerprints), so reruns on the same data and model skip that pass.
    """

    gamma: float = Field(0.5, ge=0.0, le=1.0, description="REL weight against AttnScore.")
    rho: float = Field(0.6, gt=0.0, le=1.0, description="Share of response tokens kept (1: plain SFT).")
    layer: int = Field(-1, description="Decoder layer for the attention score.")
    normalizer: Literal["all", "kept"] = Field("all", description="Divide by all response tokens or the kept ones.")
    cache: bool = Field(True, description="Cache the history model's per-token log-probabilities on disk.")


def _fingerprint(model, dataset) -> str:
    """The model (class, config, a checksum of its output layer) and the prepared dataset's fingerprint."""
    digest = hashlib.sha1()
    base = unwrap(model)
    digest.update(type(base).__name__.encode())
    digest.update(base.config.to_json_string(use_diff=False).encode())
    weight = base.get_output_embeddings().weight.detach().float()
    digest.update(f"{float(weight.sum()):.6e}|{float(weight.abs().sum()):.6e}|{float(weight[:8].sum()):.6e}".encode())
    digest.update(str(getattr(dataset, "_fingerprint", len(dataset))).encode())
    return digest.hexdigest()[:20]


class SSTokenPlugin(Plugin):
    config_class = SSTokenConfig
    paper = "https://arxiv.org/abs/2510.18250"
    citation = """@inproceedings{sstoken2026,
  title={ssToken: Self-modulated and Semantic-aware Token Selection for {LLM} Fine-tuning},
  booktitle={International Conference on Learning Representations},
  year={2026},
  howpublished={\\url{https://arxiv.org/abs/2510.18250}}
}"""
    test_configs = {"noop": {"rho": 1.0}, "active": {"rho": 0.5}}

    def __init__(self, name: str, config: SSTokenConfig):
        super().__init__(name, config)
        self.history: FrozenLogProbs | None = None

    @property
    def active(self) -> bool:
        return self.config.rho < 1.0

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True, roles=("sft",))

    # ------------------------------------------------------------------------------------------------ history

    @hookimpl(trylast=True)  # after every other plugin's preparation: the scores belong to the final examples
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        if split != "train" or not self.active or ctx.model is None:
            return None
        self.history = FrozenLogProbs(ctx.model)
        path = Path(cache_root()) / "sstoken" / f"{_fingerprint(ctx.model, dataset)}.safetensors"
        if self.config.cache and path.is_file():
            self.history.load(path)
        else:
            self._score(ctx, dataset)
            if self.config.cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.history.save(path)
        self.history.freeze()
        return None

    def _score(self, ctx, dataset, chunk: int = 16) -> None:
        from tqdm.auto import tqdm

        shift = ctx.traits.label_shift if ctx.traits is not None and ctx.traits.label_shift is not None else 1
        device = next(unwrap(ctx.model).parameters()).device
        for start in tqdm(range(0, len(dataset), chunk), desc="ssToken: history-model token losses", leave=False):
            rows = dataset[start: start + chunk]
            length = max(len(ids) for ids in rows["input_ids"])
            ids = torch.zeros(len(rows["input_ids"]), length, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (row_ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            self.history(TokenBatch(labels.to(device), shift, ("sft",) * len(ids), None, mask.to(device),
                                    ids.to(device)))

    # ------------------------------------------------------------------------------------------------ selection

    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        trainer = ctx.trainer
        if not self.active or trainer is None or not trainer.model.training:
            return None  # evaluation keeps the full loss
        if self.history is None:
            raise ValueError("ssToken has no history scores: the training split did not pass through "
                             "tokplug_prepare_dataset (with your own trainer: ctx.prepare_dataset(ds, 'train'))")
        scored = batch.scored
        targets = batch.targets
        logits, attn = layer_attention(trainer.model, self.config.layer, batch.input_ids, batch.attention_mask)
        current = torch.log_softmax(logits[:, : targets.shape[1]].float(), -1)
        current = current.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        rel = current - self.history(batch)  # l_history - l_current, with l = -log p
        big = torch.finfo(rel.dtype).max
        low = rel.masked_fill(~scored, big).amin(dim=1, keepdim=True)
        high = rel.masked_fill(~scored, -big).amax(dim=1, keepdim=True)
        norm = ((rel - low) / (high - low).clamp(min=1e-8)).masked_fill(~scored, 0.0)
        context = (batch.labels == -100)
        if batch.attention_mask is not None:
            context = context & batch.attention_mask.bool()
        attn_score = (attn[:, : targets.shape[1]] * context[:, None, :].float()).sum(-1)  # query t's mass on context
        score = self.config.gamma * norm + (1 - self.config.gamma) * attn_score
        keep = torch.zeros_like(scored)
        for row in range(score.shape[0]):
            positions = scored[row].nonzero()[:, 0]
            if len(positions) == 0:
                continue
            k = math.ceil(self.config.rho * len(positions))
            top = score[row, positions].topk(k).indices
            keep[row, positions[top]] = True
        weights = keep.float()
        n_scored, n_kept = int(scored.sum()), int(keep.sum())
        if self.config.normalizer == "kept" and n_kept:
            weights = weights * (n_scored / n_kept)
        if n_scored:
            self.log(ctx, "selected_share", n_kept / n_scored)
            self.log(ctx, "rel_mean", float(rel[scored].mean()))
            self.log(ctx, "attn_score_mean", float(attn_score[scored].mean()))
        return weights

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        return [f"## ssToken\n\nSFT on the top {c.rho:.0%} of each response's tokens by gamma {c.gamma} x normalised "
                f"REL + {1 - c.gamma:g} x attention to the context (layer {c.layer}); normaliser `{c.normalizer}`."]
