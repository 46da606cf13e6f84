"""The run folder: atomic writes, the lock that keeps two runs apart, overwrite and rollback rules, run_info.json."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import RunDirError

LOCK_FILE = ".tokplug.lock"
LOG_FILE = "trainer_log.jsonl"  # one JSON line per Trainer log event (TokPlugCallback)
MARKER = "recipe.resolved.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)
TRACKED_LIBRARIES = ("hf_tokplug", "torch", "transformers", "trl", "peft", "diffusers", "accelerate", "pluggy", "datasets", "tokenizers")


# Keys whose values are credentials (recipe blocks, trainer arguments, model kwargs, command-line overrides). Names
# like `mask_token` or `max_new_tokens` are settings, not secrets, and are kept.
SECRET_KEY = re.compile(r"^(token|hub_token|hf_token|access_token|auth_token|api_key|apikey|password|passwd|secret"
                        r"|\w+_(secret|password|api_key))$", re.IGNORECASE)
HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
REDACTED = "***"


def redact(value: Any) -> Any:
    """``value`` with every credential-like key's value replaced by ``***`` (and Hub tokens anywhere in strings)."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEY.match(k) and v not in (None, "", False, True)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return HUB_TOKEN.sub("hf_" + REDACTED, value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with ``a.b.token=...``-style overrides and Hub tokens redacted."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and SECRET_KEY.match(key.rsplit(".", 1)[-1].lstrip("~")):
            arg = f"{key}={REDACTED}"
        out.append(HUB_TOKEN.sub("hf_" + REDACTED, arg))
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class RunLock:
    """An exclusive lock on the run folder (released by the OS if the process dies, so a killed run can resume)."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self.lock = FileLock(str(self.path))

    def acquire(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RunDirError(
                f"output folder {self.path.parent} is in use by a running run",
                where="output_dir",
                fix="wait for that run to finish, or choose another output_dir (e.g. output_dir=runs/other)",
            ) from None

    def release(self) -> None:
        self.lock.release()


STAGING_PREFIX = ".saving-"
RECOVERED = "recovered-model"
# What the host itself writes into a run folder; run_info.json's "written" lists the rest (the saved model's files).
HOST_FILES = (MARKER, "run_info.json", LOG_FILE, LOCK_FILE, RECOVERED)


def _host_written(path: Path, listed: set[str]) -> bool:
    name = path.name
    return name in HOST_FILES or name in listed or name.startswith(STAGING_PREFIX) or \
        (name.startswith("checkpoint-") and name.split("-")[-1].isdigit() and path.is_dir())


def written_by_runs(output_dir: Path) -> set[str]:
    """Top-level names earlier runs recorded in run_info.json (``written``)."""
    path = output_dir / "run_info.json"
    try:
        return set(json.loads(path.read_text(encoding="utf-8")).get("written", []))
    except (OSError, ValueError, AttributeError):
        return set()


def record_written(output_dir: Path, names: list[str]) -> None:
    """Add ``names`` (top-level entries of the run folder) to what run_info.json says tokplug wrote."""
    path = output_dir / "run_info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"starts": []}
    except ValueError:
        info = {"starts": []}
    info["written"] = sorted(set(info.get("written", [])) | set(names))
    write_json_atomic(path, info)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


class RunFolder:
    """The output folder of one recipe run, held under :class:`RunLock`.

    Opening it applies the rules: a new or empty folder is used; a folder a tokplug run wrote needs ``overwrite``
    (which deletes only what runs wrote there: the host's files, checkpoints and what ``written`` lists) or
    ``resume``; a folder with only the leftovers of a run that failed before it saved anything is cleared; any
    other folder is refused. Staging folders of an interrupted final save are removed. :meth:`rollback` undoes
    everything this start wrote, for runs that fail before training.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir
        self.existed = output_dir.exists()
        self.before: set[str] = {p.name for p in output_dir.iterdir()} if self.existed else set()
        info = output_dir / "run_info.json"
        self.info_text = info.read_text(encoding="utf-8") if info.is_file() else None
        self.lock: RunLock | None = None
        self.notes: list[str] = []

    def open(self, *, overwrite: bool, resuming: bool, recipe_path: str | None = None) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.path)
        self.lock.acquire()
        try:
            self._apply_rules(overwrite=overwrite, resuming=resuming, recipe_path=recipe_path)
        except BaseException:
            self.rollback()
            raise
        return self

    def _apply_rules(self, *, overwrite: bool, resuming: bool, recipe_path: str | None) -> None:
        out = self.path
        for stale in out.glob(STAGING_PREFIX + "*"):  # an interrupted final save: never part of the model
            _remove(stale)
            self.notes.append(f"removed {stale.name}, left by an interrupted save")
        contents = [p for p in out.iterdir() if p.name != LOCK_FILE]
        if not contents or resuming:
            return
        listed = written_by_runs(out)
        if not listed and (out / "tokplug.json").is_file() and "written" not in (self.info_text or ""):
            listed = {p.name for p in contents}  # a run of an hf_tokplug that did not list its files yet
        ours = [p for p in contents if _host_written(p, listed)]
        foreign = [p for p in contents if p not in ours]
        if not (out / MARKER).is_file():
            raise RunDirError(f"output folder {out} is not empty and was not written by tokplug; refusing to use it",
                              where="output_dir", fix="choose another output_dir (e.g. output_dir=runs/new)")
        valuable = [p.name for p in ours if p.name.startswith("checkpoint-") or p.name in (RECOVERED, "tokplug.json")
                    or p.name in listed]
        if not valuable and not foreign:
            # a run that failed (or was killed) before it trained or saved anything: nothing to keep
            for path in ours:
                if path.name != LOCK_FILE:
                    _remove(path)
            self.notes.append(f"cleared the leftovers of a run that stopped before it saved anything in {out}")
            return
        if not overwrite:
            raise RunDirError(
                f"output folder {out} holds an earlier run ({', '.join(sorted(valuable)[:4])})",
                where="output_dir",
                fix="set `overwrite: true` (or override overwrite=true) to replace it, "
                "`train.resume_from_checkpoint=true` to continue it, or choose another output_dir",
            )
        here = Path.cwd().resolve()
        target = out.resolve()
        if target == here or _inside(here, target):
            raise RunDirError(f"overwrite would delete files in the current directory ({here}): refusing",
                              where="output_dir", fix="run into a subfolder (e.g. output_dir=runs/new)")
        if recipe_path is not None and _inside(Path(recipe_path).resolve(), target):
            raise RunDirError(
                f"the recipe {recipe_path} lies inside output_dir {out}: overwriting would delete the run it "
                "describes (and the recipe itself)",
                where="output_dir", fix="reproduce the run into another folder (e.g. output_dir=runs/reproduced)")
        for path in ours:
            if path.name != LOCK_FILE:
                _remove(path)
        if foreign:
            self.notes.append(f"overwrite kept {len(foreign)} file(s) in {out} that no tokplug run wrote: "
                              + ", ".join(sorted(p.name for p in foreign)[:5]))

    def rollback(self) -> None:
        """Remove what this start wrote (the folder itself when it did not exist before) and release the lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if not self.path.is_dir():
            return
        for path in self.path.iterdir():
            if path.name not in self.before:
                try:
                    _remove(path)
                except OSError:
                    pass
        if self.info_text is not None:
            write_text_atomic(self.path / "run_info.json", self.info_text)
        if not self.existed:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resuming: bool, recipe_path: str | None = None) -> RunFolder:
    """Lock the folder and apply the overwrite rules (:class:`RunFolder`); returns the opened folder."""
    return RunFolder(output_dir).open(overwrite=overwrite, resuming=resuming, recipe_path=recipe_path)


def record_start(output_dir: Path, *, seed: int, plugins: dict[str, str | None], resumed_from: str | None) -> None:
    """Append this start (versions, seed, command, resume point) to run_info.json."""
    path = output_dir / "run_info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"starts": []}
    except ValueError:  # a torn file from a killed write of an old version: start the record afresh
        info = {"starts": []}
    info.setdefault("starts", []).append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": redact_argv(sys.argv),
            "seed": seed,
            "resumed_from": resumed_from,
            "plugins": plugins,
            "versions": library_versions(),
        }
    )
    write_json_atomic(path, info)
