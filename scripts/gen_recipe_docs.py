"""Regenerate docs/recipes.md from the recipe schema:  python scripts/gen_recipe_docs.py"""

from pathlib import Path

from hf_tokplug.recipe import reference_markdown

Path(__file__).resolve().parents[1].joinpath("docs", "recipes.md").write_text(reference_markdown(), encoding="utf-8")
