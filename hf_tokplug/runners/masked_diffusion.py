"""Masked-diffusion LMs (LLaDA-style): the SFT task ``masked_diffusion_sft``. Its sampler (low-confidence
remasking) is :func:`hf_tokplug.inference.diffusion_generate`.

Training (per sequence): t ~ U(0, 1), p_mask = (1 - eps) t + eps; every answer token (the padding included) is
replaced by the mask token with probability p_mask; prompt tokens never are. Loss = sum over masked positions of
CE / p_mask, divided by the sequence's answer length (pads included), averaged over the batch. Padding is visible
to attention and is in the loss, as in LLaDA's SFT; no attention mask is passed (bidirectional models can change
real positions' logits when given a padded mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RecipeError
from ..lifecycle import Run
from ..tokens import add_tokens
from ..traits import TaskTraits
from .causal_lm import CausalLMSFT

MASK_TOKEN = "<|mdm_mask|>"


class MaskedDiffusionOptions(BaseModel):
    """``task_options`` of ``masked_diffusion_sft``.

    Args:
        pad_to_length: pad every training sequence to this many tokens (LLaDA pads to a fixed length; train with at
            least prompt + the longest generation window you will sample with). ``None``: the batch's longest.
        mask_eps: the floor of p_mask (1e-3 in LLaDA).
        mask_token: the mask token added when the tokenizer has none.
    """

    model_config = ConfigDict(extra="forbid")
    pad_to_length: int | None = Field(None, ge=1, description="Pad training sequences to this length.")
    mask_eps: float = Field(1e-3, gt=0.0, lt=1.0, description="Minimum masking probability.")
    mask_token: str = Field(MASK_TOKEN, description="Mask token added when the tokenizer has none.")


@dataclass
class MaskedDiffusionCollator:
    """Right-pads with ``pad_token_id`` (EOS in LLaDA); padding is part of the answer (labels, loss).

    Returns ``input_ids``, ``labels`` (-100 on the prompt) and ``pad_mask`` (True where padding was added), which
    plugins use to change the padding (rainbow padding) and the trainer removes before the forward.

    Unsupervised tokens *after* the last supervised one are dropped: a chat template's ``\n`` after
    ``<|im_end|>`` sits outside the assistant markers (label -100), so it was never masked and every training
    sequence showed a visible end-of-answer marker that the sampler's all-masked window never has. The padding now
    follows the answer's last token directly, as in sampling.
    """

    pad_token_id: int
    pad_to_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [_supervised_length(e["labels"]) for e in examples]
        length = max(max(kept), self.pad_to_length or 0)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, self.pad_token_id)
        pad_mask = torch.ones_like(ids, dtype=torch.bool)
        for row, (example, n) in enumerate(zip(examples, kept)):
            ids[row, :n] = torch.tensor(example["input_ids"][:n])
            labels[row, :n] = torch.tensor(example["labels"][:n])
            pad_mask[row, :n] = False
        return {"input_ids": ids, "labels": labels, "pad_mask": pad_mask}


def _supervised_length(labels: list[int]) -> int:
    """Length up to and including the last supervised token (all of it when nothing is supervised)."""
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] != -100:
            return i + 1
    return len(labels)


def llada_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int, eps: float,
               token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """LLaDA's SFT objective for one batch; returns (loss, model output). ``token_weights`` ``(B, T)`` multiply
    each masked position's term (``tokplug_token_weights``; the normaliser is unchanged)."""
    answer = labels != -100  # (B, T): answer tokens and padding
    b = input_ids.shape[0]
    t = torch.rand(b, device=input_ids.device)
    p_mask = ((1 - eps) * t + eps)[:, None].expand_as(input_ids)  # (B, T)
    masked = (torch.rand(input_ids.shape, device=input_ids.device) < p_mask) & answer
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    output = model(input_ids=noisy)
    logits = output.logits  # (B, T, V): position i predicts token i (no shift)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none") / p_mask[masked]
    if token_weights is not None:
        ce = ce * token_weights[masked].to(ce.dtype)
    per_seq = torch.zeros(b, device=ce.device).index_add(0, masked.nonzero()[:, 0], ce)
    loss = (per_seq / answer.sum(1).clamp(min=1)).mean()
    return loss, output


