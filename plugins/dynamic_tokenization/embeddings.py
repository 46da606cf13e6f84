"""Embeddings for dynamic tokens: FVT (mean of the base pieces' rows) and a hypernetwork, with an LRU cache.

The hypernetwork maps a token's base pieces to an embedding: the pieces are embedded with the model's frozen
embedding (input and output rows concatenated for decoders with an untied head), projected to width d, passed
through a projector block ``LayerNorm(GELU(W2 GELU(W1 x)) + x)`` and a small transformer encoder, and the first
position goes through a projector + Linear back to the model width: one head for input embeddings, another for
output embeddings. The heads predict a correction to the FVT row (mean of the pieces' rows) and start at zero, so
an untrained hypernetwork is exactly FVT and training can only move away from it where that helps; a single-piece
token's FVT row is its original row, which the lexical loss keeps.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn


class Projector(nn.Module):
    """``LayerNorm(GELU(W2 GELU(W1 x)) + x)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.w1, self.w2, self.norm = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = nn.functional.gelu
        return self.norm(act(self.w2(act(self.w1(x)))) + x)


class HyperNetwork(nn.Module):
    """Pieces ``(N, P)`` (-1 = padding) -> ``(N, H)`` input embeddings (and output embeddings with ``output_head``).

    Args:
        embeddings: the model's frozen piece table ``(V, E)`` (E = H, or 2H with input and output rows concatenated:
            the FVT base of the input head uses the first H columns, the output head's the last H).
        hidden: model width H of the predicted rows.
        width: d, the hypernetwork's width.
        layers, heads: the transformer encoder over the pieces.
        output_head: also predict output (LM head) rows.
    """

    def __init__(self, embeddings: torch.Tensor, hidden: int, width: int = 256, layers: int = 2, heads: int = 4,
                 output_head: bool = False, max_pieces: int = 32):
        super().__init__()
        self.register_buffer("table", embeddings.detach().float().clone(), persistent=False)
        self.hidden, self.max_pieces = hidden, max_pieces
        self.inp = nn.Linear(embeddings.shape[1], width)
        self.pre = Projector(width)
        self.position = nn.Embedding(max_pieces, width)
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.heads = nn.ModuleDict({"input": self._head(width, hidden)})
        if output_head:
            self.heads["output"] = self._head(width, hidden)

    @staticmethod
    def _head(width: int, hidden: int) -> nn.Module:
        head = nn.Sequential(Projector(width), nn.Linear(width, hidden))
        nn.init.zeros_(head[1].weight)  # start as FVT exactly
        nn.init.zeros_(head[1].bias)
        return head

    def forward(self, pieces: torch.Tensor, side: str = "input") -> torch.Tensor:
        pieces = pieces[:, : self.max_pieces]
        pad = pieces < 0
        x = self.inp(self.table[pieces.clamp(min=0)])  # (N, P, d)
        x = self.pre(x) + self.position(torch.arange(pieces.shape[1], device=pieces.device))
        x = self.encoder(x, src_key_padding_mask=pad)
        hidden = self.table.shape[1] // 2 if self.table.shape[1] == 2 * self.hidden else 0
        columns = self.table[:, hidden:] if side == "output" and hidden else self.table[:, : self.hidden]
        return mean_of_pieces(columns, pieces) + self.heads[side](x[:, 0])  # FVT + the head's correction

    def config_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "width": self.inp.out_features, "layers": len(self.encoder.layers),
                "heads": self.encoder.layers[0].self_attn.num_heads, "output_head": "output" in self.heads,
                "max_pieces": self.max_pieces}


def pad_pieces(pieces: list[list[int]], device: Any = None) -> torch.Tensor:
    width = max((len(p) for p in pieces), default=1)
    out = torch.full((len(pieces), width), -1, dtype=torch.long)
    for i, p in enumerate(pieces):
        out[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return out.to(device) if device is not None else out


def mean_of_pieces(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(N, H)`` mean of ``table``'s rows over each row of padded piece ids ``(N, P)`` (-1 = padding)."""
    valid = (ids >= 0).unsqueeze(-1).to(table.dtype)
    return (table[ids.clamp(min=0)] * valid).sum(1) / valid.sum(1).clamp(min=1)


def fvt_rows(table: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    """Mean of the base rows of each token's pieces."""
    return mean_of_pieces(table, pad_pieces(pieces, table.device))


class EmbeddingCache:
    """LRU cache of predicted rows keyed by the token's string (``maxsize`` entries)."""

    def __init__(self, maxsize: int = 5000):
        self.maxsize = maxsize
        self.rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        row = self.rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self.rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, key: str, row: torch.Tensor) -> None:
        self.rows[key] = row
        self.rows.move_to_end(key)
        while len(self.rows) > self.maxsize:
            self.rows.popitem(last=False)

    def clear(self) -> None:
        self.rows.clear()


HYPERNET_FILE = "hypernet.safetensors"
HYPERNET_META = "hypernet.json"


def piece_table(model: Any, output_head: bool) -> torch.Tensor:
    """The frozen rows the hypernetwork embeds pieces with: input rows, with output rows beside them for decoders
    whose LM head is untied (``(V, 2H)``); a tied or absent head gives the input rows twice, so the layout is one."""
    emb_in = model.get_input_embeddings().weight.detach()
    if not output_head:
        return emb_in
    out = model.get_output_embeddings()
    return torch.cat([emb_in, (out.weight if out is not None else emb_in).detach()], dim=1)


def save_hypernet(net: HyperNetwork, folder: Any, **meta: Any) -> None:
    """``hypernet.safetensors`` (weights; the frozen piece table is not saved) + ``hypernet.json``."""
    from pathlib import Path

    from safetensors.torch import save_file

    from hf_tokplug.plugin import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / HYPERNET_FILE))
    info = {"config": net.config_dict(), "vocab_rows": int(net.table.shape[0]), **meta}
    write_json_atomic(folder / HYPERNET_META, info)


def load_hypernet(folder: Any, model: Any) -> HyperNetwork:
    """The hypernetwork saved in ``folder`` over ``model``'s own embedding rows (sizes must match)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / HYPERNET_META).read_text(encoding="utf-8"))
    cfg = info["config"]
    table = piece_table(model, cfg["output_head"])
    if table.shape[0] != info["vocab_rows"] or model.get_input_embeddings().weight.shape[1] != cfg["hidden"]:
        raise ValueError(
            f"the hypernetwork in {folder} was trained for {info['vocab_rows']} rows of width {cfg['hidden']}; this "
            f"model has {table.shape[0]} rows of width {model.get_input_embeddings().weight.shape[1]}"
        )
    net = HyperNetwork(table, **cfg)
    net.load_state_dict(load_file(str(folder / HYPERNET_FILE)))
    return net.eval().requires_grad_(False).to(table.device)
