"""Token-weighting methods on the per-token contract: TGDPO against plain DPO (issue "Token-level weighting methods").

    python bench/token_weighting.py [--epochs 150] [--rounds 4]   (~4 min on 2 CPU cores)

Model: toy://llama, randomly initialised (the pretrained embedded default of issue "Models that know something" has
not landed). Data: preference pairs built from the bundled KJV text whose chosen and rejected completions differ in
one or two words (same token length, so the differing tokens are known positions).

- ``tgdpo.chosen_logp_drop``: how far the chosen completions' summed log-probability falls from the initial model
  after ``--epochs`` epochs, plain DPO vs TGDPO (pi_rm: plain DPO trained for a quarter of the epochs, alpha 1);
- ``tgdpo.diff_token_share``: the share of the per-token log-probability change (|log pi_final - log pi_init|,
  chosen and rejected completions) that lies on the differing tokens;
- ``sstoken.noise_precision``: on prompt/completion data whose completions carry inserted noise symbols (``#``, ``@``,
  ``~``, which never occur in the clean text), the share of the tokens ssToken keeps (rho 0.6) that are not noise,
  over the training set at the end of training (the noise share of all response tokens is printed beside it);
- ``sstoken.clean_eval_loss``: eval loss on clean held-out completions after full SFT, REL-only (gamma 1) and ssToken
  (gamma 0.5), same data, steps and seed;
- ``step_time_ratio``: TGDPO / plain DPO, ssToken / plain SFT and cDPO (both loss forms, weights precomputed: the
  scoring is a one-off cost before training) / plain DPO median step times (rounds alternating the order in this one
  process).
- ``cdpo.critical_recall_at_1``: on synthetic arithmetic traces whose wrong version has one critical token (the first
  wrong digit; the second is its consequence), the share of rejected traces whose largest cDPO weight w_t sits on
  it, with a positive / negative model fine-tuned here on the correct / wrong traces;
- ``cdpo.critical_token_prob``: the policy's mean probability of that critical wrong token after plain DPO, after
  cDPO and after cDPO with the reference's per-position loss (same pairs, steps, seed; lower is better).

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


def run(tmp: Path, name: str, data: Path, epochs: int, plugins: dict, timer: StepTimer | None = None,
        task: str = "preference_dpo", eval_data: Path | None = None) -> tuple[Path, dict, object]:
    out = tmp / name
    train = {"num_train_epochs": epochs, "per_device_train_batch_size": 8, "learning_rate": 5e-4,
             "logging_steps": 10, "save_strategy": "no", "seed": 0, "disable_tqdm": True}
    if task == "preference_dpo":
        train["beta"] = 0.1
    recipe = {
        "task": task, "model": {"name_or_path": MODEL},
        "data": {"train": str(data), "max_length": 64, **({"eval": str(eval_data)} if eval_data else {})},
        "plugins": {**plugins, "timer": None}, "train": train, "output_dir": str(out), "overwrite": True,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    TimerPlugin.timer = timer
    runner = runner_for(str(path), [])
    metrics = runner.run()
    TimerPlugin.timer = None
    return out, metrics, runner


NOISE = ["#", "@", "~"]


def noisy_completions(tokenizer, n: int, seed: int = 1) -> tuple[list[dict], list[dict], set[int]]:
    """(train rows with noise symbols inserted into ~25% of the completion's words, clean eval rows, noise ids)."""
    rng = random.Random(seed)
    verses = [row["text"] for row in toy.load_toy_dataset("toy://kjv-text", "train")]
    noise_ids = {i for sym in NOISE for i in tokenizer(sym)["input_ids"]}
    noise_ids -= {i for sym in NOISE for i in tokenizer(" ")["input_ids"]}
    rows = []
    for text in verses:
        words = text.split()
        if len(words) < 12:
            continue
        prompt, completion = " ".join(words[:6]), " " + " ".join(words[6:18])
        clean_ids = set(tokenizer(prompt + completion)["input_ids"])
        assert not clean_ids & noise_ids, "a noise symbol occurs in the clean text"
        rows.append((prompt, completion))
        if len(rows) == n + n // 4:
            break
    train, evald = rows[:n], rows[n:]
    noisy = []
    for prompt, completion in train:
        words = completion.split()
        out = []
        for word in words:
            out.append(word)
            if rng.random() < 0.25:
                out.append(rng.choice(NOISE) * rng.choice([1, 2]))
        noisy.append({"prompt": prompt, "completion": " " + " ".join(out)})
    return noisy, [{"prompt": p, "completion": c} for p, c in evald], noise_ids


def arithmetic_traces(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        wrong = a + b + rng.choice([-1, 1])
        rows.append({"prompt": f"Add {a} and {b}.", "chosen": f" {a} plus {b} makes {a + b} . The answer is {a + b}",
                     "rejected": f" {a} plus {b} makes {wrong} . The answer is {wrong}"})
    return rows


def cdpo_bench(tmp: Path, args) -> dict:
    from safetensors.torch import load_file

    from hf_tokplug.plugin import unwrap

    traces = arithmetic_traces(args.cdpo_traces)
    pairs = tmp / "traces.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in traces))
    for side in ("chosen", "rejected"):
        (tmp / f"{side}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side]}) + "\n"
                                                   for r in traces))
    pos = run(tmp, "positive", tmp / "chosen.jsonl", args.cdpo_sft_epochs, {}, task="causal_lm_sft")[0]
    neg = run(tmp, "negative", tmp / "rejected.jsonl", args.cdpo_sft_epochs, {}, task="causal_lm_sft")[0]
    _, _, plain = run(tmp, "dpo-arith", pairs, args.cdpo_epochs, {})
    _, _, weighted = run(tmp, "cdpo-arith", pairs, args.cdpo_epochs,
                         {"cdpo": {"positive_model": str(pos), "negative_model": str(neg), "lam": 1.0}})
    weights_file = tmp / "cdpo-arith" / "cdpo_weights.safetensors"
    _, _, position = run(tmp, "cdpo-position-arith", pairs, args.cdpo_epochs,
                         {"cdpo": {"weights_path": str(weights_file), "loss": "position"}})
    weights = load_file(str(weights_file))
    dataset = weighted.ctx.trainer.train_dataset
    hits, probs = 0, {"dpo": [], "cdpo": [], "cdpo_position": []}
    import hashlib

    for prompt, chosen, rejected in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        critical = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
        key = hashlib.sha1(torch.tensor(prompt + rejected, dtype=torch.int64).numpy().tobytes()).hexdigest()
        hits += int(int(weights[key].argmax()) == critical)
        ids = torch.tensor([prompt + rejected[:critical]])
        for name, runner in (("dpo", plain), ("cdpo", weighted), ("cdpo_position", position)):
            model = unwrap(runner.ctx.model).eval()
            with torch.no_grad():
                p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[rejected[critical]]
            probs[name].append(float(p))
    return {"critical_recall_at_1": round(hits / len(dataset), 4),
            "critical_token_prob": {k: round(statistics.mean(v), 5) for k, v in probs.items()}}, pairs, weights_file


def noise_precision(runner, noise_ids: set[int]) -> tuple[float, float]:
    """(share of kept tokens that are clean, share of all response tokens that are clean), over the training set."""
    from hf_tokplug.training import token_batch

    ctx, trainer = runner.ctx, runner.ctx.trainer
    plugin = ctx.plugins["sstoken"]
    trainer.model.train()
    kept_clean = kept = clean = total = 0
    noise = torch.tensor(sorted(noise_ids))
    for inputs in trainer.get_train_dataloader():
        batch = token_batch(trainer, inputs, ctx.traits)
        weights = plugin.tokplug_token_weights(ctx, batch) > 0
        is_noise = torch.isin(batch.targets, noise)
        scored = batch.scored
        kept += int(weights.sum())
        kept_clean += int((weights & ~is_noise).sum())
        total += int(scored.sum())
        clean += int((scored & ~is_noise).sum())
    return kept_clean / max(kept, 1), clean / max(total, 1)


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
    parser.add_argument("--sft-examples", type=int, default=160)
    parser.add_argument("--sft-epochs", type=int, default=3)
    parser.add_argument("--cdpo-traces", type=int, default=48)
    parser.add_argument("--cdpo-sft-epochs", type=int, default=20)
    parser.add_argument("--cdpo-epochs", type=int, default=10)
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
        rm = run(tmp, "rm", data, max(1, args.epochs // 4), {})[0]
        tg_plugins = {"tgdpo": {"rm_model": str(rm), "alpha": 1.0}}
        dpo = measure(run(tmp, "dpo", data, args.epochs, {})[0], init, tokenizer, pairs)
        tgdpo = measure(run(tmp, "tgdpo", data, args.epochs, tg_plugins)[0], init, tokenizer, pairs)

        noisy, clean_eval, noise_ids = noisy_completions(tokenizer, args.sft_examples)
        sft_data, eval_data = tmp / "noisy.jsonl", tmp / "clean_eval.jsonl"
        sft_data.write_text("".join(json.dumps(r) + "\n" for r in noisy))
        eval_data.write_text("".join(json.dumps(r) + "\n" for r in clean_eval))
        ss = {"gamma": 0.5, "rho": 0.6, "cache": False}
        sft_runs = {"full_sft": {}, "rel_only": {"sstoken": {**ss, "gamma": 1.0}}, "sstoken": {"sstoken": ss}}
        clean_loss, runners = {}, {}
        for name, plugins in sft_runs.items():
            _, metrics, runners[name] = run(tmp, name, sft_data, args.sft_epochs, plugins, task="causal_lm_sft",
                                            eval_data=eval_data)
            clean_loss[name] = round(metrics["eval_loss"], 4)
        precision, clean_share = noise_precision(runners["sstoken"], noise_ids)
        cdpo, traces, cdpo_weights = cdpo_bench(tmp, args)

        ratios: dict[str, list[float]] = {"tgdpo": [], "sstoken": [], "cdpo": [], "cdpo_position": []}
        trace_epochs = max(1, args.time_epochs // 3)  # 6 steps per epoch on the traces, 2 on the pairs
        timed = (("tgdpo", "dpo", "preference_dpo", data, tg_plugins, args.time_epochs),
                 ("sstoken", "sft", "causal_lm_sft", sft_data, {"sstoken": ss}, args.time_epochs),
                 ("cdpo", "dpo-traces", "preference_dpo", traces, {"cdpo": {"weights_path": str(cdpo_weights)}},
                  trace_epochs),
                 ("cdpo_position", "dpo-traces", "preference_dpo", traces,
                  {"cdpo": {"weights_path": str(cdpo_weights), "loss": "position"}}, trace_epochs))
        for r in range(args.rounds):  # step time: short runs, order alternating per round
            for method, base, task, data_file, plugins, epochs in timed:
                times = {}
                for name in ([base, method] if r % 2 == 0 else [method, base]):
                    timer = StepTimer()
                    run(tmp, f"time-{name}", data_file, epochs, plugins if name == method else {}, timer, task=task)
                    times[name] = timer.median(warmup=5)
                ratios[method].append(times[method] / times[base])
    result = {
        "model": f"{MODEL} (random init)",
        "pairs": len(pairs), "epochs": args.epochs,
        "tgdpo": {"chosen_logp_drop": {"dpo": round(dpo["chosen_logp_drop"], 4),
                                       "tgdpo": round(tgdpo["chosen_logp_drop"], 4)},
                  "diff_token_share": {"dpo": round(dpo["diff_token_share"], 4),
                                       "tgdpo": round(tgdpo["diff_token_share"], 4)}},
        "sstoken": {"noise_precision": round(precision, 4), "clean_share_of_response_tokens": round(clean_share, 4),
                    "clean_eval_loss": clean_loss},
        "cdpo": cdpo,
        "step_time_ratio": {k: round(statistics.median(v), 4) for k, v in ratios.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
