"""Supertokens: a byte-level BPE whose merges may cross word boundaries.

Training sees each document cut into random chunks (lengths in characters drawn from a binned, roughly Gaussian
distribution over 4..23 peaking at 12-13) and may only merge inside a chunk; at inference the tokenizer runs
plain ByteLevel with no regex split, so learned tokens like ``' of the'`` apply anywhere. Compression is reported
as bytes per token and tokens per word against a base tokenizer on held-out text.

    tokplug supertokens --data toy://kjv-text --vocab-size 4096 --base toy://tokenizer/kjv-bpe --out runs/super
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

SEPARATOR = "\u2402"  # a control picture that plain text does not contain; removed by the training pre-tokenizer
CHUNK_LENGTHS = list(range(4, 24))


def chunk_length_weights(mean: float = 12.5, std: float = 4.0) -> list[float]:
    """Binned Gaussian over 4..23 characters (peak at 12-13)."""
    import math

    return [math.exp(-0.5 * ((n - mean) / std) ** 2) for n in CHUNK_LENGTHS]


def chunk_text(text: str, rng: random.Random, weights: list[float]) -> str:
    """``text`` with :data:`SEPARATOR` inserted at random chunk boundaries."""
    out, i = [], 0
    lengths = rng.choices(CHUNK_LENGTHS, weights=weights, k=len(text) // 4 + 1)
    for n in lengths:
        if i >= len(text):
            break
        out.append(text[i:i + n])
        i += n
    return SEPARATOR.join(out)


def train_supertokens(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
                      max_token_length: int = 30, seed: int = 0) -> Any:
    """Train and return a ``tokenizers.Tokenizer`` of supertokens (inference pre-tokenizer already swapped)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    weights = chunk_length_weights()

    def chunks() -> Iterator[str]:
        for text in texts:
            if text:
                yield chunk_text(text, rng, weights)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SEPARATOR), behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens or []), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=max_token_length,
    )
    tok.train_from_iterator(chunks(), trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok


def compression(tokenizer: Any, texts: list[str]) -> dict[str, float]:
    """Bytes per token and tokens per whitespace word of ``tokenizer`` (a transformers tokenizer) on ``texts``."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = sum(len(i) for i in ids)
    data = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {"bytes_per_token": data / max(tokens, 1), "tokens_per_word": tokens / max(words, 1), "tokens": tokens}


def to_transformers(tok: Any, base: Any | None) -> Any:
    """Wrap as a ``PreTrainedTokenizerFast`` with the base tokenizer's special-token roles and chat template."""
    from transformers import PreTrainedTokenizerFast

    roles = {}
    if base is not None:
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(base, role, None)
            if value is not None and tok.token_to_id(str(value)) is not None:
                roles[role] = str(value)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **roles)
    if base is not None and isinstance(getattr(base, "chat_template", None), str):
        fast.chat_template = base.chat_template
    return fast


def read_texts(data: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Texts from ``toy://kjv-text``, a ``.txt`` file (one document per line) or a ``.jsonl``/``.json`` file."""
    from hf_tokplug.plugin import DatasetSpec, is_toy, load_split

    if is_toy(data):
        rows = load_split(DatasetSpec(path=data, split=split))
        return [r for r in rows[text_field] if r]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {data}")
    if path.suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if text_field not in row:
                    raise KeyError(f"{data}:{n}: no field {text_field!r}")
                out.append(row[text_field])
        return out
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ CLI


def configure_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="toy://kjv-text, a .txt (one document per line) or .jsonl file")
    parser.add_argument("--text-field", default="text", help="field of .jsonl rows holding the text")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--base", default="toy://tokenizer/kjv-bpe",
                        help="tokenizer to compare against and to take special tokens / chat template from")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of documents kept for the report")
    parser.add_argument("--max-token-length", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for the tokenizer and compression.json")


def run_command(args: argparse.Namespace) -> int:
    from hf_tokplug.plugin import TokPlugError, load_tokenizer, write_json_atomic

    try:
        texts = read_texts(args.data, args.text_field)
    except (OSError, KeyError, ValueError) as exc:
        raise TokPlugError(str(exc), where="--data", fix="give toy://kjv-text, a .txt or a .jsonl file") from None
    if len(texts) < 2:
        raise TokPlugError(f"{args.data} has {len(texts)} documents; need at least 2", where="--data")
    if not 0 < args.held_out < 1:
        raise TokPlugError("--held-out must be between 0 and 1", where="--held-out")
    base = load_tokenizer(args.base)
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    cut = max(1, int(len(texts) * args.held_out))
    held = [texts[i] for i in order[:cut]]
    train = [texts[i] for i in order[cut:]]
    specials = [str(t) for t in base.all_special_tokens]
    tok = train_supertokens(train, args.vocab_size, specials, args.max_token_length, args.seed)
    fast = to_transformers(tok, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    report = {"vocab_size": len(fast), "held_out_documents": len(held),
              "supertokens": compression(fast, held), "base": compression(base, held), "base_name": args.base}
    report["bytes_per_token_gain"] = report["supertokens"]["bytes_per_token"] / report["base"]["bytes_per_token"]
    write_json_atomic(out / "compression.json", report)
    print(json.dumps(report, indent=2))
    print(f"tokenizer -> {out} (use it as plugins.tokenadapt.tokenizer)")
    return 0
