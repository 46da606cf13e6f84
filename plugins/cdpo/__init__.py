"""cDPO: critical tokens by contrastive estimation (docs/plugins/cdpo.md)."""

from .plugin import CDPOConfig, CDPOPlugin

__all__ = ["CDPOConfig", "CDPOPlugin"]
