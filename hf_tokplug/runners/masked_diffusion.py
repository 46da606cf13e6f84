"""Masked-diffusion LMs (LLaDA-style): SFT task ``masked_diffusion_sft`` and the low-confidence remasking sampler.

Training (per sequence): t ~ U(0, 1), p_mask = (1 - eps) t + eps; every answer token (the padding included) is
replaced by the mask token with probability p_mask; prompt tokens never are. Loss = sum over masked positions of
CE / p_mask, divided by the sequence's answer length (pads included), averaged over the batch. Padding is visible
to attention and is in the loss, as in LLaDA's SFT; no attention mask is passed (bidirectional models can change
real positions' logits when given a padded mask).

Sampling: prompt + gen_length mask tokens, split into blocks of block_length; steps spread evenly over blocks; each
step predicts every masked position, confidence = probability of the argmax (Gumbel noise in float64 when
temperature > 0), only positions of the current block are eligible, the n most confident are committed. The output
is cut at the first stop token (EOS, plus anything plugins add, e.g. rainbow pads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..context import RunContext
from ..errors import RecipeError
from ..tokens import add_tokens
from ..training import trainer_class
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
    """

    pad_token_id: int
    pad_to_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        length = max(longest, self.pad_to_length or 0)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, self.pad_token_id)
        pad_mask = torch.ones_like(ids, dtype=torch.bool)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            pad_mask[row, :n] = False
        return {"input_ids": ids, "labels": labels, "pad_mask": pad_mask}


def llada_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int, eps: float) -> tuple[torch.Tensor, Any]:
    """LLaDA's SFT objective for one batch; returns (loss, model output)."""
    answer = labels != -100  # (B, T): answer tokens and padding
    b = input_ids.shape[0]
    t = torch.rand(b, device=input_ids.device)
    p_mask = ((1 - eps) * t + eps)[:, None].expand_as(input_ids)  # (B, T)
    masked = (torch.rand(input_ids.shape, device=input_ids.device) < p_mask) & answer
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    output = model(input_ids=noisy)
    logits = output.logits  # (B, T, V): position i predicts token i (no shift)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none") / p_mask[masked]
    per_seq = torch.zeros(b, device=ce.device).index_add(0, masked.nonzero()[:, 0], ce)
    loss = (per_seq / answer.sum(1).clamp(min=1)).mean()
    return loss, output


class MaskedDiffusionTrainerBase:
    """Trainer mixin computing the LLaDA loss; set ``mdm_mask_id`` and ``mdm_eps``."""

    mdm_mask_id: int
    mdm_eps: float = 1e-3
    tokplug_label_shift = 0  # position i's logits predict token i (ForwardCapture.shift for plugins)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        loss, output = llada_loss(model, inputs["input_ids"], inputs["labels"], self.mdm_mask_id, self.mdm_eps)
        return (loss, output) if return_outputs else loss


class MaskedDiffusionSFT(CausalLMSFT):
    task = "masked_diffusion_sft"
    description = "LLaDA-style SFT of a masked-diffusion LM (bidirectional model with per-position logits)."
    model_mapping = None
    options_class = MaskedDiffusionOptions

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
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if getattr(config, "auto_map", None) and "AutoModel" in config.auto_map and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "AutoModel"  # LLaDA/Dream remote code
        return "AutoModelForCausalLM" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "AutoModelForMaskedLM"

    def load_model(self, ctx: RunContext) -> Any:
        self.auto_class = self.auto_class_for(self.model_config(offline=False))
        return super().load_model(ctx)

    def add_task_tokens(self, ctx: RunContext, tokenizer: Any) -> None:
        if tokenizer.mask_token is None:  # recorded like a plugin's token, so LoRA trains its row
            add_tokens(ctx, tokenizer, [self.options.mask_token], plugin=self.task, init="mean")
            tokenizer.mask_token = self.options.mask_token

    def base_collator(self, ctx: RunContext) -> Any:
        return MaskedDiffusionCollator(pad_token_id=ctx.tokenizer.eos_token_id, pad_to_length=self.options.pad_to_length)

    def make_trainer(self, ctx: RunContext, train: Any, evald: Any) -> Any:
        from transformers import Trainer

        args = self.trainer_arguments(ctx, remove_unused_columns=False)
        cls = trainer_class(type("MaskedDiffusionTrainer", (MaskedDiffusionTrainerBase, Trainer), {}))
        trainer = cls(model=ctx.model, args=args, data_collator=ctx.wrap_collator(self.base_collator(ctx)),
                      train_dataset=train, eval_dataset=evald, processing_class=ctx.tokenizer, callbacks=ctx.callbacks())
        trainer.mdm_mask_id = ctx.tokenizer.mask_token_id
        trainer.mdm_eps = self.options.mask_eps
        trainer.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer divides by GA steps
        trainer.tokplug_ctx = ctx
        ctx.set_trainer(trainer)
        return trainer

    @classmethod
    def pretrained_auto_class(cls, location: str) -> str:
        from transformers import AutoConfig

        return cls.auto_class_for(AutoConfig.from_pretrained(location))


# ------------------------------------------------------------------------------------------------------ sampling


