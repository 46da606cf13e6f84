"""The docs generated from code:  python scripts/gen_docs.py  (tests/test_docs.py fails when they are stale)

- docs/hooks.md: :mod:`hf_tokplug.hookspecs` (signatures, rules, docstrings with their examples) and the run order
  in :mod:`hf_tokplug.lifecycle`;
- docs/recipes.md: the recipe schema (:func:`hf_tokplug.recipe.reference_markdown`) and every registered task with
  its traits, its ``task_options`` and the built-in recipes that use it.
"""

from __future__ import annotations

import inspect
import re
import textwrap

from . import hookspecs, lifecycle
from .hookspecs import HOOK_RULES

ROLE = re.compile(r":(?:func|mod|meth|class|data|attr):(`[^`]+`)")  # Sphinx roles -> plain inline code

INTRO = """\
# Hooks

<!-- Generated from hf_tokplug/hookspecs.py by `python scripts/gen_docs.py`; tests/test_docs.py fails when stale. -->

Every hook a plugin can implement, grouped by phase. Each section gives the signature, when the hook fires and
how results from several plugins combine. Implement a hook as a method decorated with `@hf_tokplug.hookimpl`;
the method may take any subset of the listed arguments. Setup hooks (`tokplug_register_*`) are called on the
plugin *class* and must be `@staticmethod`s. Plugins run in recipe order; `@hookimpl(tryfirst=True)` /
`trylast=True` override that. `HF_TOKPLUG_TRACE=1` prints every call. Everything a plugin imports from the host
is in `hf_tokplug.plugin` ([writing-a-plugin.md](writing-a-plugin.md)).

Aggregation rules:

| rule | meaning |
|---|---|
| broadcast | every implementation is called; return values are ignored |
| first | called in order until one returns something other than `None` |
| chain | each implementation gets the previous one's return value; `None` keeps the value unchanged |
| extend | each returns a list (or `None`); the lists are concatenated |
| merge | each returns a dict (or `None`); keys are namespaced `<plugin>/<key>` and merged |
| product | each returns a tensor (or `None`); the tensors are multiplied |
"""


def _markdown_docstring(doc: str) -> str:
    """A hookspec docstring as Markdown: ``Example::`` blocks (indented) become fenced Python."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and line.strip().lower().startswith("example"):
            out += [line.rstrip()[:-1], "", "```python"]
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            out += [*block, "```", ""]
            continue
        out.append(ROLE.sub(r"\1", line))
        i += 1
    return "\n".join(out).rstrip() + "\n"


def _signature(name: str) -> str:
    fn = getattr(hookspecs, name)
    sig = inspect.signature(fn)
    params = ", ".join(str(p).replace("'", "") for p in sig.parameters.values())
    ret = sig.return_annotation
    ret = ret if isinstance(ret, str) else getattr(ret, "__name__", str(ret))
    return f"def {name}({params}) -> {ret}"


def _run_order() -> str:
    doc = inspect.getdoc(lifecycle) or ""
    paragraphs = doc.split("\n\n")
    block = textwrap.dedent(paragraphs[1])  # the table of phases
    rest = ROLE.sub(r"\1", "\n\n".join(paragraphs[2:]))
    return "## The run order\n\n```\n" + block + "\n```\n\n" + rest + "\n"


def hooks_markdown() -> str:
    parts = [INTRO, _run_order()]
    phase = None
    for name, (hook_phase, rule, _) in HOOK_RULES.items():
        if hook_phase != phase:
            phase = hook_phase
            parts.append(f"## Phase: {phase}\n")
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        parts.append(f"### {name}\n\n```python\n{_signature(name)}\n```\n\n**Rule: {rule}**.\n\n"
                     + _markdown_docstring(doc))
    return "\n".join(parts)


def _options(cls: type | None) -> list[str]:
    if cls is None:
        return ["No `task_options`."]
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    described = {}
    for line in textwrap.dedent(args).splitlines():
        if line and not line.startswith(" ") and ":" in line:
            names, text = line.split(":", 1)
            for name in names.split(","):
                described[name.strip()] = text.strip()
        elif line.strip() and described:
            last = list(described)[-1]
            described[last] += " " + line.strip()
    for name, field in cls.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        rows.append(f"| `{name}` | `{default!r}` | {described.get(name, field.description or '')} |".replace("\n", " "))
    return rows


def tasks_markdown() -> str:
    """One section per registered task: description, traits, options, built-in recipes."""
    from dataclasses import fields

    from .manager import registries

    recipes: dict[str, list[str]] = {}
    from importlib import resources

    import yaml

    root = resources.files("hf_tokplug_recipes")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        paths = [entry] if entry.name.endswith(".yaml") else sorted(
            (e for e in entry.iterdir() if e.name.endswith(".yaml")), key=lambda e: e.name) if entry.is_dir() else []
        for path in paths:
            task = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("task")
            name = path.name if entry.name.endswith(".yaml") else f"{entry.name}/{path.name}"
            recipes.setdefault(task, []).append(f"recipes/{name}")
    lines = ["## Tasks", "",
             "Every registered task (the host's own and those plugins register), with the traits plugins check",
             "(`ctx.traits`, docs/writing-a-plugin.md) and its `task_options`.", ""]
    for name, runner in registries().runners.items():
        traits = getattr(runner, "traits", None)
        lines += [f"### {name}", "", runner.description or "", ""]
        if traits is not None:
            shown = ", ".join(f"{f.name}={getattr(traits, f.name)!r}" for f in fields(traits))
            lines += [f"Traits: {shown}.", ""]
        lines += [*_options(getattr(runner, "options_class", None)), ""]
        if recipes.get(name):
            lines += ["Recipes: " + ", ".join(f"`{r}`" for r in recipes[name]) + ".", ""]
    return "\n".join(lines)


def recipes_markdown() -> str:
    """docs/recipes.md: the recipe schema, then the tasks."""
    from .recipe import reference_markdown

    return reference_markdown().rstrip() + "\n\n" + tasks_markdown()

