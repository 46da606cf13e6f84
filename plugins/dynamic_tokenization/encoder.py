"""Encoder use: a model fed with dynamic tokens through ``inputs_embeds``, directly or behind a backbone hook.

``DynamicEncoder(model, tokenizer)`` tokenizes a batch with the base tokenizer, merges it (batch-level dynamic BPE),
and builds ``inputs_embeds``: base tokens (and every special token) keep their rows, dynamic tokens get FVT or
hypernetwork rows (cached by string). :class:`BackboneHook` puts the same in front of a model's backbone, so
callers keep passing ``input_ids``. Training the hypernetwork: :mod:`.hypertrain`.
"""

from __future__ import annotations

from typing import Any

import torch

from .embeddings import EmbeddingCache, HyperNetwork, fvt_rows, pad_pieces
from .merge import DynamicBatch, encode_batch, encode_ids, merge_batch, word_level_lengths


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class DynamicEncoder:
    """Dynamic tokenization around a Transformers encoder (any model whose forward takes ``inputs_embeds``)."""

    def __init__(self, model: Any, tokenizer: Any, embedding: str = "fvt", hypernet: HyperNetwork | None = None,
                 mode: str = "pretokens", cache_size: int = 5000):
        if embedding == "hypernet" and hypernet is None:
            raise ValueError("embedding='hypernet' needs a trained HyperNetwork")
        self.model, self.tokenizer, self.embedding, self.hypernet, self.mode = model, tokenizer, embedding, hypernet, mode
        self.embeddings = model.get_input_embeddings()
        self.table = self.embeddings.weight
        self.cache = EmbeddingCache(cache_size)

    def batch(self, texts: list[str], merges: int, max_length: int = 256) -> DynamicBatch:
        batch = encode_batch(self.tokenizer, texts, self.mode, max_length=max_length)
        return merge_batch(batch, max_merges=merges) if merges else batch

    def token_key(self, batch: DynamicBatch, token_id: int) -> str:
        return "\x1f".join(map(str, batch.token_pieces(token_id)))

    def dynamic_rows(self, batch: DynamicBatch, ids: list[int], use_cache: bool = True) -> torch.Tensor:
        """Rows of the batch's dynamic tokens ``ids`` (FVT or hypernetwork; cached unless training)."""
        pieces = [batch.token_pieces(i) for i in ids]
        if self.embedding == "fvt":
            return fvt_rows(self.table, pieces)  # differentiable: follows the rows when they train
        if not use_cache:
            return self.hypernet(pad_pieces(pieces, self.table.device))
        keys = [self.token_key(batch, i) for i in ids]
        rows: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        todo = [n for n, r in enumerate(rows) if r is None]
        if todo:
            with torch.no_grad():
                fresh = self.hypernet(pad_pieces([pieces[n] for n in todo], self.table.device))
            for n, row in zip(todo, fresh):
                rows[n] = row
                self.cache.put(keys[n], row)
        return torch.stack(rows)  # type: ignore[arg-type]

    def inputs_embeds(self, batch: DynamicBatch, use_cache: bool = True) -> torch.Tensor:
        ids = batch.ids
        base = self.embeddings(ids.clamp(min=0, max=batch.base_vocab - 1).to(self.table.device))  # (B, T, H)
        dynamic = batch.unique_dynamic()
        if not dynamic:
            return base
        rows = self.dynamic_rows(batch, dynamic, use_cache)
        lookup = torch.full((batch.base_vocab + len(batch.pieces),), -1, dtype=torch.long)
        lookup[torch.tensor(dynamic)] = torch.arange(len(dynamic))
        where = ids >= batch.base_vocab
        out = base.clone()
        out[where.to(out.device)] = rows[lookup[ids[where]].to(rows.device)].to(out.dtype)
        return out

    def embed(self, texts: list[str], merges: int = 0, max_length: int = 256, use_cache: bool = True
              ) -> tuple[torch.Tensor, DynamicBatch]:
        """Mean-pooled, L2-normalised sentence embeddings under dynamic tokenization, and the batch."""
        batch = self.batch(texts, merges, max_length)
        mask = batch.attention_mask.to(self.table.device)
        out = self.model(inputs_embeds=self.inputs_embeds(batch, use_cache), attention_mask=mask).last_hidden_state
        return torch.nn.functional.normalize(mean_pool(out, mask), dim=-1), batch


class BackboneHook:
    """Forward pre-hook on a model's backbone: ``input_ids`` in, dynamic tokens out as ``inputs_embeds``.

    Any caller that runs the backbone with ``input_ids`` (Trainer, a pipeline, ``model(**batch)``) gets the batch
    merged at ``level(training)`` merges; ``attention_mask`` (and ``token_type_ids`` / ``position_ids`` when given)
    follow the merged positions. The ids are decoded and re-encoded with offsets to find the merge units; rows that
    do not round-trip stay unmerged. Calls with ``inputs_embeds``, a KV cache, or level 0 pass through unchanged.
    """

    def __init__(self, encoder: DynamicEncoder, backbone: Any, level: Any):
        import inspect

        self.encoder, self.level = encoder, level
        self.signature = inspect.signature(backbone.forward)
        self.on_batch: Any = None  # (training, tokens before, after, at the word floor) -> None, e.g. a logger

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        inputs = {**bound, **extra}
        ids = inputs.get("input_ids")
        merges = self.level(module.training)
        if ids is None or inputs.get("inputs_embeds") is not None or merges <= 0:
            return None
        if inputs.get("past_key_values") is not None or inputs.get("cache_position") is not None:
            return None  # incremental decoding: positions are the caller's; prefill with dynamic tokens explicitly
        mask = inputs.get("attention_mask")
        batch = encode_ids(self.encoder.tokenizer, ids, mask, self.encoder.mode)
        floor = int(word_level_lengths(batch).sum()) if self.on_batch is not None else 0
        batch = merge_batch(batch, max_merges=merges)
        if self.on_batch is not None:
            self.on_batch(module.training, int(batch.base_lengths.sum()), int(batch.lengths.sum()), floor)
        device = ids.device
        inputs["inputs_embeds"] = self.encoder.inputs_embeds(batch, use_cache=True)
        inputs["input_ids"] = None
        new_mask = batch.attention_mask.to(device)
        inputs["attention_mask"] = new_mask.to(mask.dtype) if mask is not None else new_mask
        positions = batch.positions.to(device)  # (B, T') column of each token's first piece, -1 = padding
        for key in ("token_type_ids", "position_ids"):
            value = inputs.get(key)
            if value is not None:
                taken = value.expand(ids.shape[0], -1).gather(1, positions.clamp(min=0))
                inputs[key] = taken * (positions >= 0)
        return (), inputs

