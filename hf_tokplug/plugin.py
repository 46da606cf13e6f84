"""The base class a plugin derives from (optional, but it documents the contract)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """Base for plugin configs: unknown keys are rejected, so a typo in a recipe is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """A plugin: hook implementations (``@hf_tokplug.hookimpl`` methods) on one class.

    The entry point in the ``hf_tokplug`` group points at the class. The host builds one instance per run as
    ``cls(name=..., config=...)``, where ``config`` is an instance of ``config_class`` validated from the recipe's
    ``plugins.<name>`` block, so per-run state may live on ``self``. Setup hooks (``tokplug_register_*``) are
    called on the class, without an instance: declare them as ``@staticmethod``.

    Class attributes:
        config_class: pydantic model of the plugin's recipe block (derive from :class:`PluginConfig`).
            ``None`` means the plugin takes no options.
        citation: BibTeX of the method, copied into model cards.
        paper: a link to the method's paper, for ``tokplug plugins`` and model cards.
    """

    config_class: ClassVar[type[BaseModel] | None] = None
    citation: ClassVar[str | None] = None
    paper: ClassVar[str | None] = None

    def __init__(self, name: str, config: BaseModel | None = None):
        self.name = name
        self.config = config

    def config_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, for the manifest."""
        return self.config.model_dump(mode="json") if self.config is not None else {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
