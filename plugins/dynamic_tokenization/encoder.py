"""Encoder use: a model fed with dynamic tokens through ``inputs_embeds``, and hypernetwork training for it.

``DynamicEncoder(model, tokenizer)`` tokenizes a batch with the base tokenizer, merges it (batch-level dynamic BPE),
and builds ``inputs_embeds``: base tokens (and every special token) keep their rows, dynamic tokens get FVT or
hypernetwork rows (cached by string). The hypernetwork of an encoder without a language-modelling head (a sentence
encoder such as MiniLM) is trained by self-distillation: the frozen model's mean-pooled output under dynamic
tokens must match its output under the original tokenization (cosine), plus 0.5 x MSE to the original rows for
single-piece tokens; the first steps regress original rows only (identity warm-up).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .embeddings import EmbeddingCache, HyperNetwork, fvt_rows, pad_pieces
from .merge import DynamicBatch, encode_batch, merge_batch


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
        self.table = model.get_input_embeddings().weight
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
            return fvt_rows(self.table.detach(), pieces)
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
        base = self.table[ids.clamp(min=0, max=batch.base_vocab - 1)]
        dynamic = batch.unique_dynamic()
        if not dynamic:
            return base
        rows = self.dynamic_rows(batch, dynamic, use_cache)
        lookup = torch.full((batch.base_vocab + len(batch.pieces),), -1, dtype=torch.long)
        lookup[torch.tensor(dynamic)] = torch.arange(len(dynamic))
        where = ids >= batch.base_vocab
        out = base.clone()
        out[where] = rows[lookup[ids[where]]].to(out.dtype)
        return out

    def embed(self, texts: list[str], merges: int = 0, max_length: int = 256, use_cache: bool = True
              ) -> tuple[torch.Tensor, DynamicBatch]:
        """Mean-pooled, L2-normalised sentence embeddings under dynamic tokenization, and the batch."""
        batch = self.batch(texts, merges, max_length)
        mask = batch.attention_mask.to(self.table.device)
        out = self.model(inputs_embeds=self.inputs_embeds(batch, use_cache), attention_mask=mask).last_hidden_state
        return torch.nn.functional.normalize(mean_pool(out, mask), dim=-1), batch


def train_hypernetwork(model: Any, tokenizer: Any, texts: list[str], *, steps: int = 300, batch_size: int = 32,
                       max_merges: int = 200, warmup_steps: int = 50, lr: float = 1e-3, lexical_weight: float = 0.5,
                       mode: str = "pretokens", width: int = 256, layers: int = 2, seed: int = 0,
                       max_length: int = 128, progress: bool = True) -> tuple[HyperNetwork, list[dict[str, float]]]:
    """Train a hypernetwork for ``model`` (frozen) on ``texts`` with random merge levels; returns it and the log."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.eval().requires_grad_(False)
    table = model.get_input_embeddings().weight.detach()
    net = HyperNetwork(table, table.shape[1], width=width, layers=layers)
    encoder = DynamicEncoder(model, tokenizer, "hypernet", net, mode)
    teacher = DynamicEncoder(model, tokenizer, "fvt", mode=mode)  # at 0 merges: the original tokenization
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    log = []
    for step in tqdm(range(steps), desc="hypernetwork", disable=not progress, mininterval=5):
        singles = torch.tensor(rng.sample(vocab, 256))
        lexical = torch.nn.functional.mse_loss(net(singles.unsqueeze(1)), table[singles])
        loss, fidelity = lexical, torch.tensor(0.0)
        if step >= warmup_steps:
            chunk = rng.sample(texts, batch_size)
            with torch.no_grad():
                target, _ = teacher.embed(chunk, 0, max_length)
            pred, _ = encoder.embed(chunk, rng.randint(1, max_merges), max_length, use_cache=False)
            fidelity = 1 - (pred * target).sum(-1).mean()
            loss = fidelity + lexical_weight * lexical
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({"step": step, "loss": loss.item(), "fidelity_loss": fidelity.item(), "lexical": lexical.item()})
    net.eval()
    return net, log
