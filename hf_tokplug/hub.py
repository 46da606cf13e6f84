"""Saved artifacts: tokplug.json manifest, model card, atomic save, restore (``from_pretrained``), push.

A saved folder is a standard HF folder (model or PEFT adapter, tokenizer; safetensors only) plus ``tokplug.json``
(plugins with versions, configs and state files; added tokens; task; base model), so plain
``AutoModel.from_pretrained`` loads what it can and :func:`from_pretrained` restores the plugins too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import __version__, manager, toy
from .errors import PluginError, TokPlugError
from .modeling import is_peft
from .rundir import HUB_TOKEN, library_versions, write_json_atomic, write_text_atomic

MANIFEST = "tokplug.json"
FORMAT_VERSION = 1
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", "**/.*", "*.lock", "run_info.json"]


def manifest(ctx: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "hf_tokplug_version": __version__,
        "task": ctx.task,
        "base_model": ctx.base_model,
        "adapter": is_peft(ctx.model),
        # Rows of the input embedding: an adapter folder restores onto the base model resized to this size
        # (a swapped or padded vocabulary is not len(tokenizer)).
        "embedding_rows": _embedding_rows(ctx.model),
        "plugins": [
            {
                "name": name,
                "version": manager.plugin_version(name),
                "config": plugin.config_dict() if hasattr(plugin, "config_dict") else {},
                "state_files": list(ctx.state_files.get(name, [])),
            }
            for name, plugin in ctx.plugins.items()
        ],
        "added_tokens": [t.to_json() for t in ctx.added_tokens],
        "task_state": _task_state(ctx),
        "library_versions": library_versions(),
    }


def check_state_files(ctx: Any) -> None:
    """Refuse state files that are not safetensors or JSON (``tokplug_save`` must never write pickle)."""
    for name, files in ctx.state_files.items():
        for filename in files:
            if filename.endswith((".bin", ".pt", ".pkl", ".pickle")):
                raise PluginError(f"plugin {name!r} saved {filename}: only safetensors/JSON state is allowed")


def _task_state(ctx: Any) -> dict[str, Any]:
    runner = manager.registries().runners.get(ctx.task) if ctx.task else None
    return runner.manifest_extras(ctx) if runner is not None and ctx.model is not None else {}


def _embedding_rows(model: Any) -> int | None:
    """Rows of a language model's input embedding; ``None`` for anything else (no model, a Diffusers module, whose
    text encoder keeps its own size)."""
    if model is None or not hasattr(getattr(model, "config", None), "get_text_config"):
        return None
    return int(model.get_input_embeddings().weight.shape[0])


def model_card(ctx: Any, metrics: dict[str, Any] | None, repo_id: str | None = None,
               sections: list[str] | None = None) -> str:
    """The README.md of a saved folder: Hub metadata, usage, results, the plugins' ``sections``, recipe, citations."""
    from huggingface_hub import ModelCardData

    base = ctx.base_model if ctx.base_model and not toy.is_toy(ctx.base_model) and not os.path.isdir(ctx.base_model) else None
    datasets = []
    if ctx.recipe is not None and ctx.recipe.data is not None:
        for spec in (ctx.recipe.data.train, ctx.recipe.data.eval):
            if spec is not None and "/" in spec.path and not os.path.exists(spec.path) and not toy.is_toy(spec.path):
                datasets.append(spec.path)
    card = ModelCardData(
        library_name=getattr(ctx.model, "library_name", None) or ("peft" if is_peft(ctx.model) else "transformers"),
        base_model=base,
        tags=["hf-tokplug", *(f"tokplug-{n}" for n in ctx.plugins), *([ctx.task] if ctx.task else [])],
        datasets=sorted(set(datasets)) or None,
    )
    name = repo_id or (ctx.output_dir.name if ctx.output_dir else "model")
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {name}", "",
        f"Trained with [hf_tokplug](https://github.com/hf-tokplug/hf_tokplug) (task `{ctx.task}`) "
        f"from `{ctx.base_model}`" + (f" with plugins: {', '.join(f'`{n}`' for n in ctx.plugins)}." if ctx.plugins else "."),
        "",
        "## Use", "",
        "```python",
        "import hf_tokplug",
        f'ctx = hf_tokplug.from_pretrained("{repo_id or "path/to/this/folder"}")  # model, tokenizer and plugin state',
        "model, tokenizer = ctx.model, ctx.tokenizer",
        "```", "",
        "Plain `transformers`/`peft` loading works too; only the plugin state needs `hf_tokplug.from_pretrained`.", "",
    ]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    for section in sections or []:
        lines += [section.rstrip(), ""]
    if ctx.recipe is not None:
        from .recipe import dump_resolved

        lines += ["## Recipe", "", "```yaml", dump_resolved(ctx.recipe, ctx.plugin_configs()).rstrip(), "```", ""]
    citations = [getattr(p, "citation", None) for p in ctx.plugins.values()]
    citations = [c.strip() for c in citations if c]
    if citations:
        lines += ["## Citations", "", "```bibtex", *"\n\n".join(citations).splitlines(), "```", ""]
    return "\n".join(lines)


