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

import numpy as np
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
        positions: ``(B, T)`` the column, in the unmerged batch, of every token's first piece (-1 for padding):
            gathers per-position inputs such as ``token_type_ids`` onto the merged sequence.
    """

    ids: torch.Tensor
    units: torch.Tensor
    word_ids: torch.Tensor
    base_vocab: int
    pieces: list[list[int]] = field(default_factory=list)
    merges: list[tuple[int, int]] = field(default_factory=list)
    base_lengths: torch.Tensor | None = None
    positions: torch.Tensor | None = None

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
    return _batch(ids, units, words, len(tokenizer))


def _batch(ids: torch.Tensor, units: torch.Tensor, words: torch.Tensor, base_vocab: int) -> DynamicBatch:
    alive = ids >= 0
    positions = torch.where(alive, torch.arange(ids.shape[1]).expand_as(ids), -1)
    return DynamicBatch(ids, units, words, base_vocab, base_lengths=alive.sum(1), positions=positions)


def encode_ids(tokenizer: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               mode: str = "pretokens", base_vocab: int | None = None) -> DynamicBatch:
    """A batch from token ids that are already there (a model's ``input_ids``): each row is decoded and encoded
    again with offsets to find its units. A row whose ids do not come back identical (its units cannot be trusted)
    gets no units: it stays unmerged. Padding (``attention_mask`` 0) becomes -1; rows keep their columns."""
    ids = ids.detach().cpu().long()
    alive = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    rows = [row[keep].tolist() for row, keep in zip(ids, alive)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_special_tokens_mask=True)
    specials = set(tokenizer.all_special_ids)
    out_ids = torch.where(alive, ids, -1)
    units, words = torch.full_like(ids, -1), torch.full_like(ids, -1)
    for i, row in enumerate(rows):
        again = enc["input_ids"][i]
        if again != row:
            continue  # not reproducible from its text: leave the row as it is
        cols = torch.nonzero(alive[i]).squeeze(1)
        special = [1 if t in specials else m for t, m in zip(row, enc["special_tokens_mask"][i])]
        units[i, cols] = torch.tensor(units_for(enc.encodings[i], texts[i], mode, special), dtype=torch.long)
        words[i, cols] = torch.tensor([-1 if w is None else w for w in enc.encodings[i].word_ids], dtype=torch.long)
    return _batch(out_ids, units, words, base_vocab or len(tokenizer))


_HASH_SLOTS = 1 << 16
_HASH_MUL = 0x9E3779B1


def _most_frequent(keys: np.ndarray) -> int:
    """The most frequent value of ``keys`` (ties: the first occurrence), exactly, without sorting all of them.

    Counts go into a hashed table (``bincount``); a slot's count is >= the exact count of every key in it. The keys
    in the fullest slot are counted exactly; only keys whose slot count reaches that exact maximum can still win,
    so they are counted exactly too when a collision inflated the first guess.
    """
    slots = (keys * _HASH_MUL) & (_HASH_SLOTS - 1)
    hashed = np.bincount(slots, minlength=_HASH_SLOTS)[slots]
    top = int(hashed.max())
    key, count = _exact_best(keys, hashed == top)
    if count < top:  # a collision inflated the fullest slot: widen to every key that can still win
        key, count = _exact_best(keys, hashed >= count)
    return key


def _exact_best(keys: np.ndarray, candidates: np.ndarray) -> tuple[int, int]:
    positions = np.flatnonzero(candidates)
    uniq, first, counts = np.unique(keys[positions], return_index=True, return_counts=True)
    best = counts == counts.max()
    choice = int(np.argmin(np.where(best, first, keys.size)))  # first occurrence among the most frequent
    return int(uniq[choice]), int(counts[choice])


def _take_non_overlapping(match: np.ndarray) -> np.ndarray:
    """Left-to-right non-overlapping choice among matches at adjacent pair positions: in each run of consecutive
    matches keep the 1st, 3rd, 5th, ... (bool over the last dimension, in and out)."""
    idx = np.broadcast_to(np.arange(match.shape[-1]), match.shape)
    last_gap = np.maximum.accumulate(np.where(~match, idx, -1), axis=-1)
    return match & ((idx - last_gap - 1) % 2 == 0)


def merge_batch(batch: DynamicBatch, max_merges: int | None = None, target_tokens: int | None = None,
                excluded: torch.Tensor | None = None) -> DynamicBatch:
    """Apply up to ``max_merges`` merges (or until the batch has at most ``target_tokens`` tokens) in place.

    ``excluded``: boolean over the base vocabulary of tokens that never merge (the caller's extra rule).
    The batch is flattened to one sequence (NumPy: these are many small array operations, where its per-call cost
    is a fraction of torch's): units are made unique per row, so no pair crosses two texts, and removing merged
    positions is one boolean selection per step.
    """
    b, t = batch.ids.shape
    alive = (batch.ids >= 0).numpy()
    ids = batch.ids.numpy()[alive]
    units = batch.units.numpy()[alive].copy()
    origin = np.flatnonzero(alive)  # flat (row, column) of each token's first piece
    rows = origin // max(t, 1)
    span = int(units.max()) + 1 if units.size else 1
    if excluded is not None:
        ex = excluded.numpy()
        base = ids < batch.base_vocab
        units[base & ex[np.minimum(ids, batch.base_vocab - 1)]] = -1
    fixed = units < 0
    units = np.where(fixed, -1 - np.arange(units.size), units + rows * span)  # unique per row; -k: never pairs
    bound = batch.base_vocab + (max_merges if max_merges is not None else ids.size) + len(batch.pieces) + 1
    steps = 0
    while ids.size > 1 and (max_merges is None or steps < max_merges):
        if target_tokens is not None and ids.size <= target_tokens:
            break
        valid = units[:-1] == units[1:]  # (N-1,) pair positions inside one unit
        pair_keys = ids[:-1] * bound + ids[1:]
        keys = pair_keys[valid]  # valid pairs in first-seen order
        if keys.size == 0:
            break
        key = _most_frequent(keys)
        pair = (key // bound, key % bound)
        new_id = batch.base_vocab + len(batch.pieces)
        batch.pieces.append(batch.token_pieces(pair[0]) + batch.token_pieces(pair[1]))
        batch.merges.append(pair)
        match = (pair_keys == key) & valid
        if pair[0] == pair[1] and (match[1:] & match[:-1]).any():  # only (x, x) pairs can overlap (x x x)
            match = _take_non_overlapping(match)
        ids[:-1][match] = new_id  # ids is this function's own array (a selection, never the caller's)
        keep = np.ones(ids.size, dtype=bool)
        keep[1:] = ~match
        ids, units, origin = ids[keep], units[keep], origin[keep]
        steps += 1
    rows = origin // max(t, 1)
    units = np.where(units >= 0, units - rows * span, -1)
    lengths = np.bincount(rows, minlength=b)
    width = int(lengths.max()) if b else 0
    col = np.arange(rows.size) - (np.cumsum(lengths) - lengths)[rows]
    words = batch.word_ids.numpy().reshape(-1)[origin]
    positions = (batch.positions if batch.positions is not None else torch.arange(t).expand(b, t)).numpy()
    positions = positions.reshape(-1)[origin]
    out = [np.full((b, width), -1, dtype=np.int64) for _ in range(4)]
    for dst, src in zip(out, (ids, units, words, positions)):
        dst[rows, col] = src
    batch.ids, batch.units, batch.word_ids, batch.positions = (torch.from_numpy(o) for o in out)
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
