"""The TRL trainer family through the host: overhead against plain TRL scripts, token-weight overhead, GRPO reward.

    python bench/trainers.py [--steps 30] [--rounds 3]

- ``dpo_step_time_ratio``: a ``preference_dpo`` recipe run with no plugin / the same DPOTrainer built by hand (same
  model, data, DPOConfig), median of per-round ratios of median step times; rounds alternate the order in one
  process so machine noise hits both (goal <= 1.02).
- ``grpo_step_time_ratio``: the same for ``grpo`` / a plain GRPOTrainer with the same reward functions (goal <= 1.02).
- ``token_weights_overhead``: SFT step time with a plugin whose ``tokplug_token_weights`` returns all ones / without
  it (goal <= 1.05).
- ``grpo_reward_first`` / ``grpo_reward_last``: mean reward of the first and last 10 steps of recipes/grpo.yaml (the
  bundled verifiable task, 60 steps).

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from common import StepTimer, TimerPlugin  # noqa: E402

from hf_tokplug import Plugin, hookimpl, manager, toy  # noqa: E402
from hf_tokplug.cli import runner_for  # noqa: E402
from hf_tokplug.recipe import parse_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = {"per_device_train_batch_size": 8, "learning_rate": 1e-4, "logging_steps": 10, "save_strategy": "no",
          "seed": 0, "disable_tqdm": True, "report_to": "none"}
PAIRS = {"train": "toy://kjv-preference", "max_length": 96, "max_samples": 512}
PROMPTS = {"train": "toy://kjv-verifiable", "max_samples": 512}
GRPO_TRAIN = {"num_generations": 8, "max_completion_length": 8}
REWARDS = [{"name": "exact_match", "column": "answer"}, {"name": "regex", "pattern": r"^\s*[A-Z][a-z]+\b"}]


class OnesWeights(Plugin):
    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        return torch.ones(batch.targets.shape, device=batch.targets.device)


def _recipe(task: str, data: dict, steps: int, out: Path, plugins: dict, **extra) -> float:
    TimerPlugin.timer = StepTimer()
    recipe = parse_recipe({
        "task": task, "model": {"name_or_path": "toy://llama"}, "data": data,
        "plugins": {"bench_timer": None, **plugins}, "train": {**COMMON, "max_steps": steps, **extra.pop("train", {})},
        "output_dir": str(out), "overwrite": True, **extra,
    })
    from hf_tokplug.manager import registries

    registries().runners[task](recipe, "bench").run()
    return TimerPlugin.timer.median()


def _plain(kind: str, steps: int, out: Path) -> float:
    """The same run as a hand-written TRL script (no hf_tokplug in the loop)."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    from hf_tokplug.rewards import resolve

    timer = StepTimer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"), dtype="float32")
    tokenizer = toy.load_toy_tokenizer()
    gpu = torch.cuda.is_available()
    precision = {"bf16": gpu and torch.cuda.is_bf16_supported(), "use_cpu": not gpu}
    if kind == "dpo":
        data = toy.load_toy_dataset("toy://kjv-preference").select(range(512))
        args = DPOConfig(output_dir=str(out), max_steps=steps, max_length=96, **COMMON, **precision)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        data = toy.load_toy_dataset("toy://kjv-verifiable").select(range(512))
        specs = resolve(REWARDS)
        args = GRPOConfig(output_dir=str(out), max_steps=steps, **GRPO_TRAIN, **COMMON, **precision,
                          reward_weights=[s.weight for s in specs])
        trainer = GRPOTrainer(model=model, reward_funcs=[s.function for s in specs], args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.median()


def _ratio(pairs: list[tuple[float, float]]) -> float:
    return round(statistics.median(a / b for a, b in pairs), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dpo, grpo, weights = [], [], []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.enter_context(manager.registered("bench_timer", TimerPlugin))
        stack.enter_context(manager.registered("bench_ones", OnesWeights))
        root = Path(tmp)
        for r in range(args.rounds):
            runs = {
                "dpo": (lambda: _recipe("preference_dpo", PAIRS, args.steps, root / "dpo-r", {}),
                        lambda: _plain("dpo", args.steps, root / "dpo-p")),
                "grpo": (lambda: _recipe("grpo", PROMPTS, args.steps, root / "grpo-r", {}, train=GRPO_TRAIN,
                                         task_options={"rewards": REWARDS}),
                         lambda: _plain("grpo", args.steps, root / "grpo-p")),
                "weights": (lambda: _recipe("causal_lm_sft", {"train": "toy://kjv-chat", "max_length": 128,
                                                              "max_samples": 512}, args.steps, root / "w1",
                                            {"bench_ones": None}),
                            lambda: _recipe("causal_lm_sft", {"train": "toy://kjv-chat", "max_length": 128,
                                                              "max_samples": 512}, args.steps, root / "w0", {})),
            }
            for name, (first, second) in runs.items():
                order = (first, second) if r % 2 == 0 else (second, first)
                times = {id(fn): fn() for fn in order}
                pair = (times[id(first)], times[id(second)])
                {"dpo": dpo, "grpo": grpo, "weights": weights}[name].append(pair)
                print(f"round {r} {name}: {pair[0] * 1e3:.1f} / {pair[1] * 1e3:.1f} ms per step", flush=True)
        # the reward curve of the shipped GRPO recipe
        out = root / "grpo-recipe"
        runner = runner_for(str(REPO / "recipes" / "grpo.yaml"), [f"output_dir={out}", "train.logging_steps=1",
                                                                  "train.disable_tqdm=true"])
        runner.run()
        rewards = [json.loads(line)["reward"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
                   if '"reward"' in line]
    result = {
        "dpo_step_time_ratio": _ratio(dpo),
        "grpo_step_time_ratio": _ratio(grpo),
        "token_weights_overhead": _ratio(weights),
        "grpo_reward_first": round(statistics.mean(rewards[:10]), 4),
        "grpo_reward_last": round(statistics.mean(rewards[-10:]), 4),
        "grpo_steps": len(rewards), "steps": args.steps, "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
