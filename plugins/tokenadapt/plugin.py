"""The ``tokenadapt`` plugin: swap the tokenizer (``tokplug_load_tokenizer``), transplant the embeddings
(``tokplug_adapt_embeddings``), score bits per byte before and after, and register its row-init strategies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from hf_tokplug.plugin import (Plugin, PluginError, TokPlugError, check_toy_location, hookimpl, is_tied,
                               load_tokenizer, write_json_atomic)

from .config import TokenAdaptConfig
from .transplant import (
    ROLES, TransplantReport, check_decodable, composed_rows, estimator_for, prepare_new_tokenizer, token_surfaces,
    transplant,
)

REPORT_FILE = "tokenadapt.json"


class TokenAdaptPlugin(Plugin):
    config_class = TokenAdaptConfig
    citation = """@article{tokenadapt2025,
  title={Achieving Tokenizer Flexibility in Language Models through Heuristic Adaptation and Supertoken Learning},
  year={2025}
}"""
    test_configs = {
        "noop": {"tokenizer": None, "eval": {"data": None}},
        "active": {"tokenizer": "toy://tokenizer/kjv-bpe-3k", "eval": {"data": None}},
    }

    def __init__(self, name: str, config: TokenAdaptConfig | None = None):
        super().__init__(name, config)
        self.report: TransplantReport | None = None
        self.scores: dict[str, float] = {}
        self.texts: list[str] = []  # the held-out texts, loaded once

    # ------------------------------------------------------------------------------------------------ setup

    @staticmethod
    @hookimpl
    def tokplug_register_token_inits(register):
        for strategy in ("hybrid", "local", "global", "fvt"):
            register(strategy, _strategy(strategy))

    @staticmethod
    @hookimpl
    def tokplug_register_commands(register):
        from .supertokens import configure_command, run_command

        register("supertokens", "train a supertoken tokenizer and report its compression", configure_command,
                 run_command)

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:  # the transplant and its bits-per-byte score are a causal LM's
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm")
        c = self.config
        if c.tokenizer is None:
            return
        try:
            check_toy_location(c.tokenizer)
        except TokPlugError as exc:
            raise PluginError(exc.message, where=f"{self.where}.tokenizer", fix=exc.fix) from None
        if c.tokenizer.startswith((".", "/", "~")) and not Path(c.tokenizer).expanduser().exists():
            raise PluginError(f"tokenizer folder not found: {c.tokenizer}", where=f"{self.where}.tokenizer",
                              fix="give a folder with tokenizer.json, a Hub id, or toy://tokenizer/<name>")
        aux = c.embedder.name_or_path
        needs_aux = {c.input_init, c.output_init} & {"hybrid", "local", "global"}
        if needs_aux and aux.startswith((".", "/", "~")) and not Path(aux).expanduser().exists():
            raise PluginError(f"auxiliary embedder folder not found: {aux}", where=f"{self.where}.embedder.name_or_path",
                              fix="give a Hub id or a local AutoModel folder")
        for role in c.special_tokens:
            if role not in ROLES:
                raise PluginError(f"unknown special-token role {role!r}", where=f"{self.where}.special_tokens.{role}",
                                  fix=f"use one of: {', '.join(ROLES)}")

    # ------------------------------------------------------------------------------------------------ tokenizer

    @hookimpl
    def tokplug_load_tokenizer(self, ctx):
        if self.config.tokenizer is None:
            return None
        try:
            new = load_tokenizer(self.config.tokenizer)
        except Exception as exc:
            raise PluginError(f"cannot load the new tokenizer {self.config.tokenizer!r}: {exc}",
                              where=f"{self.where}.tokenizer",
                              fix="give a folder with tokenizer.json, a Hub id, or toy://tokenizer/<name>") from None
        new = prepare_new_tokenizer(ctx.base_tokenizer, new, self.config, self.where)
        check_decodable(new, self.where)
        return new

    # ------------------------------------------------------------------------------------------------ model

    def swapped(self, ctx) -> bool:
        return self.config.tokenizer is not None and ctx.tokenizer is not ctx.base_tokenizer

    @hookimpl
    def tokplug_adapt_embeddings(self, ctx, model):
        if not self.swapped(ctx):
            return None
        texts = self.texts = self.eval_texts()
        if texts:
            self.scores["bpb_original"] = self.bpb(model, ctx.base_tokenizer, texts)
        self.report = transplant(model, ctx.base_tokenizer, ctx.tokenizer, self.config)
        if texts:
            self.scores["bpb_transplanted"] = self.bpb(model, ctx.tokenizer, texts)
            self.scores["bpb_ratio"] = self.scores["bpb_transplanted"] / self.scores["bpb_original"]
        return model

    @hookimpl
    def tokplug_adapter_config(self, ctx, peft_config):
        """Every row changed: with LoRA, the embedding (and an untied head) train and save in full."""
        if not self.swapped(ctx):
            return None
        model = ctx.model
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        saved = list(peft_config.modules_to_save or [])
        for module in (emb, out):
            if module is not None and names.get(module) and names[module] not in saved:
                saved.append(names[module])
        peft_config.modules_to_save = saved
        if is_tied(model):
            peft_config.ensure_weight_tying = True
        if peft_config.trainable_token_indices:  # the full matrix trains anyway
            peft_config.trainable_token_indices = None
        return peft_config

    # ------------------------------------------------------------------------------------------------ results

    def eval_texts(self) -> list[str]:
        spec = self.config.eval.data
        if spec is None:
            return []
        from hf_tokplug.plugin import load_split

        try:
            dataset = load_split(spec)
        except Exception as exc:
            raise PluginError(f"cannot load the evaluation text: {exc}", where=f"{self.where}.eval.data",
                              fix="give a dataset split with a text column, or eval: {data: null}") from None
        field = self.config.eval.text_field
        if field not in dataset.column_names:
            raise PluginError(f"the evaluation data has no column {field!r} (columns: {dataset.column_names})",
                              where=f"{self.where}.eval.text_field", fix="set eval.text_field")
        n = min(self.config.eval.max_texts, len(dataset))
        return [t for t in dataset.select(range(n))[field] if t]

    def bpb(self, model: Any, tokenizer: Any, texts: list[str]) -> float:
        from hf_tokplug.plugin import bits_per_byte

        e = self.config.eval
        return bits_per_byte(model, tokenizer, texts, max_length=e.max_length, batch_size=e.batch_size)["bpb"]

    @hookimpl
    def tokplug_evaluate(self, ctx):
        if self.report is None:
            return None
        metrics: dict[str, float] = dict(self.scores)
        r = self.report
        metrics.update({"shared_raw": r.shared_raw, "shared_surface": r.shared_surface, "shared_special": r.shared_special,
                        "unique_tokens": r.unique, "fallback_input": r.fallback_input})
        if ctx.trainer is not None and "bpb_original" in self.scores and ctx.traits is not None and ctx.traits.trains:
            final = self.bpb(ctx.model, ctx.tokenizer, self.texts)  # the texts scored before the transplant
            metrics["bpb_final"] = final
            metrics["bpb_final_ratio"] = final / self.scores["bpb_original"]
        self.scores = {k: v for k, v in metrics.items() if k.startswith("bpb")}
        return metrics

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if self.report is None:
            return
        data = {"report": self.report.to_json(), "scores": self.scores}
        write_json_atomic(Path(output_dir, REPORT_FILE), data)
        ctx.add_state_file(self.name, REPORT_FILE)

    @hookimpl
    def tokplug_restore(self, ctx, model_dir):
        path = Path(model_dir, REPORT_FILE)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            self.report = TransplantReport(**{k: v for k, v in data["report"].items() if k != "shared"})
            self.scores = data.get("scores", {})

    @hookimpl
    def tokplug_model_card(self, ctx):
        if self.report is None:
            return None
        r, c = self.report, self.config
        lines = [
            "## TokenAdapt (tokenizer transplantation)\n",
            f"Tokenizer swapped from {r.old_vocab:,} to {r.new_vocab:,} tokens (`{c.tokenizer}`). "
            f"{r.shared:,} shared tokens copied exactly ({r.shared_raw:,} by vocabulary key, {r.shared_surface:,} by "
            f"decoded string, {r.shared_special:,} special by role); {r.unique:,} new tokens initialised with "
            f"`{c.input_init}` input rows" + ("" if r.tied else f" and `{r.output_init}` output rows")
            + f" (w={c.weight}, T={c.temperature}, top-k={c.top_k}, embedder `{c.embedder.name_or_path}`).",
        ]
        if "bpb_original" in self.scores:
            lines += ["", "| bits per byte | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in self.scores.items()]
        return ["\n".join(lines)]


# ------------------------------------------------------------------------------------------------ token inits


def encode_without_added(tokenizer: Any, text: str, limit: int) -> list[int]:
    """Pieces of ``text`` from the tokenizer's model alone (added tokens ignored), ids below ``limit``."""
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    words = backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer is not None else [(normalized, None)]
    return [t.id for word, _ in words for t in backend.model.tokenize(word) if t.id < limit]


