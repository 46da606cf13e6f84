"""The ``tokplug`` command.

    tokplug run RECIPE [key=value ...] [~key ...]     train / prepare, write the run folder
    tokplug validate RECIPE [overrides] [--offline]   every check that needs no weights
    tokplug preview RECIPE [overrides] [-n 2]         tokens, labels, pads and added tokens of a few examples
    tokplug recipes ls | cp NAME DEST                 built-in recipes
    tokplug plugins [--json]                          installed plugins, versions, hooks
    tokplug push RUN_DIR --repo-id USER/NAME          upload a finished run

Errors in the user's input print one message (file, key, fix) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .errors import TokPlugError

BUILTIN_COMMANDS = ("run", "validate", "preview", "recipes", "plugins", "push")


def _console() -> Any:
    from rich.console import Console

    return Console()


def runner_for(recipe_path: str, overrides: list[str]) -> Any:
    """The task runner of a recipe with overrides: :func:`hf_tokplug.lifecycle.runner_for` (imported on use)."""
    from .lifecycle import runner_for as build

    return build(recipe_path, overrides)


# ------------------------------------------------------------------------------------------------------ commands


def cmd_run(args: argparse.Namespace) -> int:
    runner = runner_for(args.recipe, args.overrides)
    metrics = runner.run()
    console = _console()
    console.print(f"[bold green]done[/]: {runner.recipe.output_dir}")
    console.print_json(json.dumps(metrics))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .recipe import dump_resolved

    from .data import is_local

    runner = runner_for(args.recipe, args.overrides)
    ctx = runner.validate(offline=args.offline)
    data = runner.recipe.data
    specs = [s for s in ((data.train, data.eval) if data is not None else ()) if s is not None]
    if specs and all(is_local(s) for s in specs):
        runner.read_data(ctx)  # local data is cheap to read: its columns are checked against the task here too
    elif specs:
        runner.notes.append("data on the Hub: its columns are checked when the run reads it, before weights load")
    console = _console()
    for note in runner.notes:
        console.print(f"[yellow]note[/]: {note}")
    if args.show:
        console.print(dump_resolved(runner.recipe, ctx.plugin_configs()), markup=False, highlight=False)
    console.print(f"[bold green]ok[/]: {args.recipe} (task {runner.recipe.task}, plugins: {', '.join(ctx.plugins) or 'none'})")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from .preview import preview

    preview(runner_for(args.recipe, args.overrides), n=args.n, max_tokens=args.max_tokens, console=_console())
    return 0


def recipes_root() -> Any:
    return resources.files("hf_tokplug_recipes")


def builtin_recipes() -> dict[str, Any]:
    out = {}
    root = recipes_root()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[:-5]] = entry
        elif entry.is_dir() and not entry.name.startswith("__"):
            for sub in sorted(entry.iterdir(), key=lambda e: e.name):
                if sub.name.endswith(".yaml"):
                    out[f"{entry.name}/{sub.name[:-5]}"] = sub
    return out


def cmd_recipes(args: argparse.Namespace) -> int:
    recipes = builtin_recipes()
    if args.action == "ls":
        from rich.table import Table
        import yaml

        table = Table("name", "task", "plugins", "command")
        for name, entry in recipes.items():
            text = entry.read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
            first = text.splitlines()[0].lstrip("# ").strip() if text.startswith("#") else ""
            table.add_row(name, str(data.get("task")), ", ".join(data.get("plugins") or {}) or "-", first)
        _console().print(table)
        return 0
    if args.name not in recipes:
        raise TokPlugError(f"no built-in recipe {args.name!r}", fix=f"one of: {', '.join(recipes)}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / (args.name.split("/")[-1] + ".yaml")
    if dest.exists() and not args.force:
        raise TokPlugError(f"{dest} exists", fix="pass --force to overwrite it, or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with recipes[args.name].open("rb") as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)
    _console().print(f"copied {args.name} -> {dest}")
    return 0


def plugin_table() -> list[dict[str, Any]]:
    from .hookspecs import HOOK_RULES
    from .manager import installed_plugins

    rows = []
    for name, info in sorted(installed_plugins().items()):
        hooks = []
        if info.cls is not None:
            hooks = [h for h in HOOK_RULES if hasattr(getattr(info.cls, h, None), "hf_tokplug_impl")]
        rows.append(
            {
                "name": name, "version": info.version, "distribution": info.dist, "source": info.source,
                "hooks": hooks, "paper": getattr(info.cls, "paper", None),
                "error": None if info.error is None else f"{type(info.error).__name__}: {info.error}",
            }
        )
    return rows


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = plugin_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table("plugin", "version", "hooks", "status")
    for row in rows:
        status = f"[red]import error: {row['error']}[/]" if row["error"] else "ok"
        table.add_row(row["name"], row["version"] or "-", "\n".join(row["hooks"]) or "-", status)
    _console().print(table)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    url = push_folder(Path(args.run_dir), args.repo_id, private=not args.public, revision=args.revision)
    _console().print(f"pushed {args.run_dir} -> {url}")
    return 0


# ------------------------------------------------------------------------------------------------------ parser


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value or ~key.path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokplug", description="Token-level methods as plugins for the HF stack.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe without loading weights")
    _add_recipe_args(p)
    p.add_argument("--offline", action="store_true", help="never touch the network (skips uncached Hub configs)")
    p.add_argument("--show", action="store_true", help="print the resolved recipe")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preview", help="show tokenization, labels, pads and added tokens for a few examples")
    _add_recipe_args(p)
    p.add_argument("-n", type=int, default=2, help="number of examples")
    p.add_argument("--max-tokens", type=int, default=64, help="rows shown per example")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("recipes", help="list or copy built-in recipes")
    rsub = p.add_subparsers(dest="action", required=True)
    rsub.add_parser("ls", help="list built-in recipes").set_defaults(func=cmd_recipes)
    cp = rsub.add_parser("cp", help="copy a built-in recipe")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true")
    cp.set_defaults(func=cmd_recipes)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("push", help="upload a run folder to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--public", action="store_true", help="create the repository as public (default: private)")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.set_defaults(func=cmd_push)

    from .manager import registries

    for name, (help_text, configure, run, owner) in registries().commands.items():
        if name in BUILTIN_COMMANDS:
            raise TokPlugError(f"plugin {owner!r} registers command {name!r}, which is built in")
        p = sub.add_parser(name, help=f"{help_text} (plugin {owner})")
        configure(p)
        p.set_defaults(func=_plugin_command(run))
    return parser


def _plugin_command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    return lambda args: int(run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except TokPlugError as exc:
        if debug:
            raise
        print(f"error: {exc.format()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
