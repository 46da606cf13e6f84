"""Regenerate the docs that come from code:  python scripts/gen_docs.py

docs/recipes.md from the recipe schema and the registered tasks, docs/hooks.md from hf_tokplug/hookspecs.py (tests/test_docs.py fails when
either is stale)."""

from pathlib import Path

from hf_tokplug.docgen import hooks_markdown, recipes_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS.joinpath("recipes.md").write_text(recipes_markdown(), encoding="utf-8")
DOCS.joinpath("hooks.md").write_text(hooks_markdown(), encoding="utf-8")
