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

from pydantic import BaseModel, ConfigDict

from . import __version__, manager, toy
from .errors import PluginError, TokPlugError
from .modeling import is_peft
from .rundir import HUB_TOKEN, library_versions, write_json_atomic, write_text_atomic

MANIFEST = "tokplug.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
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
            if filename.endswith(PICKLE_SUFFIXES):
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
             save_state: Callable[[Any, Path], None], sections: Callable[[], list[str]],
             record: Callable[[list[str]], None] | None = None) -> Path:
    """Save everything into a staging folder, then move it into ``output_dir``; the folder is complete or not at
    all for :func:`hf_tokplug.from_pretrained`.

    The manifest (``tokplug.json``, which lists every saved file with its size) is the completion marker: an existing
    one is removed before the first file moves and the new one moves last, so a save interrupted half-way leaves a
    folder that is refused as incomplete, never a mix of old and new files that loads. ``save_state(ctx, folder)``
    writes the plugins' state and the manifest; ``sections()`` returns the plugins' model-card sections (the
    lifecycle passes the functions that fire ``tokplug_save`` / ``tokplug_model_card``); ``record(names)`` is told
    the top-level names before they move (the run folder lists what runs wrote).
    """
    from .rundir import STAGING_PREFIX

    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
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
        unsafe = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if unsafe:
            raise TokPlugError(f"refusing to save pickle files: {unsafe}", fix="save with safetensors")
        data = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
        data["files"] = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*"))
                         if p.is_file() and p.name != MANIFEST}
        write_json_atomic(staging / MANIFEST, data)
        names = sorted(p.name for p in staging.iterdir())
        if record is not None:
            record(names)
        (output_dir / MANIFEST).unlink(missing_ok=True)  # from here until the last move the folder is incomplete
        for item in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


class _PluginEntry(BaseModel):
    name: str
    version: str | None = None
    config: dict[str, Any] = {}
    state_files: list[str] = []


class _Manifest(BaseModel):
    """The fields of tokplug.json that restoring reads (others are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    format_version: int
    task: str | None = None
    base_model: str | None = None
    adapter: bool | None = None
    embedding_rows: int | None = None
    plugins: list[_PluginEntry] = []
    added_tokens: list[dict[str, Any]] = []
    task_state: dict[str, Any] = {}
    files: dict[str, int] | None = None


def _bad(folder: Path, message: str, fix: str = "save the model again (or download it again); do not edit "
         "a saved folder by hand") -> TokPlugError:
    return TokPlugError(f"{folder}: {message}", where=str(folder / MANIFEST), fix=fix)


def read_manifest(folder: Path, *, check_files: bool = False, allow_pickle: bool = True) -> dict[str, Any]:
    """tokplug.json of a saved folder, validated: its schema and version; with ``check_files``, every file it lists is
    there with its saved size, state files lie inside the folder, and (unless ``allow_pickle``) no pickle weights."""
    from pydantic import ValidationError

    from .rundir import STAGING_PREFIX

    path = folder / MANIFEST
    if not path.is_file():
        if any(folder.glob(STAGING_PREFIX + "*")) or any(folder.glob("*.safetensors")):
            raise _bad(folder, f"no {MANIFEST}: the save into this folder did not finish (the manifest is written last)",
                       fix="rerun (or resume) the run that saves here; a plain transformers model loads with "
                           "transformers' from_pretrained")
        raise TokPlugError(
            f"{folder} has no {MANIFEST}: it was not saved by hf_tokplug",
            fix="load it with transformers' from_pretrained, or point at a folder written by `tokplug run` / ctx.save_pretrained",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(folder, f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _bad(folder, f"{MANIFEST} must hold a JSON object")
    if isinstance(raw.get("format_version"), int) and raw["format_version"] > FORMAT_VERSION:
        raise TokPlugError(f"{path} has format {raw['format_version']}; this hf_tokplug reads {FORMAT_VERSION}",
                           fix="upgrade hf_tokplug")
    try:
        data = _Manifest.model_validate(raw).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise _bad(folder, f"{MANIFEST} is invalid at {key or '(top level)'}: {err['msg']}") from None
    if not check_files:
        return data
    for entry in data["plugins"]:
        for name in entry["state_files"]:
            target = folder / name
            # lexically inside (a Hub snapshot's files are symlinks into its blob store, so no resolve())
            if Path(name).is_absolute() or ".." in Path(os.path.normpath(name)).parts or os.path.normpath(name) == ".":
                raise _bad(folder, f"plugin {entry['name']!r} lists state file {name!r} outside the folder")
            if not target.is_file():
                raise _bad(folder, f"state file {name!r} of plugin {entry['name']!r} is missing")
    for name, size in (data["files"] or {}).items():
        target = folder / name
        if not target.is_file():
            raise _bad(folder, f"{name} is missing (the manifest lists it)")
        if target.stat().st_size != size:
            raise _bad(folder, f"{name} has {target.stat().st_size} bytes, the manifest says {size} (truncated or "
                       "replaced)")
    if not allow_pickle:
        pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES
                         and not any(part.startswith("checkpoint-") for part in p.relative_to(folder).parts))
        if pickles:
            raise _bad(folder, f"pickle files {pickles} in the folder: loading them can run arbitrary code, and "
                       "hf_tokplug saves safetensors only",
                       fix="remove them (or convert to safetensors); pass allow_pickle=True only for a folder you trust")
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


def tokenizer_vocab(location: str) -> dict[str, int]:
    """The vocabulary of the tokenizer at ``location`` (``toy://``, a folder or a Hub id): to check that another
    model scores the same token ids as the policy, before any weights load."""
    if toy.is_toy(location):
        return toy.load_tokenizer(location).get_vocab()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.resolve(location)).get_vocab()


def load_frozen_causal_lm(location: str, *, dtype: Any = None, what: str = "model", where: str | None = None) -> Any:
    """A causal LM for scoring, frozen and in eval mode: ``toy://NAME``, a run folder or a Hub repo; a LoRA adapter
    folder is loaded onto its base and merged. A location that is neither a folder nor reachable is a PluginError
    naming ``what`` and ``where``."""
    from pathlib import Path

    import transformers

    if toy.is_toy(location):
        path = Path(toy.resolve(location))
    else:
        path = local_folder(location, what=what, where=where, fix="give a local run folder or a reachable Hub repo")
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype).merge_and_unload()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.requires_grad_(False).eval()
