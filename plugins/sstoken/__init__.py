"""ssToken: self-modulated and semantic-aware token selection for SFT (docs/plugins/sstoken.md)."""

from .plugin import SSTokenConfig, SSTokenPlugin

__all__ = ["SSTokenConfig", "SSTokenPlugin"]