def _strategy(kind: str):
    def init(request, **options):
        """TokenAdapt row estimate for tokens another plugin added (options: TokenAdapt's config keys)."""
        try:
            config = TokenAdaptConfig.model_validate(options)
        except ValidationError as exc:
            raise PluginError(f"invalid options for token-init {kind!r}: {exc.errors()[0]['msg']}",
                              fix="use TokenAdapt's option names (weight, temperature, top_k, embedder, ...)") from None
        tokenizer = request.ctx.tokenizer if request.ctx is not None else None
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise PluginError(f"token-init {kind!r} needs the run's fast tokenizer on the context")
        old_n = request.old_vocab_size
        pieces = [encode_without_added(tokenizer, t, old_n) for t in request.tokens]
        old_surf = token_surfaces(tokenizer, list(range(old_n)))
        if kind == "fvt":
            phi_old, phi_new = torch.zeros(old_n, 1), torch.zeros(len(pieces), 1)
        else:
            from .embedder import get_embedder

            embedder = get_embedder(config.embedder)
            phi_old = embedder.embed_cached(old_surf, "old-vocab", progress=False)
            phi_new = embedder.embed(list(request.tokens), progress=False)
        estimator = estimator_for(pieces, list(request.tokens), old_surf, phi_new, phi_old,
                                  set(tokenizer.added_tokens_decoder), config)
        rows, _ = composed_rows(estimator, request.old_rows, kind, config.fallback,
                                torch.Generator().manual_seed(config.seed))
        return rows

    init.__name__ = f"init_{kind}"
    return init
