"""Decoder use: dynamic-token prefill, and greedy generation over an expanded vocabulary through an ANN index.

The vocabulary is expanded by continued BPE: batch-level merges over a corpus (the same merge loop, one big
batch), so every new token is a sequence of base pieces. Its input and output rows come from FVT (means of the
base rows) or a hypernetwork. Generation runs the model's backbone on ``inputs_embeds`` with a KV cache; at each
step the last hidden state, normalised, queries a faiss HNSW index over the normalised output rows for candidates,
which are then scored exactly (``h . E_out``, unnormalised: the true logits) and the best one is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .embeddings import fvt_rows
from .merge import encode_batch, merge_batch


@dataclass
class ExpandedVocabulary:
    """Base vocabulary + new tokens: ``pieces[i]`` are the base ids of token ``base_vocab + i``."""

    base_vocab: int
    pieces: list[list[int]]
    input_rows: torch.Tensor  # (base_vocab + n, H)
    output_rows: torch.Tensor  # (base_vocab + n, H)

    def token_pieces(self, token: int) -> list[int]:
        return [token] if token < self.base_vocab else self.pieces[token - self.base_vocab]

    def decode(self, tokenizer: Any, tokens: list[int]) -> str:
        return tokenizer.decode([p for t in tokens for p in self.token_pieces(t)])


def expand_vocabulary(model: Any, tokenizer: Any, texts: list[str], new_tokens: int, mode: str = "pretokens",
                      hypernet: Any = None, max_length: int = 256) -> ExpandedVocabulary:
    """Continued BPE over ``texts`` (``new_tokens`` merges); rows by FVT, or by ``hypernet`` when given."""
    batch = merge_batch(encode_batch(tokenizer, texts, mode, max_length=max_length, add_special_tokens=False),
                        max_merges=new_tokens)
    emb_in = model.get_input_embeddings().weight.detach()
    out_layer = model.get_output_embeddings()
    emb_out = out_layer.weight.detach() if out_layer is not None else emb_in
    base = emb_in.shape[0]
    if batch.base_vocab != base:
        batch.base_vocab = base  # a padded embedding: ids stay below the tokenizer size anyway
    if hypernet is not None:
        from .embeddings import pad_pieces

        with torch.no_grad():
            ids = pad_pieces(batch.pieces, emb_in.device)
            new_in = hypernet(ids, "input")
            new_out = hypernet(ids, "output") if "output" in hypernet.heads else fvt_rows(emb_out, batch.pieces)
    else:
        new_in, new_out = fvt_rows(emb_in, batch.pieces), fvt_rows(emb_out, batch.pieces)
    return ExpandedVocabulary(base, batch.pieces, torch.cat([emb_in, new_in.to(emb_in.dtype)]),
                              torch.cat([emb_out, new_out.to(emb_out.dtype)]))


class OutputIndex:
    """faiss HNSW (inner product) over the normalised output rows; exact rescoring of the candidates."""

    def __init__(self, output_rows: torch.Tensor, neighbours: int = 32, ef_search: int = 128):
        import faiss

        self.rows = output_rows.detach().float().cpu()  # faiss searches on the CPU; rescoring happens beside it
        vectors = torch.nn.functional.normalize(self.rows, dim=-1).numpy()
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = ef_search
        self.index.add(vectors)

    def best(self, hidden: torch.Tensor, candidates: int = 64) -> torch.Tensor:
        """``(B,)`` the highest-scoring token among the ANN candidates of each ``(B, H)`` hidden state."""
        query = torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()
        _, ids = self.index.search(query, candidates)
        ids = torch.from_numpy(ids).clamp(min=0)  # (B, k); -1 (not found) -> 0, rescored away below
        scores = torch.einsum("bh,bkh->bk", hidden.float(), self.rows[ids])
        return ids.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


def _backbone(model: Any) -> Any:
    return getattr(model, model.base_model_prefix)


@torch.no_grad()
def ann_generate(model: Any, tokenizer: Any, prompt: str, vocab: ExpandedVocabulary, index: OutputIndex,
                 max_new_tokens: int = 64, use_cache: bool = True, candidates: int = 64,
                 prompt_merges: int = 0, stop_at_eos: bool = True) -> tuple[list[int], str]:
    """Greedy generation over ``vocab`` (``use_cache=False`` re-runs the whole sequence each step: the reference's
    loop, kept for comparison). The prompt may itself be merged (``prompt_merges``) with FVT rows."""
    batch = encode_batch(tokenizer, [prompt], max_length=None, add_special_tokens=True)
    if prompt_merges:
        batch = merge_batch(batch, max_merges=prompt_merges)
    ids = batch.ids[0][batch.ids[0] >= 0].tolist()
    rows = [vocab.input_rows[i] if i < vocab.base_vocab else
            fvt_rows(vocab.input_rows[: vocab.base_vocab], [batch.pieces[i - batch.base_vocab]])[0] for i in ids]
    backbone = _backbone(model)
    device = next(model.parameters()).device
    embeds = torch.stack(rows).unsqueeze(0).to(device)  # (1, T, H)
    out = backbone(inputs_embeds=embeds, use_cache=use_cache)
    past = out.past_key_values if use_cache else None
    generated: list[int] = []
    eos = tokenizer.eos_token_id if stop_at_eos else None
    for _ in range(max_new_tokens):
        token = int(index.best(out.last_hidden_state[:, -1].float().cpu(), candidates)[0])
        generated.append(token)
        if token == eos:
            break
        step = vocab.input_rows[token].view(1, 1, -1).to(device)
        if use_cache:
            out = backbone(inputs_embeds=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            embeds = torch.cat([embeds, step], dim=1)
            out = backbone(inputs_embeds=embeds, use_cache=False)
    return generated, vocab.decode(tokenizer, generated)


@torch.no_grad()
def prefill_generate(model: Any, encoder: Any, prompts: list[str], merges: int, **generate_kwargs: Any) -> list[str]:
    """Prefill with dynamic tokens, then ``model.generate`` continues with base tokens (new text only).

    ``encoder``: a :class:`~.encoder.DynamicEncoder` over ``model`` (FVT or hypernetwork rows). The merged prompts
    are left-padded as ``inputs_embeds``; with ``merges=0`` this is plain generation from the prompts' ids."""
    batch = encoder.batch(prompts, merges)
    embeds = encoder.inputs_embeds(batch)  # (B, T, H), right-padded
    lengths = batch.lengths.to(embeds.device)
    width = embeds.shape[1]
    shift = width - lengths  # (B,) left-pad each row by rolling it
    source = (torch.arange(width, device=embeds.device).unsqueeze(0) - shift.unsqueeze(1)) % width  # (B, T)
    embeds = embeds.gather(1, source.unsqueeze(-1).expand_as(embeds))
    mask = (torch.arange(width, device=embeds.device).unsqueeze(0) >= shift.unsqueeze(1)).long()
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
    return encoder.tokenizer.batch_decode(out, skip_special_tokens=True)
