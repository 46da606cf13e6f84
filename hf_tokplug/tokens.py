"""Adding tokens: record them on the tokenizer side, resize the model, initialise the new rows by strategy.

Plugins call :func:`add_tokens` in ``tokplug_prepare_tokenizer``; the host resizes the model and fills the new rows
(input embeddings, and output embeddings when they are not tied) right after the model loads, using the strategy
named in the record. Strategies come from the ``tokplug_register_token_inits`` registry, so a plugin can offer one
(e.g. TokenAdapt's hybrid) that any other plugin then names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import PluginError
from .modeling import is_tied

if TYPE_CHECKING:
    from .context import RunContext


@dataclass
class AddedToken:
    """One token a plugin added: who added it, how its rows are initialised, whether LoRA must train them."""

    token: str
    id: int
    plugin: str
    init: str = "mean"
    init_options: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenInitRequest:
    """What a token-init strategy receives.

    Attributes:
        ctx: the run context (tokenizer, plugins' state).
        weight: the full matrix after resizing, ``(vocab, hidden)``, detached; do not modify it.
        old_vocab_size: rows ``[0, old_vocab_size)`` existed before any token was added.
        token_ids: ids of the rows to initialise.
        tokens: the token strings, aligned with ``token_ids``.
        side: ``"input"`` (embedding) or ``"output"`` (LM head, only when untied).
    """

    ctx: RunContext | None
    weight: torch.Tensor
    old_vocab_size: int
    token_ids: list[int]
    tokens: list[str]
    side: str

    @property
    def old_rows(self) -> torch.Tensor:
        return self.weight[: self.old_vocab_size]

    def token_id(self, token: str) -> int:
        tokenizer = self.ctx.tokenizer if self.ctx is not None else None
        if tokenizer is None:
            raise PluginError("this token-init strategy needs the tokenizer on the run context")
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise PluginError(f"token-init: token {token!r} is not in the vocabulary")
        return int(tid)


def _generator(request: TokenInitRequest, seed: int | None) -> torch.Generator:
    base = seed if seed is not None else (request.ctx.seed if request.ctx is not None else 0)
    return torch.Generator().manual_seed(int(base) + (1 if request.side == "output" else 0))


def init_mean(request: TokenInitRequest, noise_std: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """Every new row = mean of the old rows (+ optional Gaussian noise, as a fraction of the rows' std)."""
    old = request.old_rows.float()
    rows = old.mean(0, keepdim=True).expand(len(request.token_ids), -1).clone()
    if noise_std:
        rows += torch.randn(rows.shape, generator=_generator(request, seed)) * noise_std * old.std()
    return rows


def init_normal(request: TokenInitRequest, seed: int | None = None) -> torch.Tensor:
    """N(mean, std) with the scalar mean and std of the old matrix (TokenAdapt's fallback)."""
    old = request.old_rows.float()
    shape = (len(request.token_ids), old.shape[1])
    return torch.randn(shape, generator=_generator(request, seed)) * old.std() + old.mean()


def init_copy(request: TokenInitRequest, token: str, noise_std: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """Every new row = the row of ``token`` (e.g. the EOS token) + optional noise (fraction of the rows' std)."""
    row = request.weight[request.token_id(token)].float()
    rows = row.unsqueeze(0).expand(len(request.token_ids), -1).clone()
    if noise_std:
        rows += torch.randn(rows.shape, generator=_generator(request, seed)) * noise_std * request.old_rows.float().std()
    return rows


BUILTIN_INITS = {"mean": init_mean, "normal": init_normal, "copy": init_copy}


def add_tokens(
    ctx: RunContext,
    tokenizer: Any,
    tokens: list[str],
    *,
    plugin: str,
    special: bool = True,
    init: str = "mean",
    init_options: dict[str, Any] | None = None,
    trainable: bool = True,
) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` (skipping ones it already has) and record them on ``ctx``.

    Call it from ``tokplug_prepare_tokenizer``. Rows are created later, when the model is prepared: the host resizes
    the embeddings (and an untied LM head) and fills the new rows with the ``init`` strategy.

    Args:
        plugin: who adds them (your ``self.name``): recorded in tokplug.json and shown by ``tokplug preview``.
        special: add them as special tokens (never split; ``skip_special_tokens`` drops them when decoding).
        init: a registered token-init strategy (``mean``, ``normal``, ``copy``, or one a plugin registers).
        init_options: keyword arguments of the strategy; JSON-serialisable (saved in tokplug.json), e.g.
            ``{"token": tokenizer.eos_token, "noise_std": 0.01}`` for ``copy``.
        trainable: under LoRA, the rows train (PEFT ``trainable_token_indices``; an untied head in
            ``modules_to_save``).

    Returns:
        The ids of all ``tokens``, in order (tokens the tokenizer already had keep their ids and are not recorded).
    """
    if init not in ctx.token_inits:
        raise PluginError(
            f"plugin {plugin!r} asked for token-init strategy {init!r}, which is not registered",
            fix=f"use one of: {', '.join(sorted(ctx.token_inits))}",
        )
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        if special:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_tokens(missing)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    for token, tid in zip(tokens, ids):
        if token in missing:
            ctx.added_tokens.append(AddedToken(token, tid, plugin, init, dict(init_options or {}), trainable))
    return ids


@torch.no_grad()
def resize_and_init(ctx: RunContext, model: Any, pad_to_multiple_of: int | None = None) -> Any:
    """Resize ``model`` to the tokenizer and initialise rows of ``ctx.added_tokens`` (grouped by strategy)."""
    if not ctx.added_tokens:
        return model
    emb = model.get_input_embeddings()
    old_vocab_size = min(t.id for t in ctx.added_tokens)
    needed = max(len(ctx.tokenizer), max(t.id for t in ctx.added_tokens) + 1)
    if emb.weight.shape[0] < needed or pad_to_multiple_of:
        model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    sides = [("input", model.get_input_embeddings().weight)]
    if not is_tied(model):
        sides.append(("output", model.get_output_embeddings().weight))
    groups: dict[tuple[str, str], list[AddedToken]] = {}
    for record in ctx.added_tokens:
        key = (record.init, repr(sorted(record.init_options.items())))
        groups.setdefault(key, []).append(record)
    for records in groups.values():
        strategy = ctx.token_inits[records[0].init]
        ids = [r.id for r in records]
        for side, weight in sides:
            request = TokenInitRequest(ctx, weight.detach(), old_vocab_size, ids, [r.token for r in records], side)
            rows = strategy(request, **records[0].init_options)
            if rows is None:
                continue
            if tuple(rows.shape) != (len(ids), weight.shape[1]):
                raise PluginError(
                    f"token-init strategy {records[0].init!r} returned rows of shape {tuple(rows.shape)}, "
                    f"expected {(len(ids), weight.shape[1])}"
                )
            weight[ids] = rows.to(weight.dtype)
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # a transformers model (a Diffusers module keeps its own configs)
        config.get_text_config().vocab_size = model.get_input_embeddings().weight.shape[0]
    return model


def trainable_token_ids(ctx: RunContext) -> list[int]:
    return sorted({t.id for t in ctx.added_tokens if t.trainable})
