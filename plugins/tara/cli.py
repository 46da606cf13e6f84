"""``tokplug tara-generate``: render a prompt with several TARA adapters composed in one pipeline.

    tokplug tara-generate --base toy://sd --adapter runs/tara_red --adapter runs/tara_blue \\
        --prompt "a photo of sks square and zwx circle" --out images/
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base pipeline: Hub id, folder or toy://sd")
    parser.add_argument("--adapter", action="append", required=True, help="a TARA adapter folder (repeat)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="height and width (default: the UNet's native size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fuse", action="store_true", help="keep every LoRA branch live (no merge of unmasked ones)")
    parser.add_argument("--out", required=True, help="folder for the PNG images")


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = generate(args.base, args.adapter, args.prompt, negative_prompt=args.negative_prompt,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale, size=args.size,
                      seed=args.seed, fuse_global=not args.no_fuse)
    for i, image in enumerate(images):
        image.save(out / f"{i:02d}.png")
        print(out / f"{i:02d}.png")
    return 0
