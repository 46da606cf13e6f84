"""Causal-LM tasks: ``causal_lm_sft`` (TRL SFTTrainer) and ``causal_lm_prepare`` (no training)."""

from __future__ import annotations

from typing import Any

import torch

from ..data import tokenize_dataset
from ..lifecycle import Run
from ..traits import TaskTraits
from ..task import Runner


def precision_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """``bf16`` when the recipe sets no precision: TRL's configs default to bf16, which CPUs and older GPUs cannot
    run."""
    if "bf16" in train or "fp16" in train:
        return {}
    return {"bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}


class CausalLMSFT(Runner):
    task = "causal_lm_sft"
    description = "SFT of a causal LM on TRL's SFTTrainer: chat, prompt/completion or text data; LoRA or full."
    traits = TaskTraits(model_kind="causal_lm", label_shift=1, batch_fields=("input_ids", "attention_mask", "labels"),
                        generates="text", token_weights=True)

    def training_args_class(self) -> type:
        from trl import SFTConfig

        return SFTConfig

    def sft_config(self, ctx: Run) -> Any:
        train = self.recipe.train
        forced: dict[str, Any] = {
            # The host tokenizes (so plugins and `tokplug preview` see the real examples) and keeps raw columns
            # for plugin collators; TRL's own preparation is skipped.
            "dataset_kwargs": {**(train.get("dataset_kwargs") or {}), "skip_prepare_dataset": True},
            "remove_unused_columns": False,
            **precision_defaults(train),
        }
        return self.trainer_arguments(ctx, **forced)

    def configure_tokenizer(self, ctx: Run, tokenizer: Any) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def configure_model(self, ctx: Run) -> None:
        config = ctx.model.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = ctx.tokenizer.pad_token_id

    def read_data(self, ctx: Run) -> dict[str, Any]:
        from ..data import check_text_columns

        raw = super().read_data(ctx)
        for split, ds in raw.items():
            check_text_columns(ds, self.recipe.data, split, self.source)
        return raw

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        return {split: tokenize_dataset(ds, ctx.tokenizer, self.recipe.data) for split, ds in raw.items()}

    def base_collator(self, ctx: Run) -> Any:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=ctx.tokenizer.pad_token_id)

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        from trl import SFTTrainer

        return SFTTrainer(model=ctx.model, args=self.sft_config(ctx), data_collator=collator, train_dataset=train,
                          eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=callbacks)


class CausalLMPrepare(CausalLMSFT):
    task = "causal_lm_prepare"
    description = "No training: apply plugins to a causal LM, evaluate (eval loss on data.eval, plugin metrics), save."
    needs_data = False
    traits = CausalLMSFT.traits.with_(trains=False)

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        evald = evald if evald is not None else train  # evaluation only: the training split will do
        return super().make_trainer(ctx, evald, evald, collator, callbacks)

    def finish(self, ctx: Run, trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
        return trainer.evaluate() if trainer is not None else {}
