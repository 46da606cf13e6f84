"""Tokenizer-independent evaluation: bits per byte of a causal LM on raw text.

Per-token perplexity cannot compare two tokenizers (they cut the same text into different numbers of tokens).
Bits per byte divides the total negative log-likelihood of a text by its UTF-8 length, so a model with a swapped
tokenizer (TokenAdapt) or dynamic tokens is scored on the same footing as the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def bits_per_byte(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    max_logits_bytes: int = 64 * 2**20,
    progress: bool = False,
) -> dict[str, float]:
    """Score ``texts`` with ``model`` under ``tokenizer``; return ``bpb``, ``nll`` (nats), ``bytes``, ``tokens``.

    Each text is encoded without special tokens and preceded by one context token (BOS, else EOS), so its first
    token is predicted too. Texts longer than ``max_length`` are scored in consecutive windows that overlap by one
    token (every token predicted once). Batches also respect ``max_logits_bytes`` of float32 logits, so a 151k
    vocabulary does not blow up memory. The softmax runs over the tokenizer's ids only: output rows past
    ``len(tokenizer)`` (embedding padding) are ids no text has.
    """
    from tqdm.auto import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("bits_per_byte needs a tokenizer with a BOS or EOS token to condition the first token")
    windows: list[list[int]] = []
    total_bytes = 0
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        total_bytes += len(text.encode("utf-8"))
        seq = [start, *ids]
        step = max_length - 1
        for s in range(0, max(len(seq) - 1, 1), step):
            windows.append(seq[s:s + max_length])
    # Rows past the tokenizer (embedding padding) are ids no text can have: the softmax is over the tokenizer's ids.
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else len(tokenizer)
    vocab = min(rows, len(tokenizer))
    windows.sort(key=len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens, i = 0.0, 0, 0
    bar = tqdm(total=len(windows), desc="bits per byte", unit="window", disable=not progress)
    try:
        while i < len(windows):
            width = len(windows[min(i + batch_size, len(windows)) - 1])
            fit = max(1, max_logits_bytes // (4 * vocab * width))
            batch = windows[i:i + min(batch_size, fit)]
            i += len(batch)
            width = max(len(w) for w in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, : len(w)] = torch.tensor(w)
                mask[row, : len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:]
            keep = mask[:, 1:].bool()
            token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll += float(token_nll[keep].sum())
            tokens += int(keep.sum())
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return {"bpb": nll / math.log(2) / max(total_bytes, 1), "nll": nll, "bytes": float(total_bytes),
            "tokens": float(tokens)}
