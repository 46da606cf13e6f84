"""``sequence_classification``: fine-tune an encoder (or any model with a sequence-classification head) on labelled
text with transformers' Trainer; LoRA or full. Accuracy on ``data.eval``.

Data: a text column (``data.text_field``, default ``text``), an optional second text (``task_options.text_pair_field``,
e.g. the hypothesis of an NLI pair) and a label column (``task_options.label_field``): integers or strings. The
label set comes from the training split (sorted), is stored in the model config (``id2label``) and in the manifest,
so an adapter folder restores onto a base with the right head.

    tokplug run recipes/dyntok_encoder.yaml
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import RecipeError
from ..lifecycle import Run
from ..modeling import peft_base
from ..traits import TaskTraits
from ..task import Runner


class ClassificationOptions(BaseModel):
    """``task_options`` of sequence_classification.

    Args:
        label_field: column with the class of each example (int or string).
        text_pair_field: column with a second text encoded as a pair with the first (``None``: single texts).
    """

    model_config = ConfigDict(extra="forbid")
    label_field: str = "label"
    text_pair_field: str | None = None


class SequenceClassification(Runner):
    task = "sequence_classification"
    description = "Sequence classification (AutoModelForSequenceClassification) on Trainer: text (+ pair) -> label; LoRA or full."
    auto_class = "AutoModelForSequenceClassification"
    model_mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    options_class = ClassificationOptions
    traits = TaskTraits(model_kind="encoder", label_shift=None, batch_fields=("input_ids", "attention_mask", "labels"))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.labels: list[Any] = []

    def lora_config(self) -> Any:
        config = super().lora_config()
        config.task_type = "SEQ_CLS"  # PEFT then keeps the new classification head trainable and saved
        return config

    def load_model(self, ctx: Run) -> Any:
        from transformers import set_seed

        set_seed(self.recipe.seed)  # the new head's initialisation: same recipe, same head
        return super().load_model(ctx)

    def model_kwargs(self) -> dict[str, Any]:
        return label_kwargs(self.labels)

    def configure_tokenizer(self, ctx: Run, tokenizer: Any) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    def configure_model(self, ctx: Run) -> None:
        config = ctx.model.config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = ctx.tokenizer.pad_token_id

    def read_data(self, ctx: Run) -> dict[str, Any]:
        raw = super().read_data(ctx)
        opts = self.options
        for split, ds in raw.items():
            for column in (self.recipe.data.text_field, opts.label_field, opts.text_pair_field):
                if column is not None and column not in ds.column_names:
                    raise RecipeError(
                        f"the {split} data has no column {column!r} (columns: {ds.column_names})",
                        where=f"{self.source}: data.text_field / task_options",
                        fix="name the text column with data.text_field and the label column with task_options.label_field",
                    )
        self.labels = sorted(set(raw["train"][opts.label_field]))
        evald = raw.get("eval")
        unknown = sorted(set(evald[opts.label_field]) - set(self.labels), key=str) if evald is not None else []
        if unknown:
            raise RecipeError(f"eval labels {unknown[:5]} do not occur in the training data",
                              where=f"{self.source}: data.eval", fix="evaluate on the labels the model is trained on")
        return raw

    def tokenize(self, ctx: Run, dataset: Any) -> Any:
        opts, data = self.options, self.recipe.data
        index = {label: i for i, label in enumerate(self.labels)}

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            pair = batch[opts.text_pair_field] if opts.text_pair_field else None
            out = ctx.tokenizer(batch[data.text_field], pair, truncation=data.max_length is not None,
                                max_length=data.max_length)
            out["labels"] = [index[x] for x in batch[opts.label_field]]
            return out

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing",
                           load_from_cache_file=False, keep_in_memory=True)

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        return {split: self.tokenize(ctx, ds) for split, ds in raw.items()}

    def base_collator(self, ctx: Run) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(ctx.tokenizer)

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        import numpy as np
        from transformers import Trainer

        def accuracy(pred: Any) -> dict[str, float]:
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            return {"accuracy": float((np.argmax(logits, -1) == pred.label_ids).mean())}

        return Trainer(model=ctx.model, args=self.trainer_arguments(ctx), data_collator=collator, train_dataset=train,
                       eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=callbacks, compute_metrics=accuracy)

    @classmethod
    def manifest_extras(cls, ctx: Run) -> dict[str, Any]:
        model = peft_base(ctx.model)
        return {"id2label": {str(k): v for k, v in model.config.id2label.items()}}

    @classmethod
    def pretrained_model_kwargs(cls, manifest: dict[str, Any]) -> dict[str, Any]:
        id2label = manifest["task_state"]["id2label"]
        return label_kwargs([id2label[k] for k in sorted(id2label, key=int)])


def label_kwargs(labels: list[Any]) -> dict[str, Any]:
    names = [str(x) for x in labels]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
