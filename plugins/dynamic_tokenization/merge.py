"""Batch-level dynamic BPE: merge the most frequent valid adjacent pair of a whole batch, again and again.

Every step runs on tensors over the batch at once (flattened to one sequence): pair keys ``left * K + right`` of
all valid adjacent positions, counted by scatter-add into a hashed table with an exact check of the winner (ties:
the pair seen first), a run-parity trick for left-to-right non-overlapping replacement, and one boolean
selection to drop merged positions. A pair is valid when both positions belong to the same unit
(the validity mode below) and neither is a special token or excluded; units come from the tokenizer's own
offsets, so "word level" is the floor no merge can cross.

Modes:
    pretokens    within one pre-token of the base tokenizer (default; the pre-tokenizer's own word split)
    word         within one whitespace-delimited word; punctuation-only tokens never merge
    word_hyphen  like ``word``, but a hyphen may join (``world-wide`` can become one token)
    sentence     within one sentence (split after . ! ?), across spaces
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("pretokens", "word", "word_hyphen", "sentence")
_SENTENCE_END = re.compile(r"[.!?]+\s+")
_WORD = re.compile(r"\S+")


@dataclass
class DynamicBatch:
    """A batch after dynamic merges.

    Attributes:
        ids: ``(B, T)`` token ids, padded with -1; ids >= ``base_vocab`` are dynamic tokens of this batch.
        units: ``(B, T)`` the validity unit of every position (-1: never merges: special, excluded or padding).
        word_ids: ``(B, T)`` the base tokenizer's pre-token index of every position (-1 for specials / padding).
        pieces: base-vocabulary ids of each dynamic token: ``pieces[i]`` for id ``base_vocab + i``.
        merges: the merged pairs, in order.
        base_lengths: tokens per text before merging (specials included).
    """

    ids: torch.Tensor
    units: torch.Tensor
    word_ids: torch.Tensor
    base_vocab: int
    pieces: list[list[int]] = field(default_factory=list)
    merges: list[tuple[int, int]] = field(default_factory=list)
    base_lengths: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return (self.ids >= 0).sum(1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.ids >= 0).long()

    def token_pieces(self, token_id: int) -> list[int]:
        return [token_id] if token_id < self.base_vocab else self.pieces[token_id - self.base_vocab]

    def unique_dynamic(self) -> list[int]:
        return sorted(set(self.ids[self.ids >= self.base_vocab].tolist()))


def units_for(encoding: Any, text: str, mode: str, special_mask: list[int]) -> list[int]:
    """The unit id of each token of one encoded text (-1: may not merge)."""
    if mode not in MODES:
        raise ValueError(f"unknown validity mode {mode!r}; use one of {MODES}")
    word_ids = encoding.word_ids
    offsets = encoding.offsets
    if mode == "pretokens":
        return [-1 if special or w is None else w for w, special in zip(word_ids, special_mask)]
    if mode == "sentence":
        bounds = [m.end() for m in _SENTENCE_END.finditer(text)]
        return [-1 if special or w is None else sum(1 for b in bounds if b <= start)
                for w, special, (start, _) in zip(word_ids, special_mask, offsets)]
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    out, k = [], 0
    for w, special, (start, end) in zip(word_ids, special_mask, offsets):
        if special or w is None:
            out.append(-1)
            continue
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        piece = text[start:end]
        punct = bool(piece) and not any(ch.isalnum() for ch in piece)
        if punct and not (mode == "word_hyphen" and piece.strip() == "-"):
            out.append(-1)
            continue
        unit = k
        if mode == "word_hyphen":
            out.append(unit)
        else:  # word: a hyphen splits the word into separate units
            out.append(unit * 4096 + text[spans[k][0]:start].count("-") if k < len(spans) else -1)
    return out


def encode_batch(tokenizer: Any, texts: list[str], mode: str = "pretokens", max_length: int | None = None,
                 add_special_tokens: bool = True) -> DynamicBatch:
    """Tokenize with the base (fast) tokenizer and attach validity units; no merges yet."""
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, truncation=max_length is not None,
                    max_length=max_length, return_offsets_mapping=True, return_special_tokens_mask=True)
    rows = [enc["input_ids"][i] for i in range(len(texts))]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    units = torch.full_like(ids, -1)
    words = torch.full_like(ids, -1)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        encoding = enc.encodings[i]
        u = units_for(encoding, texts[i], mode, enc["special_tokens_mask"][i])
        units[i, : len(row)] = torch.tensor(u)
        words[i, : len(row)] = torch.tensor([-1 if w is None else w for w in encoding.word_ids])
    return DynamicBatch(ids, units, words, len(tokenizer), base_lengths=(ids >= 0).sum(1))


def _take_non_overlapping(match: torch.Tensor) -> torch.Tensor:
    """Left-to-right non-overlapping choice among matches at adjacent pair positions: in each run of consecutive
    matches keep the 1st, 3rd, 5th, ... (bool over the last dimension, in and out)."""
    n = match.shape[-1]
    idx = torch.arange(n).expand_as(match)
    last_gap = torch.where(~match, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    return match & ((idx - last_gap - 1) % 2 == 0)


_HASH_SLOTS = 1 << 20
_HASH_MUL = 0x9E3779B1


def _most_frequent(keys: torch.Tensor, table: torch.Tensor) -> int:
    """The most frequent value of ``keys`` (ties: the first occurrence), exactly, without sorting all of them.

    Counts go into a hashed table by scatter-add; a slot's count is >= the exact count of every key in it. The keys
    in the fullest slot are counted exactly (a small ``unique``); only keys whose slot count reaches that exact
    maximum can still win, so they are counted exactly too when a collision inflated the first guess.
    """
    slots = (keys * _HASH_MUL) & (_HASH_SLOTS - 1)
    table.index_add_(0, slots, torch.ones_like(slots))
    hashed = table[slots]
    table[slots] = 0
    top = hashed.max()
    best = _exact_best(keys, hashed == top)
    if best[1] < int(top):  # a collision inflated the fullest slot: widen to every key that can still win
        best = _exact_best(keys, hashed >= best[1])
    return best[0]


def _exact_best(keys: torch.Tensor, candidates: torch.Tensor) -> tuple[int, int]:
    positions = candidates.nonzero().squeeze(1)
    uniq, inverse, counts = torch.unique(keys[positions], return_inverse=True, return_counts=True)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    count = int(counts.max())
    choice = int(torch.where(counts == count, first, torch.full_like(first, keys.numel())).argmin())
    return int(uniq[choice]), count


def merge_batch(batch: DynamicBatch, max_merges: int | None = None, target_tokens: int | None = None,
                excluded: torch.Tensor | None = None) -> DynamicBatch:
    """Apply up to ``max_merges`` merges (or until the batch has at most ``target_tokens`` tokens) in place.

    ``excluded``: boolean over the base vocabulary of tokens that never merge (the caller's extra rule).
    The batch is flattened to one sequence: units are made unique per row, so no pair crosses two texts, and
    removing merged positions is one boolean selection per step.
    """
    b, t = batch.ids.shape
    alive = batch.ids >= 0
    rows = torch.arange(b).unsqueeze(1).expand(b, t)[alive]
    ids = batch.ids[alive]
    words = batch.word_ids[alive]
    units = batch.units[alive].clone()
    span = int(units.max()) + 1 if units.numel() else 1
    units = torch.where(units >= 0, units + rows * span, units)  # units of different rows never match
    if excluded is not None:
        base = ids < batch.base_vocab
        units[base & excluded[ids.clamp(max=batch.base_vocab - 1)]] = -1
    bound = batch.base_vocab + (max_merges if max_merges is not None else ids.numel()) + len(batch.pieces) + 1
    table = torch.zeros(_HASH_SLOTS, dtype=torch.long)  # hashed pair counts, zeroed again after every step
    steps = 0
    while ids.numel() > 1 and (max_merges is None or steps < max_merges):
        if target_tokens is not None and ids.numel() <= target_tokens:
            break
        valid = (units[:-1] == units[1:]) & (units[:-1] >= 0)
        where = valid.nonzero().squeeze(1)  # pair positions, in first-seen order
        if where.numel() == 0:
            break
        keys = ids[where] * bound + ids[where + 1]
        key = _most_frequent(keys, table)
        pair = (key // bound, key % bound)
        new_id = batch.base_vocab + len(batch.pieces)
        batch.pieces.append(batch.token_pieces(pair[0]) + batch.token_pieces(pair[1]))
        batch.merges.append(pair)
        match = torch.zeros(ids.numel() - 1, dtype=torch.bool)
        match[where[keys == key]] = True
        take = _take_non_overlapping(match)
        ids = ids.clone()
        ids[:-1][take] = new_id
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[1:] = ~take
        ids, units, words, rows = ids[keep], units[keep], words[keep], rows[keep]
        steps += 1
    lengths = torch.bincount(rows, minlength=b)
    width = int(lengths.max()) if b else 0
    col = torch.arange(rows.numel()) - torch.cumsum(lengths, 0).sub(lengths)[rows]
    out = [torch.full((b, width), -1, dtype=torch.long) for _ in range(3)]
    units = torch.where(units >= 0, units - rows * span, units)
    for dst, src in zip(out, (ids, units, words)):
        dst[rows, col] = src
    batch.ids, batch.units, batch.word_ids = out
    return batch


def reduction(batch: DynamicBatch, word_lengths: torch.Tensor | None = None) -> dict[str, float]:
    """``length_reduction`` = 1 - tokens after / before; ``reduction_pct`` = 100 (L_sub - L_m) / (L_sub - L_word)
    with L_word the tokens at full merging of every unit (one token per unit, specials kept)."""
    before = float(batch.base_lengths.sum())
    after = float(batch.lengths.sum())
    out = {"length_reduction": 1 - after / before}
    if word_lengths is not None:
        floor = float(word_lengths.sum())
        out["reduction_pct"] = 100 * (before - after) / max(before - floor, 1e-9)
    return out


def word_level_lengths(batch: DynamicBatch) -> torch.Tensor:
    """Tokens per text if every unit were one token (the floor of dynamic merging)."""
    lengths = []
    for row_ids, row_units in zip(batch.ids, batch.units):
        alive = row_ids >= 0
        u = row_units[alive]
        singles = int((u < 0).sum())
        lengths.append(singles + len(set(u[u >= 0].tolist())))
    return torch.tensor(lengths)
