"""Python API: ``generate(base, adapters, prompts)`` renders prompts with composed TARA adapters."""

from __future__ import annotations

from typing import Any

import torch

from hf_tokplug.plugin import load_pipeline

from .masking import compose


def composed_pipeline(base: str, adapters: list[str], fuse_global: bool = True, dtype: Any = None,
                      cache_kv: bool = True) -> Any:
    """The base pipeline with ``adapters`` composed (each masked at its own rare token)."""
    pipe = load_pipeline(base, dtype=dtype)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    compose(pipe, adapters, fuse_global=fuse_global, cache_kv=cache_kv)
    return pipe


def generate(base: str, adapters: list[str], prompts: list[str], *, negative_prompt: str | None = None,
             num_inference_steps: int = 25, guidance_scale: float = 7.5, size: int | None = None, seed: int = 0,
             fuse_global: bool = True) -> list[Any]:
    """PIL images, one per prompt, seeds ``seed + i``."""
    pipe = composed_pipeline(base, adapters, fuse_global)
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return [
        pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
             guidance_scale=guidance_scale, height=size, width=size,
             generator=torch.Generator().manual_seed(seed + i)).images[0]
        for i, prompt in enumerate(prompts)
    ]
