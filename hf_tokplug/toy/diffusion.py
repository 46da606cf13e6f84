"""The embedded default for diffusion: ``toy://sd`` (a tiny Stable Diffusion) and ``toy://shapes/<colour>-<shape>``
(synthetic instance images), built deterministically and cached under ``$HF_TOKPLUG_CACHE``.

``toy://sd``: UNet2DConditionModel (blocks 32/64, cross-attention in the outer blocks and the mid block), a
two-block AutoencoderKL (32 px images <-> 4 x 16 x 16 latents), a two-layer CLIPTextModel over the toy BPE tokenizer
(77 positions) and a DDPM scheduler (epsilon prediction), saved as a standard StableDiffusionPipeline folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import TokPlugError

PIPELINES = {"sd": "tiny Stable Diffusion (SD1.5 layout): UNet 32/64, 2-block VAE, 2-layer CLIP text encoder"}
BUILD_VERSION = 1
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")


def _build_sd() -> Any:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .common import load_toy_tokenizer

    tok = load_toy_tokenizer()
    tok.model_max_length = 77
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pipeline_path(name: str) -> Path:
    """Build (once, under a file lock) and cache a toy pipeline; return its folder."""
    from .common import ASSETS, build_once, cache_root

    if name not in PIPELINES:
        raise TokPlugError(f"unknown embedded pipeline toy://{name}", fix=f"use one of: {', '.join('toy://' + n for n in PIPELINES)}")
    digest = hashlib.sha256(((ASSETS / "tokenizer.json").read_bytes() + str(BUILD_VERSION).encode())).hexdigest()[:12]
    target = cache_root() / "toy" / f"{name}-{digest}"
    return build_once(target, "model_index.json", lambda folder: _build_sd().save_pretrained(folder))


def shapes_path(name: str, count: int = 4, size: int = 64) -> Path:
    """``count`` images of one coloured shape (``red-square``...) at varied positions and sizes, on grey."""
    import random

    from PIL import Image, ImageDraw

    from .common import cache_root

    colour, _, shape = name.partition("-")
    if colour not in COLOURS or shape not in SHAPES:
        raise TokPlugError(f"unknown toy image set toy://shapes/{name}",
                           fix=f"use toy://shapes/<colour>-<shape> with colour in {sorted(COLOURS)} and shape in {list(SHAPES)}")
    target = cache_root() / "toy" / f"shapes-{name}-{count}-{size}-v{BUILD_VERSION}"
    if target.is_dir() and len(list(target.glob("*.png"))) == count:
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=cache_root()))
    rng = random.Random(f"{name}-{count}-{size}")
    for i in range(count):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        img.save(tmp / f"{i:03d}.png")
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_images(location: str) -> Path:
    """A folder of images: ``toy://shapes/<name>`` is generated, anything else must exist."""
    if location.startswith("toy://shapes/"):
        return shapes_path(location[len("toy://shapes/"):])
    return Path(location).expanduser()
