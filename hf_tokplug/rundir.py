"""The run folder: atomic writes, the lock that keeps two runs apart, overwrite rules, run_info.json."""

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


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resuming: bool) -> RunLock:
    """Lock the folder and apply the overwrite rules; return the held lock."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(output_dir)
    lock.acquire()
    try:
        contents = [p for p in output_dir.iterdir() if p.name != LOCK_FILE]
        if contents and not resuming:
            if not overwrite:
                raise RunDirError(
                    f"output folder {output_dir} is not empty",
                    where="output_dir",
                    fix="set `overwrite: true` (or override overwrite=true) to replace the previous run, "
                    "`train.resume_from_checkpoint=true` to continue it, or choose another output_dir",
                )
            if not (output_dir / MARKER).is_file():
                raise RunDirError(
                    f"output folder {output_dir} is not empty and was not written by tokplug; refusing to delete it",
                    where="output_dir",
                    fix="choose another output_dir",
                )
            for path in contents:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def record_start(output_dir: Path, *, seed: int, plugins: dict[str, str | None], resumed_from: str | None) -> None:
    """Append this start (versions, seed, command, resume point) to run_info.json."""
    path = output_dir / "run_info.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"starts": []}
    info["starts"].append(
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
