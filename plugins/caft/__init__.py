"""CAFT: concept-aware fine-tuning with auxiliary multi-token heads (docs/plugins/caft.md)."""

from .config import CAFTConfig
from .plugin import CAFTPlugin

__all__ = ["CAFTConfig", "CAFTPlugin"]
