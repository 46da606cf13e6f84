"""``hf_tokplug.from_pretrained`` on tampered run folders: every case is one clear TokPlugError naming the folder (or the
plugin), never a silent load, a pickle load or a raw exception. And the final save is complete or refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

import hf_tokplug
from conftest import run_recipe
from hf_tokplug.errors import TokPlugError


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One finished run (full fine-tuning, the zloss plugin, which keeps a state file)."""
    tmp = tmp_path_factory.mktemp("saved")
    run_recipe(tmp, "run", plugins={"zloss": {"weight": 1e-3}}, train={"max_steps": 1})
    return tmp / "run"


def _manifest(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "tokplug.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"x" * path.stat().st_size)


TAMPERED: list[tuple[str, Callable[[Path], None], str]] = [
    ("no-manifest", lambda f: (f / "tokplug.json").unlink(), "did not finish"),
    ("no-manifest-staging-left", lambda f: ((f / "tokplug.json").unlink(), (f / ".saving-x").mkdir()), "did not finish"),
    ("manifest-not-json", lambda f: (f / "tokplug.json").write_text("{not json"), "not valid JSON"),
    ("manifest-a-list", lambda f: (f / "tokplug.json").write_text("[1, 2]"), "JSON object"),
    ("manifest-binary", lambda f: (f / "tokplug.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    ("format-version-text", lambda f: _manifest(f, lambda d: d.update(format_version="one")), "format_version"),
    ("format-version-missing", lambda f: _manifest(f, lambda d: d.pop("format_version")), "format_version"),
    ("format-version-future", lambda f: _manifest(f, lambda d: d.update(format_version=99)), "upgrade"),
    ("plugins-not-a-list", lambda f: _manifest(f, lambda d: d.update(plugins={"zloss": {}})), "plugins"),
    ("plugin-without-name", lambda f: _manifest(f, lambda d: d["plugins"][0].pop("name")), "plugins.0.name"),
    ("plugin-config-not-a-dict", lambda f: _manifest(f, lambda d: d["plugins"][0].update(config=[1])), "config"),
    ("plugin-not-installed", lambda f: _manifest(f, lambda d: d["plugins"][0].update(name="nope")), "unknown plugin 'nope'"),
    ("plugin-config-invalid", lambda f: _manifest(f, lambda d: d["plugins"][0]["config"].update(weight="heavy")), "zloss"),
    ("state-file-outside", lambda f: _manifest(f, lambda d: d["plugins"][0].update(state_files=["../x.json"])), "outside the folder"),
    ("state-file-absolute", lambda f: _manifest(f, lambda d: d["plugins"][0].update(state_files=["/etc/passwd"])), "outside the folder"),
    ("state-file-missing", lambda f: (f / "zloss_state.json").unlink(), "zloss_state.json"),
    ("state-file-garbage", lambda f: _same_size_garbage(f / "zloss_state.json"), "plugin 'zloss' failed in tokplug_restore"),
    ("weights-truncated", lambda f: _truncate(f / "model.safetensors"), "truncated or replaced"),
    ("weights-missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    ("weights-same-size-garbage", lambda f: _same_size_garbage(f / "model.safetensors"), "loading the saved model failed"),
    ("weights-replaced-by-pickle", lambda f: ((f / "model.safetensors").rename(f / "pytorch_model.bin")), "missing"),
    ("pickle-beside-weights", lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01."), "pickle files"),
    ("pickle-state", lambda f: (f / "extra.pt").write_bytes(b"\x80\x04K\x01."), "pickle files"),
    ("config-missing", lambda f: (f / "config.json").unlink(), "config.json is missing"),
    ("config-garbage", lambda f: _same_size_garbage(f / "config.json"), "loading the saved model failed"),
    ("tokenizer-missing", lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    ("task-unknown", lambda f: _manifest(f, lambda d: d.update(task="no_such_task")), "not available"),
    ("task-wrong-type", lambda f: _manifest(f, lambda d: d.update(task=5)), "task"),
    ("files-wrong-type", lambda f: _manifest(f, lambda d: d.update(files=["model.safetensors"])), "files"),
    ("added-tokens-garbage", lambda f: _manifest(f, lambda d: d.update(added_tokens=[{"what": 1}])), "added_tokens"),
    ("embedding-rows-text", lambda f: _manifest(f, lambda d: d.update(embedding_rows="many")), "embedding_rows"),
    ("adapter-base-path-gone", lambda f: _manifest(f, lambda d: d.update(adapter=True, base_model="/nowhere/model")),
     "does not exist"),
]


@pytest.mark.parametrize("case", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_folder_is_refused_clearly(case, saved, tmp_path):
    _, tamper, expected = case
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    tamper(folder)
    with pytest.raises(TokPlugError) as info:
        hf_tokplug.from_pretrained(folder)
    assert expected.lower() in str(info.value).lower(), str(info.value)


def test_untampered_copy_loads_and_pickle_opt_in(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    ctx = hf_tokplug.from_pretrained(folder)
    assert ctx.plugins["zloss"].log_z_count > 0  # the state came back
    (folder / "notes.bin").write_bytes(b"not weights")  # the user's own file, with an unlucky suffix
    with pytest.raises(TokPlugError, match="pickle"):
        hf_tokplug.from_pretrained(folder)
    assert hf_tokplug.from_pretrained(folder, allow_pickle=True).model is not None  # they trust the folder


def test_interrupted_save_over_an_existing_model_is_refused_then_cleaned(saved, tmp_path, monkeypatch):
    """A kill half-way through moving the new files in: the old manifest is gone first, so the mix of old and new
    files is refused; the next run removes the staging leftovers."""
    import os

    from hf_tokplug import hub

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    ctx = hf_tokplug.from_pretrained(folder)
    moved = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        if Path(dst).parent == folder:  # a move out of the staging folder (not an atomic write inside it)
            if len(moved) == 3:
                raise KeyboardInterrupt("killed")  # stands in for SIGKILL between two moves
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(hub.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        ctx.save_pretrained(folder)
    monkeypatch.setattr(hub.os, "replace", real_replace)
    assert not (folder / "tokplug.json").exists()
    with pytest.raises(TokPlugError, match="did not finish"):
        hf_tokplug.from_pretrained(folder)
    ctx.save_pretrained(folder)  # a complete save afterwards
    assert hf_tokplug.from_pretrained(folder).model is not None
