"""Rainbow padding for masked-diffusion LLM SFT (docs/plugins/rainbow_padding.md)."""

from .config import RainbowPaddingConfig
from .plugin import RainbowPaddingPlugin, fill_rainbow

__all__ = ["RainbowPaddingConfig", "RainbowPaddingPlugin", "fill_rainbow"]
