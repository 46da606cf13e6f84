"""TokenAdapt: tokenizer transplantation with hybrid init, and supertoken tokenizers (docs/plugins/tokenadapt.md)."""

from .config import EmbedderConfig, EvalConfig, TokenAdaptConfig
from .plugin import TokenAdaptPlugin
from .transplant import TransplantReport, transplant

__all__ = ["EmbedderConfig", "EvalConfig", "TokenAdaptConfig", "TokenAdaptPlugin", "TransplantReport", "transplant"]
