"""Causal-LM tasks: ``causal_lm_sft`` (TRL SFTTrainer) and ``causal_lm_prepare`` (no training)."""

from __future__ import annotations

from typing import Any

import torch

from ..context import RunContext
from ..data import load_data, tokenize_dataset
from ..training import trainer_class
from .base import Runner, jsonable


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class CausalLMSFT(Runner):
    task = "causal_lm_sft"
    description = "SFT of a causal LM on TRL's SFTTrainer: chat, prompt/completion or text data; LoRA or full."

    def training_args_class(self) -> type:
        from trl import SFTConfig

        return SFTConfig

    def sft_config(self, ctx: RunContext) -> Any:
        train = self.recipe.train
        forced: dict[str, Any] = {
            # The host tokenizes (so plugins and `tokplug preview` see the real examples) and keeps raw columns
            # for plugin collators; TRL's own preparation is skipped.
            "dataset_kwargs": {**(train.get("dataset_kwargs") or {}), "skip_prepare_dataset": True},
            "remove_unused_columns": False,
        }
        if "bf16" not in train and "fp16" not in train:
            forced["bf16"] = _bf16_supported()  # TRL defaults to bf16, which CPUs and older GPUs cannot run
        return self.trainer_arguments(ctx, **forced)

    def build_objects(self, ctx: RunContext) -> None:
        super().build_objects(ctx)
        tokenizer = ctx.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = ctx.model.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id

    def datasets(self, ctx: RunContext) -> tuple[Any, Any]:
        data = self.recipe.data
        if data is None:
            return None, None
        train, evald = load_data(data, self.recipe.seed)
        if train is not None:
            train = ctx.prepare_dataset(tokenize_dataset(train, ctx.tokenizer, data), "train")
        if evald is not None:
            evald = ctx.prepare_dataset(tokenize_dataset(evald, ctx.tokenizer, data), "eval")
        return train, evald

    def base_collator(self, ctx: RunContext) -> Any:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=ctx.tokenizer.pad_token_id)

    def make_trainer(self, ctx: RunContext, train: Any, evald: Any) -> Any:
        from trl import SFTTrainer

        collator = ctx.wrap_collator(self.base_collator(ctx))
        trainer = trainer_class(SFTTrainer)(
            model=ctx.model, args=self.sft_config(ctx), data_collator=collator, train_dataset=train,
            eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=ctx.callbacks(),
        )
        trainer.tokplug_ctx = ctx
        ctx.set_trainer(trainer)
        return trainer

    def execute(self, ctx: RunContext) -> dict[str, Any]:
        self.build_objects(ctx)
        train, evald = self.datasets(ctx)
        trainer = self.make_trainer(ctx, train, evald)
        return self.train_and_evaluate(ctx, trainer, evald)


class CausalLMPrepare(CausalLMSFT):
    task = "causal_lm_prepare"
    description = "No training: apply plugins to a causal LM, evaluate (eval loss on data.eval, plugin metrics), save."
    needs_data = False

    def execute(self, ctx: RunContext) -> dict[str, Any]:
        self.build_objects(ctx)
        metrics: dict[str, Any] = {}
        if self.recipe.data is not None and (self.recipe.data.eval is not None or self.recipe.data.train is not None):
            train, evald = self.datasets(ctx)
            evald = evald if evald is not None else train
            trainer = self.make_trainer(ctx, evald, evald)
            metrics.update(trainer.evaluate())
        metrics.update(ctx.call("tokplug_evaluate"))
        return jsonable(metrics)

