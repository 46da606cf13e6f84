"""Rainbow padding's effect at small scale: <eos> overflow with K = 0 vs K = 7 on the same toy dLLM and data.

    python bench/rainbow.py [--steps 600] [--seeds 0 1] [--eval-n 64]

Synthetic instructions with known answers of 3-20 characters (copy, reverse, sort, drop the digits), characters
separated by spaces so that one character is one token. For each K in {0, 7} and each seed: a toy bidirectional Gemma
(4 layers, hidden 128) is trained with the LLaDA objective on sequences padded to prompt + 128 (the largest window),
then for generation windows G in {32, 64, 128} it measures, over held-out prompts:

- ``mean_len``: mean answer length in tokens (cut at the first EOS or pad),
- ``early_term``: share of answers of <= 2 tokens (all true answers are longer),
- ``exact``: exact-match accuracy,
- ``tail_term_prob`` / ``tail_top_prob``: at the first decoding step (window all masked), the probability of EOS or
  any pad, and of the most likely token, at the window's last position.

Block decoding (block 32, one token per step) goes into the JSON's main figures; whole-window decoding (block = G)
is under ``whole_window``. All figures are averaged over seeds. ``collator_overhead_ratio`` = time of the rainbow
collator / the plain one on the same batches. Saves bench/out/rainbow.png (length and early termination vs G).
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_tokplug import toy  # noqa: E402
from hf_tokplug.recipe import parse_recipe  # noqa: E402
from hf_tokplug.inference import cut_at_stop, diffusion_sample  # noqa: E402
from hf_tokplug.runners.masked_diffusion import MaskedDiffusionCollator, MaskedDiffusionSFT  # noqa: E402
from hf_tokplug_plugins.rainbow_padding import fill_rainbow  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
WINDOWS = (32, 64, 128)
ALPHABET = "abcdefghij0123456789"
TASKS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "drop digits": lambda s: "".join(c for c in s if not c.isdigit()),
}


def example(rng: random.Random) -> dict[str, str]:
    while True:  # every answer has at least 3 characters, so an answer of <= 2 tokens is an early stop
        task = rng.choice(list(TASKS))
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 20)))
        answer = TASKS[task](s)
        if len(answer) >= 3:
            return {"prompt": f"{task}: {' '.join(s)}\n", "completion": " ".join(answer)}


def dataset(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [example(rng) for _ in range(n)]


def train(k: int, seed: int, steps: int, out: Path, train_path: Path, pad_to: int) -> MaskedDiffusionSFT:
    recipe = parse_recipe({
        "task": "masked_diffusion_sft",
        "model": {"name_or_path": "toy://bench-dllm"},
        "data": {"train": {"path": "json", "data_files": str(train_path)}, "max_length": pad_to},
        "task_options": {"pad_to_length": pad_to},
        "plugins": {"rainbow_padding": {"num_pads": k}},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "per_device_train_batch_size": 32, "warmup_steps": 30,
                  "lr_scheduler_type": "cosine", "logging_steps": 50, "save_strategy": "no", "seed": seed,
                  "disable_tqdm": True, "bf16": torch.cuda.is_available()},
        "output_dir": str(out / f"k{k}-s{seed}"), "overwrite": True,
    })
    runner = MaskedDiffusionSFT(recipe, f"bench k={k} seed={seed}")
    runner.run()
    return runner


@torch.no_grad()
def evaluate(runner: MaskedDiffusionSFT, prompts: list[dict[str, str]], k: int) -> dict:
    ctx = runner.ctx
    model, tok = ctx.model.eval(), ctx.tokenizer
    device = next(model.parameters()).device
    stops = {tok.eos_token_id, *ctx.plugins["rainbow_padding"].pad_ids(tok)} if k else {tok.eos_token_id}
    groups: dict[int, list[tuple[list[int], str]]] = {}
    for ex in prompts:
        ids = tok(ex["prompt"])["input_ids"]
        groups.setdefault(len(ids), []).append((ids, ex["completion"]))
    result = {}
    for mode in ("block", "whole_window"):
        for g in WINDOWS:
            lens, early, exact, tail_term, tail_top = [], [], [], [], []
            for ids_list in groups.values():
                prompt = torch.tensor([ids for ids, _ in ids_list], device=device)
                if mode == "block":  # the tail statistics are the same for both modes: measure once
                    window = torch.full((prompt.shape[0], g), tok.mask_token_id, device=device)
                    logits = model(input_ids=torch.cat([prompt, window], 1)).logits[:, -1].float()
                    probs = F.softmax(logits, -1)
                    tail_term += probs[:, sorted(stops)].sum(-1).tolist()
                    tail_top += probs.max(-1).values.tolist()
                block = 32 if mode == "block" else g
                out = diffusion_sample(model, prompt, mask_id=tok.mask_token_id, gen_length=g, block_length=block, steps=g)
                for row, (_, answer) in zip(out.tolist(), ids_list):
                    cut = cut_at_stop(row, stops)
                    lens.append(len(cut))
                    early.append(len(cut) <= 2)
                    exact.append(tok.decode(cut, skip_special_tokens=True).strip() == answer.strip())
            entry = {"mean_len": statistics.mean(lens), "early_term": statistics.mean(early), "exact": statistics.mean(exact)}
            if mode == "block":
                entry.update(tail_term_prob=statistics.mean(tail_term), tail_top_prob=statistics.mean(tail_top))
            result.setdefault(mode, {})[str(g)] = entry
    return result


def collator_overhead(examples: list[dict], pad_to: int, pad_ids: list[int]) -> float:
    base = MaskedDiffusionCollator(pad_token_id=5, pad_to_length=pad_to)
    ids = torch.tensor(pad_ids)
    batches = [examples[i:i + 32] for i in range(0, len(examples) - 32, 32)]
    ratios = []
    for _ in range(5):
        t0 = time.perf_counter()
        for b in batches:
            base(b)
        t1 = time.perf_counter()
        for b in batches:
            fill_rainbow(base(b), ids, 0)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def mean_over_seeds(per_seed: list[dict]) -> dict:
    out: dict = {}
    for mode in per_seed[0]:
        for g in per_seed[0][mode]:
            for key in per_seed[0][mode][g]:
                value = statistics.mean(r[mode][g][key] for r in per_seed)
                out.setdefault(mode, {}).setdefault(g, {})[key] = round(value, 4)
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = list(WINDOWS)
    for k, color in (("k0", "tab:blue"), ("k7", "tab:red")):
        for mode, line in (("block", "o-"), ("whole_window", "s--")):
            data = results[k][mode] if mode == "whole_window" else {str(g): results[k][str(g)] for g in xs}
            label = f"K={k[1:]}, {'block' if mode == 'block' else 'whole-window'} decoding"
            axes[0].plot(xs, [data[str(g)]["mean_len"] for g in xs], line, color=color, label=label)
            axes[1].plot(xs, [data[str(g)]["early_term"] for g in xs], line, color=color, label=label)
    axes[0].set(xlabel="generation window G (tokens)", ylabel="mean answer length (tokens)", xticks=xs)
    axes[1].set(xlabel="generation window G (tokens)", ylabel="early termination rate (<= 2 tokens)", xticks=xs)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle("Rainbow padding (K=7) vs EOS padding (K=0), toy dLLM")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-n", type=int, default=64)
    args = parser.parse_args()
    build = partial(toy.TOY_MODELS["gemma-bidir"].build, hidden=128, intermediate=344, layers=4)
    toy.register_toy_model("bench-dllm", build, "toy bidirectional Gemma, 4 layers, hidden 128")
    OUT.mkdir(parents=True, exist_ok=True)
    train_rows = dataset(4000, 1234)
    train_path = OUT / "rainbow_train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    prompts = dataset(args.eval_n, 99)
    tok = toy.load_toy_tokenizer()
    pad_to = max(len(tok(r["prompt"])["input_ids"]) for r in train_rows + prompts) + max(WINDOWS)
    results, per_seed = {}, {}
    for k in (0, 7):
        for seed in args.seeds:
            start = time.perf_counter()
            runner = train(k, seed, args.steps, OUT / "runs", train_path, pad_to)
            per_seed.setdefault(k, []).append(evaluate(runner, prompts, k))
            print(f"K={k} seed={seed}: {time.perf_counter() - start:.0f} s", per_seed[k][-1]["block"], flush=True)
    for k in (0, 7):
        averaged = mean_over_seeds(per_seed[k])
        results[f"k{k}"] = {**averaged["block"], "whole_window": averaged["whole_window"]}
    examples = [{"input_ids": tok(r["prompt"] + r["completion"])["input_ids"] + [5],
                 "labels": tok(r["prompt"] + r["completion"])["input_ids"] + [5]} for r in train_rows[:1024]]
    results["collator_overhead_ratio"] = round(collator_overhead(examples, pad_to, list(range(2049, 2056))), 3)
    results["train_steps"], results["seeds"], results["pad_to_length"] = args.steps, args.seeds, pad_to
    plot(results, OUT / "rainbow.png")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
