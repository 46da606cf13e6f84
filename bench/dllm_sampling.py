"""Speed and answer quality of the masked-diffusion sampler: plain LLaDA remasking vs cached and parallel decoding.

    python bench/dllm_sampling.py [--steps 800] [--eval-n 96]    (~6 min on 2 CPU cores)

1. **Cache and parallel commits** (issue "Speed where users wait"). Model: a toy bidirectional Gemma (4 layers,
   hidden 128) trained here with the LLaDA objective on synthetic instructions with known answers ("say W N times",
   "letters after C: N", N in 3-9, one token per letter; the pretrained dLLM of issue "Models that know something"
   has not landed). Held-out prompts are decoded with G = 32, block 8, one token per step (plain);
   with ``cache="prefix"`` / ``"dual"``; with ``threshold`` (parallel commits); and with both. Same model, prompts and
   batches for all; rounds alternate the order and the median time counts.
   ``cache_speedup`` (dual cache), ``parallel_speedup`` (threshold) and ``combined_speedup`` (both): tokens/s over
   plain's; ``exact_match`` {plain, cache, parallel, combined}: share of answers equal to the true one (cut at the
   first EOS). ``cache_speedup_by_mode`` and ``exact_match_by_mode`` have prefix and dual apart.
2. **The speed grid** (kept from before): random weights, 8 layers, hidden 512; G in {64, 256 on CUDA}, block 32 and
   whole window, batch 1 and 16, fp32 (and bf16 on CUDA): seconds and tokens/s of the plain sampler.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from hf_tokplug import toy  # noqa: E402
from hf_tokplug.inference import cut_at_stop, diffusion_sample  # noqa: E402

GEN, BLOCK = 32, 8
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # one token each in the toy tokenizer (with or without a leading space)


def example(rng: random.Random) -> dict[str, str]:
    """"say W N times" (W repeated N times) or "letters after C: N" (the N letters that follow C)."""
    n = rng.randint(3, 9)
    if rng.random() < 0.5:
        word = rng.choice(LETTERS)
        return {"prompt": f"say {word} {n} times\n", "completion": " ".join([word] * n)}
    start = rng.randrange(len(LETTERS) - n)
    return {"prompt": f"letters after {LETTERS[start]}: {n}\n",
            "completion": " ".join(LETTERS[start + 1: start + 1 + n])}


def train(steps: int, out: Path) -> object:
    from hf_tokplug.recipe import parse_recipe
    from hf_tokplug.runners.masked_diffusion import MaskedDiffusionSFT

    rng = random.Random(1234)
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(4000)))
    recipe = parse_recipe({
        "task": "masked_diffusion_sft", "model": {"name_or_path": "toy://bench-dllm-small"},
        "data": {"train": {"path": "json", "data_files": str(path)}, "max_length": 96},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "per_device_train_batch_size": 32, "warmup_steps": 30,
                  "lr_scheduler_type": "cosine", "logging_steps": 100, "save_strategy": "no", "seed": 0,
                  "disable_tqdm": True, "bf16": torch.cuda.is_available()},
        "output_dir": str(out / "run"), "overwrite": True,
    })
    runner = MaskedDiffusionSFT(recipe, "bench dllm_sampling")
    runner.run()
    return runner


@torch.no_grad()
def decode_all(model, tok, groups, **options) -> tuple[float, float]:
    """(seconds, exact match) over every prompt group, batch = group."""
    device = next(model.parameters()).device
    exact, seconds = [], 0.0
    for ids_list in groups.values():
        prompt = torch.tensor([ids for ids, _ in ids_list], device=device)
        start = time.perf_counter()
        out = diffusion_sample(model, prompt, mask_id=tok.mask_token_id, gen_length=GEN, block_length=BLOCK,
                               steps=GEN, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        for row, (_, answer) in zip(out.tolist(), ids_list):
            cut = cut_at_stop(row, {tok.eos_token_id})
            exact.append(tok.decode(cut, skip_special_tokens=True).strip() == answer.strip())
    return seconds, statistics.mean(exact)


def cache_and_parallel(args) -> dict:
    build = partial(toy.TOY_MODELS["gemma-bidir"].build, hidden=128, intermediate=344, layers=4)
    toy.register_toy_model("bench-dllm-small", build, "toy bidirectional Gemma, 4 layers, hidden 128")
    with tempfile.TemporaryDirectory() as tmp:
        runner = train(args.steps, Path(tmp))
    model, tok = runner.ctx.model.eval(), runner.ctx.tokenizer
    rng = random.Random(99)
    groups: dict[int, list] = {}
    for ex in (example(rng) for _ in range(args.eval_n)):
        ids = tok(ex["prompt"])["input_ids"]
        groups.setdefault(len(ids), []).append((ids, ex["completion"]))
    modes = {"plain": {}, "prefix": {"cache": "prefix"}, "dual": {"cache": "dual"},
             "parallel": {"threshold": args.threshold}, "combined": {"cache": "dual", "threshold": args.threshold}}
    decode_all(model, tok, groups)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    exact: dict[str, float] = {}
    for r in range(args.rounds):
        for name in (list(modes) if r % 2 == 0 else list(reversed(modes))):
            seconds, exact[name] = decode_all(model, tok, groups, **modes[name])
            times[name].append(seconds)
    speed = {m: statistics.median(times["plain"]) / statistics.median(t) for m, t in times.items()}
    tokens = args.eval_n * GEN
    return {
        "model": "toy bidirectional Gemma 4x128, trained here (random toy: the pretrained dLLM has not landed)",
        "train_steps": args.steps, "prompts": args.eval_n, "gen_length": GEN, "block_length": BLOCK,
        "threshold": args.threshold,
        "cache_speedup": round(speed["dual"], 3), "parallel_speedup": round(speed["parallel"], 3),
        "combined_speedup": round(speed["combined"], 3),
        "exact_match": {"plain": round(exact["plain"], 4), "cache": round(exact["dual"], 4),
                        "parallel": round(exact["parallel"], 4), "combined": round(exact["combined"], 4)},
        "cache_speedup_by_mode": {"prefix": round(speed["prefix"], 3), "dual": round(speed["dual"], 3)},
        "exact_match_by_mode": {"prefix": round(exact["prefix"], 4), "dual": round(exact["dual"], 4)},
        "tokens_per_second": {m: round(tokens / statistics.median(t), 1) for m, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=800, help="training steps of the toy dLLM")
    parser.add_argument("--eval-n", type=int, default=96)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-grid", action="store_true", help="only the cache / parallel comparison")
    args = parser.parse_args()
    fast = cache_and_parallel(args)
    print(json.dumps(fast), flush=True)  # the last line with --skip-grid; the grid's result line includes it
    if args.skip_grid:
        return
    build = partial(toy.TOY_MODELS["gemma-bidir"].build, hidden=512, intermediate=1376, layers=8)
    cfg, cls = build(2049)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = cls(cfg).to(device).eval()
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    windows = (64, 256) if device == "cuda" else (64,)
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), **fast}
    for dtype in dtypes:
        model.to(dtype)
        for g in windows:
            for mode, block in (("block32", 32), ("whole", g)):
                for batch in (1, 16):
                    prompt = torch.randint(10, 2000, (batch, 32), device=device)
                    run = partial(diffusion_sample, model, prompt, mask_id=2048, gen_length=g, block_length=block, steps=g)
                    run()  # warm-up
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    key = f"{str(dtype).split('.')[-1]}/G{g}/{mode}/b{batch}"
                    results[key] = {"seconds": round(seconds, 3), "tokens_per_second": round(batch * g / seconds, 1)}
                    print(key, results[key], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
