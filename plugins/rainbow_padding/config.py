"""Options of the ``rainbow_padding`` plugin (Rainbow Padding, ICLR 2026)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hf_tokplug.plugin import PluginConfig


class RainbowPaddingConfig(PluginConfig):
    """Rainbow padding: one EOS at the true end, then a repeating cycle of K distinct pad tokens.

    Args:
        num_pads: K, the number of distinct pad tokens (7 is enough in the paper). 0 keeps plain EOS padding, the
            baseline this method fixes.
        start_index: which pad follows the EOS (the authors do not say; default pad_0). The cycle is
            pad_{start}, pad_{start+1}, ... modulo K.
        init: how the new embedding rows start: ``eos`` copies the EOS row plus small noise (default), ``mean`` takes
            the mean of the existing rows. Not confirmed by the authors: both are offered.
        noise_std: noise added to the copied rows, as a fraction of the embedding's std (distinct pads must not
            start identical).
        token_format: the pad tokens' strings; ``{i}`` is the pad index.
    """

    num_pads: int = Field(7, ge=0, description="K distinct pad tokens; 0 = plain EOS padding (baseline).")
    start_index: int = Field(0, ge=0, description="Pad index right after the EOS.")
    init: Literal["eos", "mean"] = Field("eos", description="Init of the new rows: EOS row + noise, or mean row.")
    noise_std: float = Field(0.02, ge=0.0, description="Noise on copied rows (fraction of the rows' std).")
    token_format: str = Field("<|rainbow_pad_{i}|>", description="Pad token strings.")
