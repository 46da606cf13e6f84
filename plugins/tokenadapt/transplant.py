"""Tokenizer transplantation: new embedding rows for a new vocabulary from the old rows, without training.

Everything after the embedder runs as tensor operations over all tokens at once (chunked to bound memory):
shared tokens are an index copy, local weights a masked softmax over padded piece lists, global neighbours one
chunked matrix top-k. No Python loop runs per token except reading the tokenizers' strings.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_tokplug.plugin import PluginError, is_tied

from .config import EmbedderConfig, TokenAdaptConfig

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
MAX_PIECES = 32  # longer piece lists (runs of one character) add nothing but memory


# --------------------------------------------------------------------------------------------------------------
# strings of a vocabulary
# --------------------------------------------------------------------------------------------------------------


def token_surfaces(tokenizer: Any, ids: list[int] | None = None) -> list[str]:
    """The text each token stands for, leading space included (``'Ġthe'`` and ``'▁the'`` both give ``' the'``).

    Decoders strip or merge at the start of a text, so each token is decoded after an anchor token and the
    anchor's own text is cut off. Added (special) tokens are their content. Byte-level pieces of a multi-byte
    character come out as U+FFFD.
    """
    ids = list(range(len(tokenizer))) if ids is None else ids
    raw = tokenizer.convert_ids_to_tokens(ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    decoder = tokenizer.backend_tokenizer.decoder if getattr(tokenizer, "is_fast", False) else None
    if decoder is None:
        return [added.get(i, t if t is not None else "") for i, t in zip(ids, raw)]
    anchor = "a"
    base = decoder.decode([anchor])
    out = []
    for i, token in zip(ids, raw):
        if i in added:
            out.append(added[i])
        elif token is None:
            out.append("")
        else:
            text = decoder.decode([anchor, token])
            out.append(text[len(base):] if text.startswith(base) else decoder.decode([token]))
    return out


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = tokenizer.backend_tokenizer.decoder if getattr(tokenizer, "is_fast", False) else None
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def old_pieces(old: Any, new: Any, new_ids: list[int], surfaces: list[str]) -> list[list[int]]:
    """Old-vocabulary pieces of each new token (duplicates kept).

    Between two byte-level tokenizers the new token's raw key is tokenized by the old BPE model directly, which is
    exact even for tokens that are parts of a multi-byte character; otherwise the old tokenizer encodes the
    token's surface string.
    """
    added = set(new.added_tokens_decoder)
    if _is_byte_level(old) and _is_byte_level(new):
        model = old.backend_tokenizer.model
        raw = new.convert_ids_to_tokens(new_ids)
        pieces: list[list[int] | None] = [
            None if i in added else [t.id for t in model.tokenize(r)] for i, r in zip(new_ids, raw)
        ]
        todo = [k for k, p in enumerate(pieces) if p is None]
    else:
        pieces = [None] * len(new_ids)
        todo = list(range(len(new_ids)))
    if todo:
        encoded = old([surfaces[k] for k in todo], add_special_tokens=False)["input_ids"]
        for k, ids in zip(todo, encoded):
            pieces[k] = ids
    return [p[:MAX_PIECES] for p in pieces]  # type: ignore[index]


# --------------------------------------------------------------------------------------------------------------
# estimates
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Estimator:
    """Per-token mixing weights over old rows; applied to any old matrix (input or output side).

    ``pieces`` ``(N, P)`` old ids (-1 = padding) with local weights ``local_w`` and FVT weights ``fvt_w``;
    ``neighbours`` ``(N, k)`` old ids with global weights ``global_w`` (rows of zeros = no estimate).
    """

    pieces: torch.Tensor
    local_w: torch.Tensor
    fvt_w: torch.Tensor
    neighbours: torch.Tensor
    global_w: torch.Tensor
    weight: float
    vocab: int

    @property
    def has_local(self) -> torch.Tensor:
        return self.local_w.sum(1) > 0

    @property
    def has_global(self) -> torch.Tensor:
        return self.global_w.sum(1) > 0

    def weights(self, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``(N, V_old)`` mixing matrix of a composed ``strategy`` and the mask of tokens it covers."""
        n, v_old = self.pieces.shape[0], self.vocab
        local_w = self.fvt_w if strategy == "fvt" else self.local_w
        has_l, has_g = local_w.sum(1) > 0, self.has_global
        parts = []
        if strategy in ("local", "fvt", "hybrid"):
            scale = torch.where(has_g, 1 - self.weight, 1.0) if strategy == "hybrid" else torch.ones(n)
            parts.append((self.pieces, local_w * scale.unsqueeze(1)))
        if strategy in ("global", "hybrid"):
            scale = torch.where(has_l, self.weight, 1.0) if strategy == "hybrid" else torch.ones(n)
            parts.append((self.neighbours, self.global_w * scale.unsqueeze(1)))
        rows, cols, vals = [], [], []
        for ids, w in parts:
            keep = (w != 0) & (ids >= 0)
            rows.append(keep.nonzero()[:, 0])
            cols.append(ids[keep])
            vals.append(w[keep])
        # indices are in range by construction (rows < n, cols < v_old): opt out of the invariant checks explicitly
        matrix = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n, v_old),
                                         check_invariants=False)
        ok = {"local": has_l, "fvt": has_l, "global": has_g, "hybrid": has_l | has_g}[strategy]
        return matrix.coalesce(), ok

    def rows(self, matrix: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, H)`` rows of a composed ``strategy`` (local, fvt, global, hybrid) from the old ``matrix``, and the
        mask of tokens that got an estimate (the others are zero: the caller fills them with the fallback).
        One sparse-dense product: no per-token gather of padded piece lists."""
        weights, ok = self.weights(strategy)
        return torch.sparse.mm(weights, matrix.float()), ok


def fallback_rows(matrix: torch.Tensor, n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``mean``: the old rows' mean; ``normal``/``random``: N(mean, std) with the old matrix's scalar mean and std."""
    old = matrix.float()
    if kind == "mean":
        return old.mean(0, keepdim=True).expand(n, -1).clone()
    return torch.randn(n, old.shape[1], generator=generator) * old.std() + old.mean()


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0) * mask


