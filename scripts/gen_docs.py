"""Regenerate the docs that come from code:  python scripts/gen_docs.py

docs/recipes.md from the recipe schema, docs/hooks.md from hf_tokplug/hookspecs.py (tests/test_docs.py fails when
either is stale)."""

from pathlib import Path

from hf_tokplug.hookdocs import hooks_markdown
from hf_tokplug.recipe import reference_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS.joinpath("recipes.md").write_text(reference_markdown(), encoding="utf-8")
DOCS.joinpath("hooks.md").write_text(hooks_markdown(), encoding="utf-8")
