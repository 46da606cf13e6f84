"""Options of the ``dynamic_tokenization`` plugin ("Retrofitting (Large) Language Models with Dynamic Tokenization",
ACL 2025)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from hf_tokplug.plugin import PluginConfig

from .merge import MODES


class DynamicTokenizationConfig(PluginConfig):
    """Batch-level dynamic BPE in front of a model's embeddings.

    Args:
        merges: merges per training batch: a number, or ``[low, high]`` to sample a level uniformly per batch (the
            paper's way of training task adapters that work at any level). 0 turns merging off (parity).
        eval_merges: merges per batch in evaluation mode (``model.eval()``: Trainer's evaluation, inference).
            Default: the upper end of ``merges``.
        mode: validity of a merge: ``pretokens`` (inside one pre-token of the base tokenizer, the default),
            ``word``, ``word_hyphen`` or ``sentence`` (see ``merge.py``).
        embedding: rows of dynamic tokens: ``fvt`` (mean of the base pieces' rows, no training; follows the model's
            embedding while it trains) or ``hypernet`` (a trained hypernetwork, ``hypernet_path``).
        hypernet_path: folder written by the ``dyntok_hypernet`` task (``hypernet.safetensors`` + ``hypernet.json``).
        cache_size: LRU cache of hypernetwork rows, keyed by token string (5,000 in the paper).
    """

    merges: int | tuple[int, int] = Field(20)
    eval_merges: int | None = Field(None, ge=0)
    mode: str = "pretokens"
    embedding: Literal["fvt", "hypernet"] = "fvt"
    hypernet_path: str | None = None
    cache_size: int = Field(5000, ge=0)

    @field_validator("merges")
    @classmethod
    def _merges(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 0 or high < low:
            raise ValueError("merges must be >= 0, or [low, high] with 0 <= low <= high")
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; use one of {', '.join(MODES)}")
        return value

    @property
    def merge_range(self) -> tuple[int, int]:
        return (self.merges, self.merges) if isinstance(self.merges, int) else tuple(self.merges)

    @property
    def evaluation_merges(self) -> int:
        return self.merge_range[1] if self.eval_merges is None else self.eval_merges

    @property
    def active(self) -> bool:
        return self.merge_range[1] > 0 or self.evaluation_merges > 0
