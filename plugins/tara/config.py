"""Options of the ``tara`` plugin (TARA: Token-Aware LoRA, AAAI 2026)."""

from __future__ import annotations

from pydantic import Field

from hf_tokplug.plugin import PluginConfig


class TARAConfig(PluginConfig):
    """Token-aware LoRA: cross-attention K/V LoRA deltas only at the rare token's positions, plus a key alignment loss.

    Args:
        rare_token: the identifier word of the concept (``sks``); every sub-token of it is masked in, wherever it
            occurs in the prompt (sliding-window match of its token ids).
        class_word: the concept's class word (``dog``), which must follow in the training prompt; the rare token's
            adapted keys are pulled toward this word's frozen keys.
        align_weight: lambda of the token alignment loss (1.0 in the reference). 0 turns it off.
        mask: multiply the cross-attention to_k/to_v LoRA outputs by the rare-token mask. ``false`` with
            ``align_weight: 0`` is plain DreamBooth LoRA (the parity configuration).
        compose: folders (or Hub ids) of trained TARA adapters to inject into the pipeline at inference
            (``tokplug_prepare_pipeline``); each applies its masked K/V delta only at its own token's positions.
        fuse_global: at composition, merge the adapters' unmasked branches (self-attention, to_q, to_out) into the
            base weights, leaving only the masked cross-attention K/V branches live (same outputs, less latency).
        cache_kv: at composition, compute the cross-attention K/V once per prompt and reuse them at every denoising
            step (the text side does not change between steps).
    """

    rare_token: str | None = None
    class_word: str | None = None
    align_weight: float = Field(1.0, ge=0.0)
    mask: bool = True
    compose: list[str] = Field(default_factory=list)
    fuse_global: bool = True
    cache_kv: bool = True
