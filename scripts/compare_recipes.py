"""Run every recipe in recipes/ at a few steps and fingerprint what it did: per-step losses and saved files.

A refactor of the host must not change what users get. Run this before and after, then compare:

    python scripts/compare_recipes.py run  /tmp/before.json   # on the old commit
    python scripts/compare_recipes.py run  /tmp/after.json    # on the new one
    python scripts/compare_recipes.py diff /tmp/before.json /tmp/after.json

Each recipe runs in its own process (``tokplug run`` with overrides that shrink it to a few steps) under one root
folder; recipes that consume another run's output (CAFT Stage B, the rainbow retrofit, TARA composition) point at
the runs made just before. Fingerprint per recipe: every logged loss-like value of trainer_log.jsonl in order,
metrics.json and tokplug.json without timings, versions and the run root, and a hash of every saved file: tensors of
safetensors files (not their byte layout), JSON with volatile keys dropped and string lists sorted (PEFT writes
target_modules from a set), other files byte for byte; files that only record times, paths or versions are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_TRAIN = ["train.logging_steps=1", "train.disable_tqdm=true", "data.max_samples=64"]

# (run name, recipe, overrides); {root} is the run root
RUNS: list[tuple[str, str, list[str]]] = [
    ("quickstart", "quickstart", [*SMALL_TRAIN, "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2"]),
    ("caft_heads", "caft_heads", [*SMALL_TRAIN, "train.max_steps=3", "train.save_steps=2"]),
    ("caft_sft", "caft_sft", [*SMALL_TRAIN, "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
                              "plugins.caft.heads_path={root}/caft_heads"]),
    ("rainbow_sft", "rainbow_sft", [*SMALL_TRAIN, "train.max_steps=3", "train.save_steps=2"]),
    ("dllm_eos", "rainbow_sft", [*SMALL_TRAIN, "train.max_steps=2", "plugins.rainbow_padding.num_pads=0"]),
    ("rainbow_retrofit", "rainbow_retrofit", [*SMALL_TRAIN, "data.max_samples=32", "model.name_or_path={root}/dllm_eos"]),
    ("tara_sks", "tara_train", ["train.logging_steps=1", "train.disable_tqdm=true", "train.max_steps=3",
                                "train.save_steps=2", "task_options.num_inference_steps=2"]),
    ("tara_zwx", "tara_train", ["train.logging_steps=1", "train.disable_tqdm=true", "train.max_steps=2",
                                "plugins.tara.rare_token=zwx", "plugins.tara.class_word=circle",
                                "task_options.instance_data_dir=toy://shapes/blue-circle",
                                "task_options.instance_prompt=a photo of zwx circle",
                                "task_options.sample_prompts=[a photo of zwx circle]",
                                "task_options.num_inference_steps=2"]),
    ("tara_compose", "tara_compose", ["plugins.tara.compose=[{root}/tara_sks, {root}/tara_zwx]",
                                      "task_options.num_inference_steps=2"]),
    ("tokenadapt_transplant", "tokenadapt_transplant", ["plugins.tokenadapt.eval.max_texts=16"]),
    ("tokenadapt_then_sft", "tokenadapt_then_sft", [*SMALL_TRAIN, "train.max_steps=3",
                                                    "plugins.tokenadapt.eval.max_texts=16"]),
    ("dyntok_encoder", "dyntok_encoder", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2",
                                          "train.per_device_train_batch_size=8"]),
    ("dyntok_hypernet", "dyntok_hypernet", ["data.max_samples=96", "task_options.steps=3", "task_options.warmup_steps=1",
                                            "task_options.batch_size=4", "task_options.eval_texts=8"]),
    ("dyntok_generate", "dyntok_generate", ["task_options.new_tokens=50", "task_options.max_new_tokens=8",
                                            "task_options.max_texts=100"]),
    ("dpo", "dpo", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2", "train.save_steps=2"]),
    ("reward", "reward", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2", "train.save_steps=2"]),
    ("grpo", "grpo", [*SMALL_TRAIN, "train.max_steps=2", "train.save_steps=2"]),
    ("tgdpo", "tgdpo", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2", "train.save_steps=2",
                        "plugins.tgdpo.rm_model={root}/dpo"]),
    ("sstoken", "sstoken", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2", "train.save_steps=2"]),
    ("cdpo", "cdpo", [*SMALL_TRAIN, "train.max_steps=3", "train.eval_steps=2", "train.save_steps=2"]),
]

VOLATILE_FILES = {"run_info.json", "README.md", "trainer_log.jsonl", "metrics.json", "recipe.resolved.yaml",
                  "tokplug.json", "trainer_state.json", "training_args.bin"}
VOLATILE_METRICS = ("runtime", "per_second", "seconds", "flos", "tokens_per_second")
VOLATILE_KEYS = ("time", "second", "strings_embedded", "library_versions", "hf_tokplug_version")


def _canonical(value, root: str):
    if isinstance(value, dict):
        return {k: _canonical(v, root) for k, v in value.items() if not any(s in k for s in VOLATILE_KEYS)}
    if isinstance(value, list):
        items = [_canonical(v, root) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    if isinstance(value, str):
        return value.replace(root, "{root}")
    return value


def _hash(path: Path, root: str) -> str:
    digest = hashlib.sha256()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                digest.update(key.encode())
                digest.update(f.get_tensor(key).contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    elif path.suffix == ".json":
        digest.update(json.dumps(_canonical(json.loads(path.read_text(encoding="utf-8")), root), sort_keys=True).encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(folder: Path) -> dict:
    root = str(folder.parent)
    log = folder / "trainer_log.jsonl"
    losses = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            losses.append({k: v for k, v in row.items() if "loss" in k or k.endswith("/z") or k in ("step", "grad_norm")})
    metrics_path = folder / "metrics.json"
    metrics = {}
    if metrics_path.is_file():
        metrics = {k: v for k, v in _canonical(json.loads(metrics_path.read_text()), root).items()
                   if not any(s in k for s in VOLATILE_METRICS) and k != "hub_commit"}
    manifest_path = folder / "tokplug.json"
    manifest = {}
    if manifest_path.is_file():
        manifest = {k: v for k, v in _canonical(json.loads(manifest_path.read_text()), root).items()
                    if k != "base_model"}
    files = {
        str(p.relative_to(folder)): _hash(p, root)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in VOLATILE_FILES and not p.name.startswith(".")
    }
    return {"log": losses, "metrics": metrics, "manifest": manifest, "files": files}


def run_all(out: Path, only: list[str] | None, root: Path | None = None) -> None:
    """Run (or, with ``root``, only fingerprint the runs already under ``root``) and write the summary to ``out``."""
    rerun = root is None
    root = root or Path(tempfile.mkdtemp(prefix="tokplug-compare-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    results = {}
    for name, recipe, overrides in RUNS:
        if only and name not in only:
            continue
        args = [o.format(root=root) for o in overrides] + [f"output_dir={root}/{name}"]
        cmd = [sys.executable, "-m", "hf_tokplug.cli", "run", str(REPO / "recipes" / f"{recipe}.yaml"), *args]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True) if rerun else None
        if proc is not None and proc.returncode != 0:
            results[name] = {"error": proc.stderr[-2000:]}
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = fingerprint(root / name)
        print(f"{name}: {len(results[name]['log'])} log rows, {len(results[name]['files'])} files", file=sys.stderr)
    out.write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    print(f"wrote {out} (runs under {root})", file=sys.stderr)


def diff(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for name in sorted(set(before) | set(after)):
        x, y = before.get(name), after.get(name)
        if x == y:
            print(f"{name}: identical ({len((x or {}).get('log', []))} log rows, {len((x or {}).get('files', {}))} files)")
            continue
        bad += 1
        print(f"{name}: DIFFERS")
        for key in ("error", "log", "metrics", "manifest", "files"):
            if (x or {}).get(key) != (y or {}).get(key):
                print(f"  {key}:\n    before {json.dumps((x or {}).get(key))[:600]}\n    after  {json.dumps((y or {}).get(key))[:600]}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="*")
    r.add_argument("--root", type=Path, default=None, help="fingerprint the runs already under this folder")
    d = sub.add_parser("diff")
    d.add_argument("before", type=Path)
    d.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "run":
        run_all(args.out, args.only, args.root)
        return 0
    return diff(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
