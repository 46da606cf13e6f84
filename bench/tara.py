"""TARA vs naive multi-LoRA composition on the tiny Stable Diffusion: leakage and latency.

    python bench/tara.py [--steps 200] [--resolution 32]

Trains two concepts with task diffusion_lora + the tara plugin (a red square as ``sks square``, a blue circle as
``zwx circle``; synthetic images from toy://shapes), then composes them two ways on the same seeds:

- tara: ``hf_tokplug_plugins.tara.compose`` (masked cross-attention K/V per concept, unmasked branches fused);
- naive: diffusers ``load_lora_weights`` + ``set_adapters`` (both adapters summed everywhere, no masks).

leakage: for each concept i, with only its adapter loaded (TARA-masked, or plain LoRA for naive), the mean
|K - K_base| (and V) over the cross-attention layers at the text positions of "a photo of sks square and zwx
circle" that are NOT concept i's own (the other concept's tokens and neutral tokens), relative to mean |K_base|
there; averaged over the two concepts. (Zero by construction under TARA; plain LoRA changes every position.)
image_leakage: the image-level proxy: with a prompt naming only concept B ("a photo of zwx circle"), the mean
absolute pixel difference (0..1 scale) between the image from the two-concept composition and the image from B's
adapter alone, same seed, averaged over both directions; it measures how much the absent concept still changes
the picture.
latency_ratio: pipeline time with the 2 composed TARA adapters (default: unmasked branches fused, cross-attention
K/V computed once per prompt) / the base pipeline (median of interleaved runs); the ratios without the K/V cache
and without fusing are printed beside it.

Last line: one JSON object (keys named in issue 6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_tokplug.cli import runner_for
from hf_tokplug.modeling import load_pipeline
from hf_tokplug_plugins.tara import compose, token_mask
from hf_tokplug_plugins.tara.masking import read_meta, word_ids
from hf_tokplug_plugins.tara.testing import capture_kv

import yaml

CONCEPTS = [("sks", "square", "toy://shapes/red-square"), ("zwx", "circle", "toy://shapes/blue-circle")]
BOTH = "a photo of sks square and zwx circle"


def train(folder: Path, rare: str, cls: str, images: str, steps: int, resolution: int, device_batch: int) -> Path:
    recipe = {
        "task": "diffusion_lora", "model": {"name_or_path": "toy://sd"},
        "task_options": {"instance_data_dir": images, "instance_prompt": f"a photo of {rare} {cls}",
                         "resolution": resolution},
        "plugins": {"tara": {"rare_token": rare, "class_word": cls}},
        "adapter": {"r": 8, "alpha": 32},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "per_device_train_batch_size": device_batch,
                  "logging_steps": max(1, steps // 5), "save_strategy": "no", "seed": 0, "disable_tqdm": True},
        "output_dir": str(folder), "overwrite": True,
    }
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    runner_for(str(path), []).run()
    return folder


def naive(adapters: list[Path]):
    pipe = load_pipeline("toy://sd")
    names = []
    for i, folder in enumerate(adapters):
        names.append(f"naive_{i}")
        pipe.load_lora_weights(str(folder), adapter_name=names[-1])
    pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
    return pipe


def tara(adapters: list[Path], fuse: bool = True, cache: bool = True):
    pipe = load_pipeline("toy://sd")
    compose(pipe, [str(a) for a in adapters], fuse_global=fuse, cache_kv=cache)
    return pipe


def kv_leakage(make, adapters: list[Path], res: int) -> float:
    """Per concept: its adapter alone, the two-concept prompt, the K/V change where the concept is not."""
    values = []
    for i, (rare, _, _) in enumerate(CONCEPTS):
        pipe = make([adapters[i]])
        tok = pipe.tokenizer
        ids = tok(BOTH, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")["input_ids"]
        other = ~token_mask(ids, word_ids(tok, rare))[0].bool()
        with capture_kv(pipe.unet) as records:
            pipe(BOTH, num_inference_steps=1, guidance_scale=1.0, height=res, width=res, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        delta = sum(float((out[0][other] - base[0][other]).abs().mean()) for _, out, base in records)
        scale = sum(float(base[0][other].abs().mean()) for _, _, base in records)
        values.append(delta / scale)
    return float(np.mean(values))


def render(pipe, prompt: str, res: int, steps: int, seed: int = 0) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, height=res, width=res,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def image_leakage(make, adapters: list[Path], res: int, steps: int) -> float:
    diffs = []
    both = make(adapters)
    for i, (rare, cls, _) in enumerate(CONCEPTS):
        prompt = f"a photo of {rare} {cls}"
        alone = make([adapters[i]])
        diffs.append(float(np.abs(render(both, prompt, res, steps) - render(alone, prompt, res, steps)).mean()))
    return float(np.mean(diffs))


def latency(adapters: list[Path], res: int, steps: int, rounds: int) -> dict[str, float]:
    pipes = {"base": load_pipeline("toy://sd"), "tara": tara(adapters), "tara_no_cache": tara(adapters, cache=False),
             "tara_unfused": tara(adapters, fuse=False, cache=False)}
    if torch.cuda.is_available():
        pipes = {k: p.to("cuda") for k, p in pipes.items()}
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for _ in range(rounds):
        for name, pipe in pipes.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            pipe(BOTH, num_inference_steps=steps, guidance_scale=5.0, height=res, width=res, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"latency_ratio": med["tara"] / med["base"], "latency_ratio_no_kv_cache": med["tara_no_cache"] / med["base"],
            "latency_ratio_unfused": med["tara_unfused"] / med["base"], "seconds_base": med["base"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="training steps per concept")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [train(Path(tmp) / rare, rare, cls, images, args.steps, args.resolution, 2)
                    for rare, cls, images in CONCEPTS]
        assert [read_meta(a)["rare_token"] for a in adapters] == [c[0] for c in CONCEPTS]
        result = {
            "leakage": {"tara": kv_leakage(tara, adapters, args.resolution),
                        "naive": kv_leakage(naive, adapters, args.resolution)},
            "image_leakage": {"tara": image_leakage(tara, adapters, args.resolution, args.sample_steps),
                              "naive": image_leakage(naive, adapters, args.resolution, args.sample_steps)},
        }
        result.update(latency(adapters, args.resolution, args.sample_steps, args.rounds))
        result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