def save_run(ctx: Any, output_dir: Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None, *,
             save_state: Callable[[Any, Path], None], sections: Callable[[], list[str]]) -> Path:
    """Save everything into a staging folder, then move it into ``output_dir`` (never a half-written folder).

    ``save_state(ctx, folder)`` writes the plugins' state and the manifest; ``sections()`` returns the plugins'
    model-card sections (the lifecycle passes the functions that fire ``tokplug_save`` / ``tokplug_model_card``).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        model = ctx.model
        if model is not None:
            model.save_pretrained(staging)
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(staging)
        save_state(ctx, staging)
        if metrics is not None:
            write_json_atomic(staging / "metrics.json", metrics)
        write_text_atomic(staging / "README.md", model_card(ctx, metrics, repo_id, sections()))
        unsafe = [p.name for p in staging.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]
        if unsafe:
            raise TokPlugError(f"refusing to save pickle files: {unsafe}", fix="save with safetensors")
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise TokPlugError(
            f"{folder} has no {MANIFEST}: it was not saved by hf_tokplug",
            fix="load it with transformers' from_pretrained, or point at a folder written by `tokplug run` / ctx.save_pretrained",
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise TokPlugError(f"{path} has format {data['format_version']}; this hf_tokplug reads {FORMAT_VERSION}", fix="upgrade hf_tokplug")
    return data


def local_folder(location: str, *, what: str, where: str, fix: str, allow_patterns: list[str] | None = None) -> Path:
    """``location`` as a local folder: itself when it is one, else a Hub repo downloaded into the cache (only
    ``allow_patterns``). A failure is a :class:`PluginError` naming ``what`` (e.g. ``heads_path``), ``where`` and ``fix``."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(location, allow_patterns=allow_patterns))
    except Exception as exc:  # not a folder here, and not a Hub repo we can reach
        raise PluginError(f"{what} {location!r} is not a local folder, and fetching it from the Hub failed: {exc}",
                          where=where, fix=fix) from None


def push_folder(folder: Path, repo_id: str, *, private: bool = True, revision: str | None = None, token: str | None = None) -> str:
    """Upload a saved run folder (checkpoints, locks and run_info.json excluded); returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    read_manifest(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".yaml", ".yml", ".md", ".txt", ".jinja") and \
                not any(part.startswith("checkpoint-") for part in path.relative_to(folder).parts) and \
                HUB_TOKEN.search(path.read_text(encoding="utf-8", errors="ignore")):
            raise TokPlugError(f"{path} contains what looks like a Hugging Face token; refusing to upload it",
                               fix="remove the token from the file (pass credentials through HF_TOKEN or `hf auth "
                                   "login`, never in a recipe)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, revision=revision, ignore_patterns=PUSH_IGNORE,
        commit_message="Upload with hf_tokplug",
    )
    return str(getattr(info, "commit_url", info))

