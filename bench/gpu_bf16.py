"""GPU check: recipe runs of toy://llama-medium (~25M params) in bf16 and fp32, with and without a loss term.

    python bench/gpu_bf16.py [--steps 150]

Each configuration runs the quickstart recipe with overrides through the normal `tokplug run` path (TRL
SFTTrainer, SDPA attention), batch 128 (chat examples of ~50-100 tokens), full fine-tuning, after one unmeasured
warm-up run. Prints one JSON object on its last line:
per configuration the median step time (ms), tokens/s, peak GPU memory (GiB), the final logged loss, and the ratios
``bf16_speedup`` (fp32 / bf16 step time) and ``loss_term_overhead`` (bf16 + zloss / bf16 step time).
Needs CUDA; on a machine without it, prints ``{"skipped": "no CUDA device"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import StepTimer, TimerPlugin  # noqa: E402

from hf_tokplug import manager  # noqa: E402
from hf_tokplug.cli import runner_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(name: str, out: Path, steps: int, bf16: bool, zloss: bool, batch: int) -> dict:
    TimerPlugin.timer = StepTimer()
    plugins = "{bench_timer: null, zloss: {weight: 1.0e-4}}" if zloss else "{bench_timer: null}"
    overrides = [
        "model.name_or_path=toy://llama-medium", "model.attn_implementation=sdpa", f"plugins={plugins}",
        "~data.eval", "data.max_length=256", "data.max_samples=20000", f"train.max_steps={steps}",
        f"train.per_device_train_batch_size={batch}", "train.learning_rate=1e-3", f"train.bf16={str(bf16).lower()}",
        "train.eval_strategy=no", "train.save_strategy=no", "train.logging_steps=25", "train.disable_tqdm=true",
        f"output_dir={out / name}",
    ]
    torch.cuda.reset_peak_memory_stats()
    runner = runner_for(str(REPO / "recipes" / "quickstart.yaml"), overrides)
    runner.run()
    step = TimerPlugin.timer.median(warmup=10)
    log = [json.loads(line) for line in (out / name / "trainer_log.jsonl").read_text().splitlines()]
    rows = [r for r in log if "loss" in r]
    return {
        "ms_per_step": round(step * 1e3, 2),
        "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in rows if "tokens_per_second" in r)),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "final_loss": round(rows[-1]["loss"], 4),
        "zloss_z": round(rows[-1].get("zloss/z", 0.0), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp, manager.registered("bench_timer", TimerPlugin):
        run("warmup", Path(tmp), 30, True, False, args.batch)  # CUDA context, kernels, allocator: not measured
        for name, bf16, zloss in (("bf16", True, False), ("fp32", False, False), ("bf16_zloss", True, True)):
            results[name] = run(name, Path(tmp), args.steps, bf16, zloss, args.batch)
            print(name, results[name], flush=True)
    results["bf16_speedup"] = round(results["fp32"]["ms_per_step"] / results["bf16"]["ms_per_step"], 3)
    results["loss_term_overhead"] = round(results["bf16_zloss"]["ms_per_step"] / results["bf16"]["ms_per_step"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
