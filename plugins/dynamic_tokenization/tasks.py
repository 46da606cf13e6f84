"""Tasks of the dynamic-tokenization plugin.

``dyntok_hypernet``: train a hypernetwork for a frozen model on text (``objective: distill`` for encoders, ``lm``
for decoders; ``auto`` picks by the model's LM head), compare it with FVT on held-out text, save
``hypernet.safetensors`` + ``hypernet.json`` (the plugin's ``hypernet_path``).

``dyntok_generate``: expand a decoder's vocabulary by continued BPE over ``data.train`` (``new_tokens`` merges),
give the new tokens rows (FVT, or the hypernetwork of ``hypernet_path``), and generate greedily from ``prompts``
through a faiss ANN index over the output rows with a KV cache; writes ``samples.jsonl`` and
``expanded_vocab.json``.

    tokplug run recipes/dyntok_hypernet.yaml
    tokplug run recipes/dyntok_generate.yaml
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from hf_tokplug.plugin import (LOG_FILE, RecipeError, Runner, RunContext, TaskTraits, load_data, resolve_location,
                               write_json_atomic, write_text_atomic)

from .embeddings import load_hypernet, save_hypernet


class HypernetOptions(BaseModel):
    """``task_options`` of dyntok_hypernet (the paper's hypernetwork training, model frozen).

    Args:
        objective: ``distill`` (encoders: sentence embedding under dynamic tokens vs original), ``lm`` (decoders:
            next-token loss with predicted input and output rows), ``auto`` (``lm`` when the model has an LM head).
        steps, batch_size, learning_rate: the optimisation (AdamW, one-cycle schedule).
        warmup_steps: identity-only steps first (single base tokens regress their own rows).
        max_merges: each batch is re-tokenised with a merge count drawn from ``[1, max_merges]``.
        lexical_weight: weight of the lexical MSE for single-piece tokens (0.5 in the paper).
        width, layers, heads: the hypernetwork (transformer encoder over the pieces).
        eval_texts: texts for the comparison: the first of ``data.eval``, or held out from ``data.train``.
        eval_merges: merge levels at which FVT and the hypernetwork are compared after training.
    """

    model_config = ConfigDict(extra="forbid")
    objective: Literal["auto", "distill", "lm"] = "auto"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    max_merges: int = Field(200, ge=1)
    lexical_weight: float = Field(0.5, ge=0)
    width: int = Field(256, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mode: str = "pretokens"
    max_length: int = Field(128, ge=8)
    eval_texts: int = Field(64, ge=1)
    eval_merges: list[int] = Field(default_factory=lambda: [5, 20, 50])


class GenerateOptions(BaseModel):
    """``task_options`` of dyntok_generate.

    Args:
        prompts: texts to continue.
        new_tokens: tokens added by continued BPE over ``data.train``.
        max_new_tokens, candidates: greedy steps; ANN candidates rescored exactly per step.
        prompt_merges: dynamic merges of each prompt before prefill (0: base tokens).
        hypernet_path: a ``dyntok_hypernet`` output trained with the ``lm`` objective (its heads give the new
            tokens' input and output rows); ``None``: FVT rows.
        max_texts: corpus texts used for the continued BPE.
        use_cache: KV cache (``false`` re-runs the whole sequence every step, the reference's loop).
    """

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(default_factory=lambda: ["In the beginning God created", "And the LORD said unto Moses,"])
    new_tokens: int = Field(1000, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    candidates: int = Field(64, ge=1)
    prompt_merges: int = Field(0, ge=0)
    hypernet_path: str | None = None
    mode: str = "pretokens"
    max_texts: int = Field(2000, ge=1)
    use_cache: bool = True


class _FolderArtifact:
    """What the run saves instead of the (unchanged) base model: a few files of its own."""

    library_name = "hf_tokplug"

    def __init__(self, write: Any):
        self.write = write

    def save_pretrained(self, folder: Any) -> None:
        self.write(Path(folder))


class _FrozenModelTask(Runner):
    """Shared parts: the model loads with AutoModelForCausalLM when it is a causal LM, AutoModel otherwise;
    no adapter, no Trainer (the ``train`` block is unused); the texts are read before anything loads."""

    model_mapping = None
    needs_data = True
    # model_kind follows the recipe's model (resolve_traits); texts are read directly, not through the data hooks
    traits = TaskTraits(model_kind="encoder", label_shift=None, batch_fields=(), trains=False, trainer=False,
                        dataset_hooks=False, adapter="none")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.train_texts: list[str] = []
        self.held_texts: list[str] = []

    def check(self, offline: bool) -> None:
        if self.recipe.adapter is not None:
            raise RecipeError(f"task {self.task!r} keeps the model frozen; an adapter would not be trained",
                              where=f"{self.source}: adapter", fix="remove the adapter block (~adapter)")
        super().check(offline)
        from .merge import MODES

        if self.options.mode not in MODES:
            raise RecipeError(f"unknown mode {self.options.mode!r}", where=f"{self.source}: task_options.mode",
                              fix=f"use one of {', '.join(MODES)}")

    def resolve_traits(self) -> TaskTraits:
        return self.traits.with_(model_kind="causal_lm" if self.is_causal() else "encoder")

    def read_data(self, ctx: RunContext) -> dict[str, Any]:
        self.train_texts, self.held_texts = self.texts()
        return {}

    def is_causal(self) -> bool:
        """A decoder: its saved architecture is a causal LM, or (no architecture recorded) its type has a causal-LM
        class and no masked-LM one (BERT has both: an encoder)."""
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        config = self.model_config(offline=False)
        if config is None:
            return False
        if getattr(config, "architectures", None):
            return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
        return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def load_model(self, ctx: RunContext) -> Any:
        self.auto_class = "AutoModelForCausalLM" if self.is_causal() else "AutoModel"
        return super().load_model(ctx)

    def texts(self) -> tuple[list[str], list[str]]:
        data = self.recipe.data
        train, evald = load_data(data, self.recipe.seed)
        for split, ds in (("train", train), ("eval", evald)):
            if ds is not None and data.text_field not in ds.column_names:
                raise RecipeError(f"the {split} data has no column {data.text_field!r} (columns: {ds.column_names})",
                                  where=f"{self.source}: data.text_field", fix="name the text column with data.text_field")
        texts = [t for t in train[data.text_field] if t and t.strip()]
        held = [t for t in evald[data.text_field] if t and t.strip()] if evald is not None else []
        return texts, held


class DyntokHypernet(_FrozenModelTask):
    task = "dyntok_hypernet"
    description = "Train a dynamic-tokenization hypernetwork for a frozen encoder or decoder; saves hypernet.safetensors."
    options_class = HypernetOptions

    traits = _FrozenModelTask.traits.with_(trains=True)

    def read_data(self, ctx: RunContext) -> dict[str, Any]:
        super().read_data(ctx)
        o = self.options
        texts, held = self.train_texts, self.held_texts
        if not held:
            texts, held = texts[: -o.eval_texts], texts[-o.eval_texts:]
        self.train_texts, self.held_texts = texts, held[: o.eval_texts]
        if len(texts) < o.batch_size:
            raise RecipeError(f"{len(texts)} training texts for batch_size {o.batch_size}",
                              where=f"{self.source}: data.train", fix="use more text or a smaller task_options.batch_size")
        return {}

    def train(self, ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
        from .hypertrain import default_objective, train_hypernetwork

        o = self.options
        model, tokenizer = ctx.model, ctx.tokenizer
        objective = default_objective(model) if o.objective == "auto" else o.objective
        if objective == "lm" and model.get_output_embeddings() is None:
            raise RecipeError("objective lm needs a model with an LM head", where=f"{self.source}: task_options.objective",
                              fix="use objective distill (or auto) for encoders")
        log_path = Path(self.recipe.output_dir) / LOG_FILE
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", encoding="utf-8") as log:
            self.net, _ = train_hypernetwork(
                model, tokenizer, self.train_texts, objective=objective, steps=o.steps, batch_size=o.batch_size,
                max_merges=o.max_merges, warmup_steps=min(o.warmup_steps, o.steps - 1), lr=o.learning_rate,
                lexical_weight=o.lexical_weight, mode=o.mode, width=o.width, layers=o.layers, heads=o.heads,
                seed=self.recipe.seed, max_length=o.max_length,
                on_step=lambda row: log.write(json.dumps(row) + "\n"),
            )
        self.objective = objective
        return {}

    def finish(self, ctx: RunContext, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        o, net, objective = self.options, self.net, self.objective
        metrics = {"objective": objective, **compare(ctx.model, ctx.tokenizer, net, self.held_texts, o.eval_merges,
                                                      objective, o.mode, o.max_length)}
        meta = {"base_model": self.recipe.model.name_or_path, "objective": objective, "mode": o.mode}
        ctx.model = _FolderArtifact(lambda folder: save_hypernet(net, folder, **meta))
        return metrics

    @classmethod
    def load_pretrained(cls, ctx: RunContext, folder: Path, manifest: dict[str, Any]) -> None:
        """The base model and tokenizer; the hypernetwork lands in ``ctx.state["dyntok_hypernet"]["hypernet"]``."""
        import transformers

        location = resolve_location(manifest["base_model"])
        info = json.loads((folder / "hypernet.json").read_text(encoding="utf-8"))
        auto = "AutoModelForCausalLM" if info["objective"] == "lm" else "AutoModel"
        ctx.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        ctx.model = getattr(transformers, auto).from_pretrained(location)
        ctx.state[cls.task]["hypernet"] = load_hypernet(folder, ctx.model)


@torch.no_grad()
def compare(model: Any, tokenizer: Any, net: Any, texts: list[str], levels: list[int], objective: str, mode: str,
            max_length: int) -> dict[str, float]:
    """FVT vs hypernetwork on held-out texts: fidelity (cosine to the original sentence embedding, encoders) or LM
    loss (nats per token of the merged sequence, decoders; the original's loss at 0 merges beside them)."""
    from .encoder import DynamicEncoder
    from .hypertrain import lm_loss
    from .merge import encode_batch, merge_batch, reduction

    encoders = {"fvt": DynamicEncoder(model, tokenizer, "fvt", mode=mode),
                "hypernet": DynamicEncoder(model, tokenizer, "hypernet", net, mode)}
    out: dict[str, float] = {}
    if objective == "lm":
        head = model.get_output_embeddings().weight
        base = encode_batch(tokenizer, texts, mode, max_length=max_length)
        out["lm_loss_original"] = float(lm_loss(model, encoders["fvt"], base, head))
        for m in levels:
            batch = merge_batch(encode_batch(tokenizer, texts, mode, max_length=max_length), max_merges=m)
            out[f"length_reduction@{m}"] = reduction(batch)["length_reduction"]
            for name, enc in encoders.items():
                out[f"lm_loss_{name}@{m}"] = float(lm_loss(model, enc, batch, head))
        return out
    target, _ = encoders["fvt"].embed(texts, 0, max_length)
    for m in levels:
        for name, enc in encoders.items():
            pred, batch = enc.embed(texts, m, max_length)
            out[f"fidelity_{name}@{m}"] = float((pred * target).sum(-1).mean())
        out[f"length_reduction@{m}"] = reduction(batch)["length_reduction"]
    return out


class DyntokGenerate(_FrozenModelTask):
    task = "dyntok_generate"
    description = "Generate over a vocabulary expanded by continued BPE: ANN (faiss) candidates, exact rescoring, KV cache."
    options_class = GenerateOptions

    def check(self, offline: bool) -> None:
        super().check(offline)
        if not self.is_causal():
            raise RecipeError(f"task {self.task!r} needs a causal LM", where=f"{self.source}: model.name_or_path",
                              fix="use a decoder (e.g. toy://llama)")

    def finish(self, ctx: RunContext, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        from .decoder import OutputIndex, ann_generate, expand_vocabulary
        from .plugin import resolve_hypernet

        o = self.options
        texts = self.train_texts
        model, tokenizer = ctx.model.eval(), ctx.tokenizer
        hypernet = None
        if o.hypernet_path:
            hypernet = load_hypernet(resolve_hypernet(o.hypernet_path, f"{self.source}: task_options.hypernet_path"), model)
        start = time.perf_counter()
        vocab = expand_vocabulary(model, tokenizer, texts[: o.max_texts], o.new_tokens, o.mode, hypernet)
        index = OutputIndex(vocab.output_rows)
        built = time.perf_counter() - start
        samples, tokens, chars, base_tokens, seconds = [], 0, 0, 0, 0.0
        for prompt in o.prompts:
            t0 = time.perf_counter()
            ids, text = ann_generate(model, tokenizer, prompt, vocab, index, max_new_tokens=o.max_new_tokens,
                                     use_cache=o.use_cache, candidates=o.candidates, prompt_merges=o.prompt_merges)
            seconds += time.perf_counter() - t0
            tokens, chars = tokens + len(ids), chars + len(text)
            base_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            samples.append({"prompt": prompt, "completion": text, "tokens": len(ids),
                            "new_vocab_tokens": sum(i >= vocab.base_vocab for i in ids)})
        metrics = {
            "vocab_size": vocab.base_vocab + len(vocab.pieces), "new_tokens": len(vocab.pieces),
            "index_build_seconds": built, "tokens_per_second": tokens / max(seconds, 1e-9),
            "chars_per_token": chars / max(tokens, 1), "base_chars_per_token": chars / max(base_tokens, 1),
            "new_token_share": sum(s["new_vocab_tokens"] for s in samples) / max(tokens, 1),
        }

        def write(folder: Path) -> None:
            write_text_atomic(folder / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
            pieces = {tokenizer.decode(p): p for p in vocab.pieces}
            write_json_atomic(folder / "expanded_vocab.json", {"base_vocab": vocab.base_vocab, "tokens": pieces})

        ctx.model = _FolderArtifact(write)
        return metrics