class MaskedDiffusionTrainerBase:
    """Trainer mixin computing the LLaDA loss; set ``mdm_mask_id`` and ``mdm_eps``."""

    mdm_mask_id: int
    mdm_eps: float = 1e-3
    tokplug_applies_token_weights = True  # the host sets tokplug_token_weights during compute_loss
    tokplug_token_weights: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        loss, output = llada_loss(model, inputs["input_ids"], inputs["labels"], self.mdm_mask_id, self.mdm_eps,
                                  self.tokplug_token_weights)
        return (loss, output) if return_outputs else loss


@cache
def _trainer_class() -> type:
    from transformers import Trainer

    return type("MaskedDiffusionTrainer", (MaskedDiffusionTrainerBase, Trainer), {"__module__": __name__})


def bidirectional(model: Any) -> Any:
    """A decoder made bidirectional by ``use_bidirectional_attention`` gets ``config.is_causal = False`` too:
    transformers builds a causal mask unless ``is_causal`` is False, which sdpa without a mask happened to skip
    but eager attention (and any padded batch) applied, so the model silently attended causally there."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_bidirectional_attention", False):
        config.is_causal = False
    return model


class MaskedDiffusionSFT(CausalLMSFT):
    task = "masked_diffusion_sft"
    description = "LLaDA-style SFT of a masked-diffusion LM (bidirectional model with per-position logits)."
    model_mapping = None
    options_class = MaskedDiffusionOptions
    # position i's logits predict token i (label_shift 0); padding is marked for plugins that change it (pad_mask)
    traits = TaskTraits(model_kind="masked_lm", label_shift=0, batch_fields=("input_ids", "labels", "pad_mask"),
                        generates="text", token_weights=True)

    def training_args_class(self) -> type:
        from transformers import TrainingArguments

        return TrainingArguments

    def check_model(self, offline: bool) -> None:
        config = self.model_config(offline)
        if config is None:
            return
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        bidirectional = getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False
        if not (bidirectional or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or self.recipe.model.trust_remote_code):
            raise RecipeError(
                f"task masked_diffusion_sft needs a bidirectional model with per-position logits; "
                f"{self.recipe.model.name_or_path!r} ({config.model_type}) attends causally",
                where=f"{self.source}: model.name_or_path",
                fix="use toy://gemma-bidir, a config with use_bidirectional_attention: true (model.kwargs), "
                "a masked-LM architecture, or LLaDA/Dream with model.trust_remote_code: true",
            )

    @staticmethod
    def auto_class_for(config: Any) -> str:
        """A masked-LM architecture (BERT, RoBERTa, ModernBERT) loads as one even when transformers also maps its type
        to a causal LM (RoBERTa): the task trains it bidirectionally. Decoders made bidirectional
        (``use_bidirectional_attention``) load as causal-LM classes; LLaDA/Dream remote code as ``AutoModel``."""
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        if getattr(config, "auto_map", None) and "AutoModel" in config.auto_map and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "AutoModel"  # LLaDA/Dream remote code
        if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "use_bidirectional_attention", False):
            return "AutoModelForMaskedLM"
        return "AutoModelForCausalLM" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "AutoModelForMaskedLM"

    def load_model(self, ctx: Run) -> Any:
        self.auto_class = self.auto_class_for(self.model_config(offline=False))
        return bidirectional(super().load_model(ctx))

    def configure_tokenizer(self, ctx: Run, tokenizer: Any) -> None:
        if tokenizer.mask_token is None:  # recorded like a plugin's token, so LoRA trains its row
            add_tokens(ctx, tokenizer, [self.options.mask_token], plugin=self.task, init="mean")
            tokenizer.mask_token = self.options.mask_token
        super().configure_tokenizer(ctx, tokenizer)

    def base_collator(self, ctx: Run) -> Any:
        return MaskedDiffusionCollator(pad_token_id=ctx.tokenizer.eos_token_id, pad_to_length=self.options.pad_to_length)

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        args = self.trainer_arguments(ctx, remove_unused_columns=False)
        trainer = _trainer_class()(model=ctx.model, args=args, data_collator=collator, train_dataset=train,
                                         eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=callbacks)
        trainer.mdm_mask_id = ctx.tokenizer.mask_token_id
        trainer.mdm_eps = self.options.mask_eps
        trainer.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer divides by GA steps
        return trainer

    @classmethod
    def pretrained_auto_class(cls, location: str) -> str:
        from transformers import AutoConfig

        return cls.auto_class_for(AutoConfig.from_pretrained(location))
