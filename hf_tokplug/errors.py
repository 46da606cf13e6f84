"""User-facing errors: each says what was wrong, where (file and key), and what to do."""

from __future__ import annotations


class TokPlugError(Exception):
    """An error caused by the user's input, shown without a traceback by the CLI (unless `--debug`).

    Args:
        message: what is wrong.
        where: the file (and key) it was found in, e.g. ``recipes/x.yaml: plugins.caft.num_heads``.
        fix: what the user should do about it.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        lines = [f"{self.where}: {self.message}" if self.where else self.message]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


class RecipeError(TokPlugError):
    """The recipe (or one of its overrides) is invalid."""


class PluginError(TokPlugError):
    """A plugin is missing, failed to import, is misconfigured, or broke the hook contract."""


class RunDirError(TokPlugError):
    """The output folder cannot be used (in use by another run, or not empty without `overwrite: true`)."""
