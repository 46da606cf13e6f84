"""TARA: token-aware LoRA for composable personalization of diffusion models (docs/plugins/tara.md)."""

from .config import TARAConfig
from .masking import MaskState, compose, install, token_mask
from .plugin import TARAPlugin

__all__ = ["MaskState", "TARAConfig", "TARAPlugin", "compose", "install", "token_mask"]
