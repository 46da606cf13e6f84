"""Docs stay true: every hook documented with its rule, the recipe reference matches the schema, every
built-in recipe opens with its command and validates offline, README gives the two set-up commands."""

from __future__ import annotations

import inspect
import re

import pytest

from hf_tokplug import hookspecs
from hf_tokplug.cli import builtin_recipes, main
from hf_tokplug.hookspecs import HOOK_RULES

from conftest import REPO

HOOKS_MD = (REPO / "docs" / "hooks.md").read_text()


@pytest.mark.parametrize("name", sorted(HOOK_RULES))
def test_plugin_hooks_are_documented(name):
    phase, rule, chained = HOOK_RULES[name]
    section = re.search(rf"^### {name}\n(.*?)(?=^### |\Z)", HOOKS_MD, re.S | re.M)
    assert section, f"docs/hooks.md has no section for {name}"
    assert f"**Rule: {rule}**" in section.group(1)
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert "Fires:" in doc and f"Rule: {rule}" in doc.replace("Rule: first result", "Rule: first")


def test_every_documented_hook_exists():
    documented = set(re.findall(r"^### (tokplug_\w+)", HOOKS_MD, re.M))
    assert documented == set(HOOK_RULES)


def test_recipe_reference_is_current():
    from hf_tokplug.docgen import recipes_markdown

    assert (REPO / "docs" / "recipes.md").read_text() == recipes_markdown(), "run: python scripts/gen_docs.py"


def test_hook_reference_is_generated_from_the_specs():
    from hf_tokplug.docgen import hooks_markdown

    assert HOOKS_MD == hooks_markdown(), "docs/hooks.md is stale: run python scripts/gen_docs.py"
    assert "record_added_tokens" not in HOOKS_MD


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_open_with_command_and_validate_offline(name, capsys):
    entry = builtin_recipes()[name]
    first = entry.read_text().splitlines()[0]
    assert first.startswith(f"# tokplug run recipes/{name}.yaml"), first
    assert main(["validate", "--offline", str(entry)]) == 0, capsys.readouterr().err


def test_readme_gives_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
