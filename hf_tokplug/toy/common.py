"""What the toy models, tokenizers and pipelines share: the scheme, the committed assets, the cache, building once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import TokPlugError

SCHEME = "toy://"
ASSETS = Path(__file__).parent / "assets"


def cache_root() -> Path:
    return Path(os.environ.get("HF_TOKPLUG_CACHE", Path.home() / ".cache" / "hf_tokplug"))


def load_toy_tokenizer() -> Any:
    """The toy models' tokenizer (``toy://tokenizer/kjv-bpe``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS))


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return ``target`` once ``target/marker`` exists; otherwise ``build(tmp)`` into a fresh folder beside it,
    under a file lock (concurrent processes build once), then move it into place (never a half-built folder)."""
    from filelock import FileLock

    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if not (tmp / marker).is_file():
                raise TokPlugError(f"building {target.name} wrote no {marker}",
                                   fix="under torch.distributed only rank 0 writes model files: resolve on the main "
                                       "process first (hf_tokplug.toy.resolve does it in runs)")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