def build_estimator(
    pieces: list[list[int]],
    surface_len: torch.Tensor,
    old_len: torch.Tensor,
    phi_new: torch.Tensor,
    phi_old: torch.Tensor,
    neighbour_mask: torch.Tensor,
    config: TokenAdaptConfig,
    chunk_floats: int = 2**23,
) -> Estimator:
    """Local, FVT and global weights for every new token (vectorised, chunked over tokens).

    One ``(chunk, V_old)`` cosine matrix per chunk serves both estimates: the local similarities are gathered
    from it at the piece ids, the global neighbours are its top-k. ``chunk_floats`` bounds that matrix.

    Args:
        pieces: old ids of each new token's pieces.
        surface_len: ``(N,)`` characters of each new token's string.
        old_len: ``(V_old,)`` characters of each old token's string.
        phi_new, phi_old: normalised embedder vectors of the new tokens' and the old tokens' strings.
        neighbour_mask: ``(V_old,)`` old tokens allowed as global neighbours (not special, not empty).
    """
    n = len(pieces)
    width = max((len(p) for p in pieces), default=0)
    ids = torch.full((n, width), -1, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    if width:
        flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
        ids[torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)] = flat
    valid = ids >= 0
    t = config.temperature
    local_w = torch.zeros(n, width)
    fvt_w = valid.float() / valid.sum(1, keepdim=True).clamp(min=1)
    k = min(config.top_k, int(neighbour_mask.sum()))
    neighbours = torch.zeros(n, k, dtype=torch.long)
    global_w = torch.zeros(n, k)
    phi_old = phi_old.float()
    has_phi = phi_new.float().norm(dim=1) > 0
    allowed = torch.where(neighbour_mask, 0.0, float("-inf"))
    step = max(1, chunk_floats // max(phi_old.shape[0], 1))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        v, piece_ids = valid[sl], ids[sl].clamp(min=0)
        cosine = phi_new[sl].float() @ phi_old.T  # (chunk, V_old)
        # local: cosine of the token's string with each piece's string, and the piece's share of the length
        sim = cosine.gather(1, piece_ids)
        length = old_len[piece_ids] / surface_len[sl].clamp(min=1).unsqueeze(1)
        if config.local_weighting == "double_softmax":
            score = (_masked_softmax(sim, v) + length) / 2 / t
        else:
            score = (sim + length) / 2 / t
        local_w[sl] = _masked_softmax(score, v) * has_phi[sl].unsqueeze(1)
        # global: exact top-k cosine neighbours among the allowed old tokens
        if k:
            top, idx = (cosine + allowed).topk(k, dim=1)
            keep = (top >= config.threshold) & torch.isfinite(top) & has_phi[sl].unsqueeze(1)
            w = _masked_softmax(top / t, keep)
            w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
            neighbours[sl], global_w[sl] = idx, w * keep
    return Estimator(ids, local_w, fvt_w, neighbours, global_w, config.weight, phi_old.shape[0])


def estimator_for(pieces: list[list[int]], surfaces: list[str], old_surf: list[str], phi_new: torch.Tensor,
                  phi_old: torch.Tensor, special_old: set[int], config: TokenAdaptConfig) -> Estimator:
    """:func:`build_estimator` from strings: lengths from the surfaces; special and empty old tokens are never
    global neighbours."""
    neighbour_mask = (phi_old.float().norm(dim=1) > 0) & torch.tensor([i not in special_old for i in range(len(old_surf))])
    return build_estimator(pieces, torch.tensor([float(len(t)) for t in surfaces]),
                           torch.tensor([float(len(t)) for t in old_surf]), phi_new, phi_old, neighbour_mask, config)


def composed_rows(estimator: Estimator, matrix: torch.Tensor, strategy: str, fallback: str,
                  generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Rows of a composed strategy, tokens without an estimate filled by ``fallback``; and how many fell back."""
    rows, ok = estimator.rows(matrix, strategy)
    missing = int((~ok).sum())
    if missing:
        rows[~ok] = fallback_rows(matrix, missing, fallback, generator)
    return rows, missing


# --------------------------------------------------------------------------------------------------------------
# the transplant
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TransplantReport:
    """What a transplant did (saved as tokenadapt.json, summarised in metrics and the model card)."""

    old_vocab: int = 0
    new_vocab: int = 0
    embedding_rows: int = 0
    tied: bool = True
    shared_raw: int = 0
    shared_surface: int = 0
    shared_special: int = 0
    unique: int = 0
    with_local: int = 0
    with_global: int = 0
    fallback_input: int = 0
    fallback_output: int = 0
    input_init: str = ""
    output_init: str = ""
    strings_embedded: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def shared(self) -> int:
        return self.shared_raw + self.shared_surface + self.shared_special

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shared": self.shared}


def match_shared(old: Any, new: Any, old_surf: list[str], new_surf: list[str], match_surface: bool
                 ) -> tuple[torch.Tensor, dict[str, int]]:
    """``(V_new,)`` old id of each new token that exists in the old vocabulary (-1 otherwise), and counts."""
    old_vocab = old.get_vocab()
    new_vocab = new.get_vocab()
    source = torch.full((len(new),), -1, dtype=torch.long)
    counts = {"raw": 0, "surface": 0, "special": 0}
    for key, nid in new_vocab.items():
        oid = old_vocab.get(key)
        if oid is not None and nid < len(new) and oid < len(old):
            source[nid] = oid
            counts["raw"] += 1
    if match_surface:
        by_surface: dict[str, int] = {}
        for oid, s in enumerate(old_surf):
            if s and "\ufffd" not in s:
                by_surface.setdefault(s, oid)
        for nid, s in enumerate(new_surf):
            if source[nid] < 0 and s and "\ufffd" not in s and s in by_surface:
                source[nid] = by_surface[s]
                counts["surface"] += 1
    for role in ROLES:  # e.g. new '</s>' takes the row of old '<|im_end|>' when both are the EOS
        nid, oid = getattr(new, f"{role}_id", None), getattr(old, f"{role}_id", None)
        if nid is not None and oid is not None and nid < len(new) and oid < len(old) and source[nid] < 0:
            source[nid] = oid
            counts["special"] += 1
    return source, counts


def _phi(embedder_config: EmbedderConfig, old_surf: list[str], new_surf: list[str], unique: torch.Tensor,
         progress: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    from .embedder import get_embedder

    embedder = get_embedder(embedder_config)
    before = embedder.strings_embedded
    phi_old = embedder.embed_cached(old_surf, "old-vocab", progress=progress)
    phi_new = embedder.embed_cached([new_surf[i] for i in unique.tolist()], "new-tokens", progress=progress)
    return phi_old, phi_new, embedder.strings_embedded - before


def transplant(model: Any, old: Any, new: Any, config: TokenAdaptConfig, progress: bool = True) -> TransplantReport:
    """Give ``model`` the vocabulary of tokenizer ``new`` (it was trained with ``old``), in place.

    Shared tokens copy their rows; the others get ``config.input_init`` (input / tied matrix) and
    ``config.output_init`` (untied LM head) estimates; the embedding is resized (``pad_to_multiple_of``) and the
    special-token ids of ``model.config`` and ``model.generation_config`` follow ``new``.
    """
    report = TransplantReport(input_init=config.input_init)
    clock = time.perf_counter()
    emb = model.get_input_embeddings()
    tied = is_tied(model)
    old_n = min(len(old), emb.weight.shape[0])
    report.old_vocab, report.new_vocab, report.tied = old_n, len(new), tied
    old_in = emb.weight.detach()[:old_n].float().clone()
    old_out = None if tied else model.get_output_embeddings().weight.detach()[:old_n].float().clone()

    old_surf = token_surfaces(old, list(range(old_n)))
    new_surf = token_surfaces(new)
    source, counts = match_shared(old, new, old_surf, new_surf, config.match_surface)
    report.shared_raw, report.shared_surface, report.shared_special = counts["raw"], counts["surface"], counts["special"]
    unique = (source < 0).nonzero().squeeze(1)
    report.unique = int(unique.numel())
    report.seconds["match"] = time.perf_counter() - clock

    output_init = config.output_init
    if output_init == "auto":  # composed output rows help small swaps, hurt huge ones (see the config)
        output_init = config.input_init if report.unique <= config.auto_output_ratio * old_n else "mean"
    report.output_init = output_init if not tied else ""
    strategies = {config.input_init} | (set() if tied else {output_init})
    estimator = None
    if report.unique and strategies & {"local", "global", "hybrid", "fvt"}:
        clock = time.perf_counter()
        pieces = old_pieces(old, new, unique.tolist(), [new_surf[i] for i in unique.tolist()])
        report.seconds["pieces"] = time.perf_counter() - clock
        needs_phi = bool(strategies & {"local", "global", "hybrid"})
        clock = time.perf_counter()
        if needs_phi:
            phi_old, phi_new, report.strings_embedded = _phi(config.embedder, old_surf, new_surf, unique, progress)
        else:  # FVT needs no embedder
            phi_old, phi_new = torch.zeros(old_n, 1), torch.zeros(report.unique, 1)
        report.seconds["embed"] = time.perf_counter() - clock
        clock = time.perf_counter()
        estimator = estimator_for(pieces, [new_surf[i] for i in unique.tolist()], old_surf, phi_new, phi_old,
                                  set(old.added_tokens_decoder), config)
        del phi_old, phi_new, pieces  # the estimator keeps only ids and weights
        report.with_local = int(estimator.has_local.sum())
        report.with_global = int(estimator.has_global.sum())
        report.seconds["weights"] = time.perf_counter() - clock

    clock = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    rows_needed = len(new)
    if config.pad_to_multiple_of:
        rows_needed = math.ceil(rows_needed / config.pad_to_multiple_of) * config.pad_to_multiple_of
    out_module = model.get_output_embeddings()
    bias = getattr(out_module, "bias", None) if out_module is not None else None
    old_bias = bias.detach()[:old_n].float().clone() if bias is not None else None
    # Resize first and fill the model's own matrices in place: no second copy of a 151k-row matrix.
    model.resize_token_embeddings(rows_needed, mean_resizing=False)

    @torch.no_grad()
    def fill(weight: torch.Tensor, old_matrix: torch.Tensor, strategy: str) -> int:
        shared = source >= 0
        weight[: len(new)][shared] = old_matrix[source[shared]].to(weight.dtype)
        missing = 0
        if report.unique:
            if strategy in ("mean", "random"):
                rows = fallback_rows(old_matrix, report.unique, strategy, generator)
            else:
                rows, missing = composed_rows(estimator, old_matrix, strategy, config.fallback, generator)
            weight[unique] = rows.to(weight.dtype)
        if rows_needed > len(new):  # padding rows: never produced by the tokenizer
            weight[len(new):] = fallback_rows(old_matrix, rows_needed - len(new), "normal", generator).to(weight.dtype)
        return missing

    report.fallback_input = fill(model.get_input_embeddings().weight, old_in, config.input_init)
    out_module = model.get_output_embeddings()
    if old_out is not None:
        report.fallback_output = fill(out_module.weight, old_out, output_init)
    if old_bias is not None and getattr(out_module, "bias", None) is not None:
        with torch.no_grad():
            b = torch.full((rows_needed,), float(old_bias.mean()))
            shared = source >= 0
            b[: len(new)][shared] = old_bias[source[shared]]
            out_module.bias.copy_(b.to(out_module.bias.dtype))
    report.seconds["rows"] = time.perf_counter() - clock
    report.embedding_rows = rows_needed
    _update_special_ids(model, new)
    _suppress_padding_rows(model, len(new), rows_needed)
    return report


def _suppress_padding_rows(model: Any, vocab: int, rows: int) -> None:
    """Rows past the tokenizer (``pad_to_multiple_of``) are ids no text has: generation must never emit them
    (they took 7.6% of the probability mass on a test model), so they go into ``generation_config.suppress_tokens``
    (saved with the model; ``generate`` sets their logits to -inf)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    kept = [t for t in (gen.suppress_tokens or []) if t < vocab]
    gen.suppress_tokens = kept + list(range(vocab, rows)) or None


def _update_special_ids(model: Any, tokenizer: Any) -> None:
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        text = model.config.get_text_config()
        if text is not model.config:
            configs.append(text)
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    for cfg in configs:
        for role in ("bos", "eos", "pad"):
            setattr(cfg, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id"))
        if hasattr(cfg, "vocab_size") and cfg is not model.generation_config:
            cfg.vocab_size = model.get_input_embeddings().weight.shape[0]


# --------------------------------------------------------------------------------------------------------------
# the new tokenizer
# --------------------------------------------------------------------------------------------------------------


def prepare_new_tokenizer(old: Any, new: Any, config: TokenAdaptConfig, where: str) -> Any:
    """Apply ``special_tokens`` overrides; carry the old chat template over (with the special tokens it names).

    When the template is carried and mentions the old EOS token (a chat turn end like ``<|im_end|>``), that token
    becomes the new EOS too, so generation stops where the model learned to stop (unless ``special_tokens`` sets
    ``eos_token``).
    """
    if not getattr(new, "is_fast", False):
        raise PluginError("TokenAdapt needs a fast (Rust) tokenizer for the new vocabulary", where=f"{where}.tokenizer",
                          fix="point at a folder with tokenizer.json (transformers converts most slow tokenizers)")
    for role, content in config.special_tokens.items():
        if role not in ROLES:
            raise PluginError(f"unknown special-token role {role!r}", where=f"{where}.special_tokens.{role}",
                              fix=f"use one of: {', '.join(ROLES)}")
        new.add_special_tokens({role: content})
    if config.keep_chat_template and not new.chat_template and old.chat_template:
        template = old.chat_template if isinstance(old.chat_template, str) else None
        if template is not None:
            new.chat_template = template
            vocab = new.get_vocab()
            specials = {t.content for t in old.added_tokens_decoder.values() if t.special}
            needed = sorted(t for t in specials if t in template and t not in vocab)
            if needed:
                new.add_special_tokens({"additional_special_tokens": needed}, replace_extra_special_tokens=False)
            if old.eos_token and old.eos_token in template and "eos_token" not in config.special_tokens:
                new.add_special_tokens({"eos_token": old.eos_token})
    if old.eos_token_id is not None and new.eos_token_id is None:
        raise PluginError(
            f"the new tokenizer has no EOS token (the model's was {old.eos_token!r}); generation would never stop",
            where=f"{where}.tokenizer",
            fix="set plugins.tokenadapt.special_tokens.eos_token to a token of the new tokenizer",
        )
    return new


def check_decodable(tokenizer: Any, where: str) -> None:
    """Every vocabulary entry must map back to text (a broken decoder makes every estimate meaningless)."""
    try:
        sample = list(range(0, len(tokenizer), max(1, len(tokenizer) // 256)))
        surfaces = token_surfaces(tokenizer, sample)
    except Exception as exc:
        raise PluginError(f"the new tokenizer's pieces do not decode: {exc}", where=f"{where}.tokenizer",
                          fix="use a tokenizer whose decoder matches its pre-tokenizer (tokenizer.json)") from None
    empty = sum(1 for s in surfaces if not s)
    if empty > len(surfaces) // 2:
        raise PluginError(f"{empty} of {len(surfaces)} sampled tokens of the new tokenizer decode to empty strings",
                          where=f"{where}.tokenizer", fix="check the tokenizer's decoder")
