"""Inference: the functions that fire the inference hooks (``tokplug_prepare_generation``,
``tokplug_postprocess_text``, ``tokplug_prepare_pipeline``).

- :func:`generate`: causal LMs through ``model.generate``.
- :func:`diffusion_generate`: masked-diffusion LMs through the LLaDA sampler (:func:`diffusion_sample`): prompt +
  gen_length mask tokens, split into blocks of block_length; steps spread evenly over blocks; each step predicts
  every masked position, confidence = probability of the argmax (Gumbel noise in float64 when temperature > 0),
  only positions of the current block are eligible, the n most confident are committed. The output is cut at the
  first stop token (EOS, plus anything plugins add, e.g. rainbow pads).
- :func:`pipeline_generate`: the same models through diffusers' ``LLaDA2Pipeline``.
- :func:`prepare_pipeline`: a Diffusers pipeline through the plugins (e.g. TARA composition).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(ctx: Any, prompts: str | list[str], *, chat: bool = True, **generate_kwargs: Any) -> list[str]:
    """Generate a completion for each prompt with ``ctx.model``; plugins may rewrite inputs and outputs.

    With ``chat=True`` and a tokenizer that has a chat template, each prompt is a user message.
    """
    tokenizer, model = ctx.tokenizer, ctx.model
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if chat and tokenizer.chat_template:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {k: v.to(device) for k, v in enc.items()}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.update(generate_kwargs)
    kwargs = ctx.call("tokplug_prepare_generation", model=model, kwargs=kwargs)
    output = model.generate(**kwargs)
    start = enc["input_ids"].shape[1] if "input_ids" in kwargs else 0
    texts = tokenizer.batch_decode(output[:, start:], skip_special_tokens=True)
    return [ctx.call("tokplug_postprocess_text", text=t) for t in texts]


def prepare_pipeline(ctx: Any, pipeline: Any) -> Any:
    """Run the ``tokplug_prepare_pipeline`` chain over a Diffusers pipeline; returns (and records) the result."""
    ctx.pipeline = ctx.call("tokplug_prepare_pipeline", pipeline=pipeline)
    return ctx.pipeline


# ------------------------------------------------------------------------------------------------------ masked diffusion (LLaDA)


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


def diffusion_generate(ctx: Any, prompts: str | list[str], *, chat: bool = True, gen_length: int = 64,
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