def _num_transfer(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps): how many positions to commit per step, spread evenly (remainder to the first steps)."""
    total = masked.sum(1, keepdim=True)
    base = total // steps
    out = base.expand(-1, steps).clone()
    rem = total % steps
    out += (torch.arange(steps, device=masked.device)[None] < rem).long()
    return out


@torch.no_grad()
def diffusion_sample(model: Any, prompt_ids: torch.Tensor, *, mask_id: int, gen_length: int = 64,
                     block_length: int | None = None, steps: int | None = None, temperature: float = 0.0,
                     cfg_scale: float = 0.0) -> torch.Tensor:
    """LLaDA low-confidence remasking for prompts of equal length ``(B, P)``; returns ``(B, gen_length)``."""
    block_length = block_length or gen_length
    steps = steps or gen_length
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError("gen_length must be a multiple of block_length, and steps a multiple of the block count")
    b, p = prompt_ids.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :p] = prompt_ids
    blocks = gen_length // block_length
    per_block = steps // blocks
    for block in range(blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        transfer = _num_transfer(x[:, start:end] == mask_id, per_block)
        for step in range(per_block):
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:, :p] = mask_id
                both = model(input_ids=torch.cat([x, uncond])).logits
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(input_ids=x).logits
            # Only the current block is eligible: score it alone (the float64 softmax is the costly part).
            logits = logits[:, start:end]  # (B, L, V)
            logits[..., mask_id] = -float("inf")  # never "predict" the mask token itself
            if temperature > 0:  # Gumbel-max in float64: low precision would make the sampling almost greedy
                logits64 = logits.double()
                gumbel = (-torch.log(torch.rand_like(logits64))) ** temperature
                choice = (logits64.exp() / gumbel).argmax(-1)
            else:
                choice = logits.argmax(-1)
            probs = F.softmax(logits.double(), dim=-1)
            confidence = probs.gather(-1, choice[..., None]).squeeze(-1)  # (B, L)
            masked = x[:, start:end] == mask_id
            confidence = torch.where(masked, confidence, torch.full_like(confidence, -float("inf")))
            # commit each row's k most confident positions: rank positions by confidence, keep rank < k
            order = confidence.argsort(dim=-1, descending=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(end - start, device=x.device).expand_as(order))
            commit = (ranks < transfer[:, step : step + 1]) & masked
            x[:, start:end] = torch.where(commit, choice, x[:, start:end])
    return x[:, p:]


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, tid in enumerate(ids):
        if tid in stop_ids:
            return ids[:i]
    return ids


def _answer_text(ctx: Any, ids: list[int], stop: set[int]) -> str:
    """Cut at the first stop token, decode, and run the ``tokplug_postprocess_text`` chain."""
    text = ctx.tokenizer.decode(cut_at_stop(ids, stop), skip_special_tokens=True)
    return ctx.call("tokplug_postprocess_text", text=text)


def generate(ctx: Any, prompts: str | list[str], *, chat: bool = True, gen_length: int = 64,
             block_length: int | None = None, steps: int | None = None, temperature: float = 0.0,
             cfg_scale: float = 0.0) -> list[str]:
    """Sample answers from a masked-diffusion model; plugins add stop tokens via ``tokplug_prepare_generation``."""
    tokenizer, model = ctx.tokenizer, ctx.model
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kwargs = {"gen_length": gen_length, "block_length": block_length, "steps": steps, "temperature": temperature,
              "cfg_scale": cfg_scale, "stop_token_ids": [tokenizer.eos_token_id]}
    kwargs = ctx.call("tokplug_prepare_generation", model=model, kwargs=kwargs)
    stop = set(kwargs.pop("stop_token_ids"))
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:  # prompts of different lengths are sampled one by one (no padded attention mask)
        if chat and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        out = diffusion_sample(model, torch.tensor([ids], device=device), mask_id=tokenizer.mask_token_id, **kwargs)
        texts.append(_answer_text(ctx, out[0].tolist(), stop))
    return texts


def pipeline_generate(ctx: Any, prompts: str | list[str], *, gen_length: int = 64, block_length: int = 32,
                      steps: int = 32, **pipeline_kwargs: Any) -> list[str]:
    """Sample through diffusers' ``LLaDA2Pipeline`` instead of :func:`generate`; outputs cut at every stop token.

    What differs from :func:`generate` (LLaDA's sampler): the pipeline commits tokens above a confidence
    ``threshold`` (at least ``minimal_topk`` per step) instead of a fixed count per step, may re-edit committed
    tokens (``editing_threshold``), aligns blocks from the start of the sequence (the prompt shares the first
    block), passes an attention mask and position ids to the model, and knows a single EOS for early stopping, so
    tokens plugins add as stops (rainbow pads) are cut here, after sampling.
    """
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    tokenizer = ctx.tokenizer
    pipe = LLaDA2Pipeline(model=ctx.model, scheduler=BlockRefinementScheduler(block_length=block_length),
                          tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    kwargs = ctx.call("tokplug_prepare_generation", model=ctx.model, kwargs={"stop_token_ids": [tokenizer.eos_token_id]})
    stop = set(kwargs["stop_token_ids"])
    texts = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        out = pipe(prompt=prompt, gen_length=gen_length, block_length=block_length, num_inference_steps=steps,
                   output_type="seq", **pipeline_kwargs)
        texts.append(_answer_text(ctx, out.sequences[0].tolist(), stop))
    return texts
