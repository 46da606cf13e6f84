"""Host overhead: a recipe run with no plugins vs the equivalent plain TRL script, and hook dispatch cost.

    python bench/host_overhead.py [--steps 40] [--rounds 3]

Both sides train the same toy Llama on the same chat data with the same SFTConfig (full fine-tuning, batch 16,
128 tokens, assistant-only loss); the plain side lets TRL tokenize and collate, the recipe side goes through the
host. Rounds alternate A/B in one process so machine noise hits both. Step time = median interval between
``on_step_end`` events after a warm-up, measured by the same callback on both sides; the ratio is the median over
rounds of recipe/plain. Prints one JSON object on its last line: ``step_time_ratio`` (goal <= 1.02) and ``hook_call_us`` (mean microseconds per hook
dispatch through the host, over broadcast, chain, merge and extend hooks with three plugins enabled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from common import StepTimer, TimerPlugin  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_tokplug import Plugin, hookimpl, manager, toy  # noqa: E402
from hf_tokplug.context import RunContext  # noqa: E402
from hf_tokplug.recipe import parse_recipe  # noqa: E402
from hf_tokplug.runners.causal_lm import CausalLMSFT  # noqa: E402

def train_args(steps: int) -> dict:
    return {
        "max_steps": steps, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 10,
        "save_strategy": "no", "gradient_checkpointing": False, "seed": 0, "disable_tqdm": True, "report_to": "none",
    }


DATA = {"train": "toy://kjv-chat", "max_length": 128, "max_samples": 2000, "assistant_only_loss": True}


def run_recipe(steps: int, out: Path) -> float:
    TimerPlugin.timer = StepTimer()
    recipe = parse_recipe({
        "task": "causal_lm_sft", "model": {"name_or_path": "toy://llama"}, "data": DATA,
        "plugins": {"bench_timer": None}, "train": train_args(steps), "output_dir": str(out), "overwrite": True,
    })
    CausalLMSFT(recipe, "bench").run()
    return TimerPlugin.timer.median()


def run_plain(steps: int, out: Path) -> float:
    from trl import SFTConfig, SFTTrainer

    timer = StepTimer()
    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"), dtype="float32")
    tokenizer = toy.load_toy_tokenizer()
    data = toy.load_toy_dataset("toy://kjv-chat").select(range(2000))
    gpu = torch.cuda.is_available()  # the same defaults the host picks
    args = SFTConfig(output_dir=str(out), max_length=128, assistant_only_loss=True, bf16=gpu and torch.cuda.is_bf16_supported(),
                     use_cpu=not gpu, **train_args(steps))
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer]).train()
    return timer.median()


class Noop(Plugin):
    @hookimpl
    def tokplug_validate(self, ctx):
        pass

    @hookimpl
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        return None

    @hookimpl
    def tokplug_evaluate(self, ctx):
        return {"x": 1.0}

    @hookimpl
    def tokplug_callbacks(self, ctx):
        return []


def hook_call_us(calls: int = 20000) -> float:
    with contextlib.ExitStack() as stack:
        for i in range(3):
            stack.enter_context(manager.registered(f"bench_noop_{i}", Noop))
        ctx = RunContext.create({f"bench_noop_{i}": None for i in range(3)})
        hooks = [
            ("tokplug_validate", {}), ("tokplug_prepare_dataset", {"dataset": [], "split": "train"}),
            ("tokplug_evaluate", {}), ("tokplug_callbacks", {}),
        ]
        start = time.perf_counter()
        for i in range(calls):
            name, kwargs = hooks[i % len(hooks)]
            ctx.call(name, **kwargs)
        return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe_times, plain_times = [], []
    with tempfile.TemporaryDirectory() as tmp, manager.registered("bench_timer", TimerPlugin):
        for r in range(args.rounds):
            order = [("recipe", run_recipe), ("plain", run_plain)]
            if r % 2:
                order.reverse()
            for name, fn in order:
                t = fn(args.steps, Path(tmp) / f"{name}-{r}")
                (recipe_times if name == "recipe" else plain_times).append(t)
                print(f"round {r} {name}: {t * 1e3:.1f} ms/step", flush=True)
    result = {
        # each round runs the two back to back: the median of per-round ratios cancels slow drifts of the machine
        "step_time_ratio": round(statistics.median(r / p for r, p in zip(recipe_times, plain_times)), 4),
        "hook_call_us": round(hook_call_us(), 2),
        "recipe_ms_per_step": round(statistics.median(recipe_times) * 1e3, 2),
        "plain_ms_per_step": round(statistics.median(plain_times) * 1e3, 2),
        "steps": args.steps, "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
