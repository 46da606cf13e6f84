"""CAFT auxiliary heads: head i (1..n) predicts token t+1+i from the model's final hidden state at t.

Head input (both stages, documented): the backbone's last hidden state *after* its final norm, i.e. exactly what
the LM head sees. Two head types:

- ``transformer``: a copy of one of the model's own decoder layers (default the second-to-last), followed by a copy
  of the final norm, so any decoder-only architecture works (rotary embeddings and the causal mask come from the
  model's own ``rotary_emb`` / ``create_causal_mask``).
- ``linear``: x + SiLU(W x) with W = 0 at init (the head starts as the identity).

Unembedding: shared with the model's LM head (default) or a separate copy per head. Losses are computed one head at a
time and, within a head, over chunks of valid positions under activation checkpointing, so no
``(B, T, V)`` logits tensor is ever kept: peak extra memory is one ``(chunk, V)`` block. Each head's layer is
checkpointed too (by default), so a head keeps about one ``(B, T, H)`` tensor for backward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_tokplug.plugin import output_logits


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of decoder layers (``layers`` in Llama/Qwen/NeoX, ``h`` in GPT-2, ...)."""
    n = getattr(backbone.config, "num_hidden_layers", None)
    candidates = [m for m in backbone.children() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for module in candidates:
        if n is None or len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(backbone).__name__}")


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The backbone's final norm: the last direct child whose class name says it is a norm."""
    norms = [m for m in backbone.children() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else None


def clean_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every PEFT tuner layer (LoRA, ...) replaced by its base layer: heads never carry adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    clone = copy.deepcopy(module)
    tuned = [name for name, m in clone.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in tuned:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, child, getattr(parent, child).get_base_layer())
    return clone


class ResidualHead(nn.Module):
    """x + SiLU(W x), W initialised to zero."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class BlockHead(nn.Module):
    """A copy of a decoder layer plus a copy of the final norm, called like the backbone calls its layers."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None):
        super().__init__()
        self.layer = clean_copy(layer)
        self.norm = clean_copy(norm) if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor, *, mask: object = None, position_embeddings: object = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"attention_mask": mask, "position_ids": position_ids}
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        out = self.layer(x, **kwargs)
        return self.norm(out[0] if isinstance(out, tuple) else out)


class CAFTHeads(nn.Module):
    """``n`` auxiliary heads (and, with separate unembeddings, their own output matrices)."""

    def __init__(self, heads: list[nn.Module], unembeddings: list[nn.Linear] | None = None):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.unembeddings = nn.ModuleList(unembeddings) if unembeddings else None

    def __len__(self) -> int:
        return len(self.heads)


def build_heads(model: nn.Module, num_heads: int, head_type: str, init_layer: int, unembedding: str) -> CAFTHeads:
    """Heads for a (non-PEFT) causal LM, built from its own modules and placed on its device and dtype."""
    backbone = model.base_model
    hidden = model.config.get_text_config().hidden_size
    if head_type == "transformer":
        layers = decoder_layers(backbone)
        layer = layers[init_layer]
        heads = [BlockHead(layer, final_norm(backbone)) for _ in range(num_heads)]
    else:
        heads = [ResidualHead(hidden) for _ in range(num_heads)]
    unembeddings = None
    if unembedding == "separate":
        out = model.get_output_embeddings()
        unembeddings = [clean_copy(out) for _ in range(num_heads)]
    weight = model.get_output_embeddings().weight
    return CAFTHeads(heads, unembeddings).to(device=weight.device, dtype=weight.dtype)


@dataclass
class HeadContext:
    """What a transformer-block head needs besides the hidden states: mask and rotary embeddings."""

    mask: object = None
    position_embeddings: object = None
    position_ids: torch.Tensor | None = None


def head_context(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> HeadContext:
    from transformers.masking_utils import create_causal_mask

    backbone = model.base_model
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    rotary = getattr(backbone, "rotary_emb", None)
    position_embeddings = rotary(hidden, position_ids=position_ids) if rotary is not None else None
    return HeadContext(mask, position_embeddings, position_ids)


def _chunk_loss(model: nn.Module, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (chunk, V): the only vocabulary-sized tensor, recomputed in backward; the model's own logit transform
    # (bias, logit scale, Gemma's final soft-capping) applies, so the heads are scored like the model
    logits = output_logits(model, rows, weight, bias)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().to(loss.dtype)
    return loss, correct


@dataclass
class HeadLoss:
    loss_sum: torch.Tensor  # summed cross-entropy over valid positions
    correct: torch.Tensor  # number of positions where the head's argmax is the label
    count: int


def head_losses(heads: CAFTHeads, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None, chunk_size: int, checkpoint_heads: bool = True) -> list[HeadLoss]:
    """Per head i (1-based): CE of head(hidden)[:, t] against labels[:, t + 1 + i], chunked over valid positions.

    With ``checkpoint_heads`` each head's own layer is recomputed in backward instead of keeping its activations,
    so the heads add about one ``(B, T, H)`` tensor each to the memory of a step.
    """
    ctx = head_context(model, hidden, attention_mask) if any(isinstance(h, BlockHead) for h in heads.heads) else HeadContext()
    shared = model.get_output_embeddings()  # weight (V, H), maybe a bias
    out = []
    for i, head in enumerate(heads.heads, start=1):
        kwargs = {"mask": ctx.mask, "position_embeddings": ctx.position_embeddings, "position_ids": ctx.position_ids}
        if checkpoint_heads and torch.is_grad_enabled():
            h = checkpoint(head, hidden, use_reentrant=False, **kwargs)
        else:
            h = head(hidden, **kwargs)
        shift = 1 + i
        states, targets = h[:, :-shift], labels[:, shift:]  # (B, T-1-i, H), (B, T-1-i)
        valid = targets != -100
        rows, targets = states[valid], targets[valid]  # (N, H), (N,)
        unembedding = heads.unembeddings[i - 1] if heads.unembeddings is not None else shared
        weight, bias = unembedding.weight, getattr(unembedding, "bias", None)
        loss_sum = rows.new_zeros((), dtype=torch.float32)
        correct = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_size):
            piece = slice(start, start + chunk_size)
            loss, hits = checkpoint(_chunk_loss, model, rows[piece], weight, bias, targets[piece], use_reentrant=False)
            loss_sum, correct = loss_sum + loss, correct + hits.detach()
        out.append(HeadLoss(loss_sum, correct, int(rows.shape[0])))
    return out
