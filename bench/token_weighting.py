"""Token-weighting methods on the per-token contract: TGDPO against plain DPO (issue "Token-level weighting methods").

    python bench/token_weighting.py [--epochs 150] [--rounds 4]   (~1 min on 2 CPU cores)

Model: toy://llama, randomly initialised (the pretrained embedded default of issue "Models that know something" has
not landed). Data: preference pairs built from the bundled KJV text whose chosen and rejected completions differ in
one or two words (same token length, so the differing tokens are known positions).

- ``tgdpo.chosen_logp_drop``: how far the chosen completions' summed log-probability falls from the initial model
  after ``--epochs`` epochs, plain DPO vs TGDPO (pi_rm: plain DPO trained for a quarter of the epochs, alpha 1);
- ``tgdpo.diff_token_share``: the share of the per-token log-probability change (|log pi_final - log pi_init|,
  chosen and rejected completions) that lies on the differing tokens;
- ``step_time_ratio.tgdpo``: TGDPO step time / plain DPO step time (median step times, rounds alternating the order
  in this one process).
- ``sstoken`` and ``cdpo``: ``null``: those two plugins are not built yet.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from common import StepTimer, TimerPlugin  # noqa: E402

from hf_tokplug import manager, toy  # noqa: E402
from hf_tokplug.cli import runner_for  # noqa: E402

MODEL = "toy://llama"
WORDS = ["LORD", "king", "house", "land", "people", "son", "day", "man", "city", "water", "hand", "heart"]


def make_pairs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """prompt / chosen (a verse's own continuation) / rejected (the same with one or two words swapped), kept only
    when chosen and rejected tokenize to the same length; ``diff`` lists the differing completion positions."""
    rng = random.Random(seed)
    verses = [row["text"] for row in toy.load_toy_dataset("toy://kjv-text", "train")]
    pairs = []
    for text in verses:
        words = text.split()
        if len(words) < 14:
            continue
        prompt, rest = " ".join(words[:6]), words[6:14]
        spots = [i for i, w in enumerate(rest) if w in WORDS] or [rng.randrange(len(rest))]
        rejected = list(rest)
        for i in rng.sample(spots, min(len(spots), rng.choice([1, 2]))):
            rejected[i] = rng.choice([w for w in WORDS if w != rest[i]])
        chosen_ids = tokenizer(" " + " ".join(rest))["input_ids"]
        rejected_ids = tokenizer(" " + " ".join(rejected))["input_ids"]
        if len(chosen_ids) != len(rejected_ids) or chosen_ids == rejected_ids:
            continue
        diff = [i for i, (a, b) in enumerate(zip(chosen_ids, rejected_ids)) if a != b]
        pairs.append({"prompt": prompt, "chosen": " " + " ".join(rest), "rejected": " " + " ".join(rejected),
                      "diff": diff})
        if len(pairs) == n:
            break
    return pairs


def run(tmp: Path, name: str, data: Path, epochs: int, plugins: dict, timer: StepTimer | None = None) -> Path:
    out = tmp / name
    recipe = {
        "task": "preference_dpo", "model": {"name_or_path": MODEL},
        "data": {"train": str(data), "max_length": 64}, "plugins": {**plugins, "timer": None},
        "train": {"num_train_epochs": epochs, "per_device_train_batch_size": 8, "learning_rate": 5e-4, "beta": 0.1,
                  "logging_steps": 10, "save_strategy": "no", "seed": 0, "disable_tqdm": True},
        "output_dir": str(out), "overwrite": True,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    TimerPlugin.timer = timer
    runner_for(str(path), []).run()
    TimerPlugin.timer = None
    return out


def completion_log_probs(model, tokenizer, pairs: list[dict], side: str) -> list[torch.Tensor]:
    """Per-token log-probabilities of each pair's ``side`` completion given its prompt."""
    rows = []
    model.eval()
    for pair in pairs:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        completion = tokenizer(pair[side])["input_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, len(prompt) - 1: -1], -1)
        rows.append(logp.gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return rows


def measure(folder: Path | str, init: list, tokenizer, pairs: list[dict]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    final = {side: completion_log_probs(model, tokenizer, pairs, side) for side in ("chosen", "rejected")}
    drop = statistics.mean(float(a.sum() - b.sum()) for a, b in zip(init["chosen"], final["chosen"]))
    on_diff = total = 0.0
    for side in ("chosen", "rejected"):
        for pair, a, b in zip(pairs, init[side], final[side]):
            change = (b - a).abs()
            total += float(change.sum())
            on_diff += float(change[pair["diff"]].sum())
    return {"chosen_logp_drop": drop, "diff_token_share": on_diff / max(total, 1e-12)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--time-epochs", type=int, default=25, help="epochs of each timing run (2 steps per epoch)")
    args = parser.parse_args()
    torch.manual_seed(0)
    manager.register_plugin("timer", TimerPlugin)
    tokenizer = toy.load_tokenizer(MODEL)
    pairs = make_pairs(tokenizer, args.pairs)
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(toy.resolve(MODEL))
    init = {side: completion_log_probs(initial, tokenizer, pairs, side) for side in ("chosen", "rejected")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs))
        rm = run(tmp, "rm", data, max(1, args.epochs // 4), {})
        tg_plugins = {"tgdpo": {"rm_model": str(rm), "alpha": 1.0}}
        dpo = measure(run(tmp, "dpo", data, args.epochs, {}), init, tokenizer, pairs)
        tgdpo = measure(run(tmp, "tgdpo", data, args.epochs, tg_plugins), init, tokenizer, pairs)
        ratios = []
        for r in range(args.rounds):  # step time: short runs, order alternating per round
            times = {}
            for name in (["dpo", "tgdpo"] if r % 2 == 0 else ["tgdpo", "dpo"]):
                timer = StepTimer()
                run(tmp, f"time-{name}", data, args.time_epochs, tg_plugins if name == "tgdpo" else {}, timer)
                times[name] = timer.median(warmup=5)
            ratios.append(times["tgdpo"] / times["dpo"])
    result = {
        "model": f"{MODEL} (random init)",
        "pairs": len(pairs), "epochs": args.epochs,
        "tgdpo": {"chosen_logp_drop": {"dpo": round(dpo["chosen_logp_drop"], 4),
                                       "tgdpo": round(tgdpo["chosen_logp_drop"], 4)},
                  "diff_token_share": {"dpo": round(dpo["diff_token_share"], 4),
                                       "tgdpo": round(tgdpo["diff_token_share"], 4)}},
        "sstoken": None,
        "cdpo": None,
        "step_time_ratio": {"tgdpo": round(statistics.median(ratios), 4)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
