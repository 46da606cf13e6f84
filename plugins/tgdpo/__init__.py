"""TGDPO: token-level reward guidance for DPO (docs/plugins/tgdpo.md)."""

from .plugin import TGDPOConfig, TGDPOPlugin

__all__ = ["TGDPOConfig", "TGDPOPlugin"]
