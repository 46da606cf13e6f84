"""Helpers shared by the TARA tests and benchmark: random adapters and cross-attention K/V capture."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .masking import META_FILE, cross_attention_layers


def random_adapter(base: str, folder: str | Path, rare_token: str, class_word: str, seed: int, r: int = 4,
                   alpha: float = 8.0) -> Path:
    """A TARA adapter folder with random (non-zero) LoRA weights, saved exactly like a trained one."""
    from peft import LoraConfig

    from hf_tokplug.plugin import SD_ATTENTION_TARGETS, load_pipeline, save_unet_lora

    pipe = load_pipeline(base)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=SD_ATTENTION_TARGETS,
                                     init_lora_weights=False))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_unet_lora(pipe.unet, folder)
    meta = {"rare_token": rare_token, "class_word": class_word, "rank": r, "alpha": alpha,
            "masked": ["attn2.to_k", "attn2.to_v"]}
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


@contextmanager
def capture_kv(unet: Any) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Record ``(layer, output, base_output)`` of every cross-attention to_k/to_v call (base = frozen weight)."""
    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in cross_attention_layers(unet).items():
        def hook(m: Any, args: tuple, output: torch.Tensor, name: str = name) -> None:
            with torch.no_grad():
                records.append((name, output.detach().float(), m.base_layer(args[0]).detach().float()))

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
