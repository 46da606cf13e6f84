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

    With ``chat=True`` and a tokenizer that has a chat template, each prompt is a user message. A masked-diffusion
    LM (a context whose task's traits say ``masked_lm``, or a model without ``generate``, such as ModernBERT) is
    sampled with :func:`diffusion_generate` instead: ``max_new_tokens`` becomes ``gen_length`` and its options
    (``block_length``, ``steps``, ``temperature``, ``cfg_scale``, ``cache``, ``threshold``) pass through.
    """
    tokenizer, model = ctx.tokenizer, ctx.model
    traits = getattr(ctx, "traits", None)
    if (traits is not None and traits.model_kind == "masked_lm") or not hasattr(model, "generate"):
        options = dict(generate_kwargs)
        if "max_new_tokens" in options:
            options["gen_length"] = options.pop("max_new_tokens")
        return diffusion_generate(ctx, prompts, chat=chat, **options)
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


CACHE_MODES = (None, "prefix", "dual")


def _open_mask(batch: int, queries: int, keys: int, like: torch.Tensor) -> torch.Tensor:
    """A 4D additive mask of zeros: every query attends to every key (transformers passes a 4D mask through as is;
    without it a forward with a cache would get a causal mask, and eager attention always would)."""
    return torch.zeros(batch, 1, queries, keys, dtype=like.dtype, device=like.device)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers or not all(torch.is_tensor(getattr(layer, "keys", None)) for layer in layers):
        raise ValueError(f"the model's cache ({type(cache).__name__}) has no per-layer key/value tensors to reuse: "
                         "sample with cache=None")
    return layers


def _keep_positions(cache: Any, keep: torch.Tensor) -> None:
    """Keep only the cached positions ``keep`` (a 1-D index) in every layer."""
    for layer in _cache_layers(cache):
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


def _trim(cache: Any, length: int) -> None:
    """Drop what a forward appended after the first ``length`` cached positions."""
    for layer in _cache_layers(cache):
        layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


@torch.no_grad()
def diffusion_sample(model: Any, prompt_ids: torch.Tensor, *, mask_id: int, gen_length: int = 64,
                     block_length: int | None = None, steps: int | None = None, temperature: float = 0.0,
                     cfg_scale: float = 0.0, cache: str | None = None, threshold: float | None = None) -> torch.Tensor:
    """LLaDA low-confidence remasking for prompts of equal length ``(B, P)``; returns ``(B, gen_length)``.

    The window is decoded block by block; each block commits ``steps / blocks`` times, the most confident masked
    positions first, a fixed count per step (the default, LLaDA's sampler).

    Args:
        cache: ``None`` (default): one full forward per step. ``"prefix"``: at the start of each block one full
            forward, whose keys/values of everything before the block are reused by the block's later steps, which
            run only the block and what follows it. ``"dual"``: the keys/values after the block are reused too,
            so later steps run only the block (Fast-dLLM's prefix and dual cache). Both are *approximate* for a
            bidirectional model: the reused keys/values were computed while the block was still masked (exact at
            each block's first step, refreshed at every block). Needs a model that takes a transformers cache and
            a 4D attention mask (decoder-style dLLMs: LLaDA, Dream, a bidirectional Gemma/Llama).
        threshold: also commit every masked position whose confidence is at least this (Fast-dLLM's parallel
            decoding), besides the step's scheduled count; a block ends when it has no masked position left, so
            a confident model needs fewer forwards. ``None`` (default): the schedule only.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, not {cache!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    block_length = block_length or gen_length
    steps = steps or gen_length
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError("gen_length must be a multiple of block_length, and steps a multiple of the block count")
    b, p = prompt_ids.shape
    total = p + gen_length
    x = torch.full((b, total), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :p] = prompt_ids
    blocks = gen_length // block_length
    per_block = steps // blocks
    rows = 2 * b if cfg_scale > 0 else b
    mask_like = next(model.parameters())

    def guided(logits: torch.Tensor) -> torch.Tensor:
        if cfg_scale <= 0:
            return logits
        cond, un = logits.chunk(2)
        return un + (cfg_scale + 1) * (cond - un)

    def full_forward(start: int, end: int) -> tuple[torch.Tensor, Any]:
        ids = x
        if cfg_scale > 0:
            uncond = x.clone()
            uncond[:, :p] = mask_id
            ids = torch.cat([x, uncond])
        if cache is None:
            return guided(model(input_ids=ids).logits)[:, start:end], None
        out = model(input_ids=ids, attention_mask=_open_mask(rows, total, total, mask_like), use_cache=True)
        kept = out.past_key_values
        if cache == "prefix":
            _trim(kept, start)
        else:
            _keep_positions(kept, torch.cat([torch.arange(start), torch.arange(end, total)]).to(x.device))
        return guided(out.logits)[:, start:end], kept

    def cached_forward(kept: Any, start: int, end: int) -> torch.Tensor:
        length = kept.get_seq_length()
        stop = total if cache == "prefix" else end
        ids = x[:, start:stop]
        ids = torch.cat([ids, ids]) if cfg_scale > 0 else ids
        positions = torch.arange(start, stop, device=x.device)[None].expand(rows, -1)
        out = model(input_ids=ids, attention_mask=_open_mask(rows, stop - start, length + stop - start, mask_like),
                    position_ids=positions, cache=kept, use_cache=True)
        _trim(kept, length)
        return guided(out.logits)[:, : end - start]

    for block in range(blocks):
        start, end = p + block * block_length, p + (block + 1) * block_length
        transfer = _num_transfer(x[:, start:end] == mask_id, per_block)
        kept = None
        for step in range(per_block):
            masked = x[:, start:end] == mask_id
            if threshold is not None and not masked.any():
                break  # parallel commits finished the block early
            if kept is None:
                logits, kept = full_forward(start, end)
            else:
                logits = cached_forward(kept, start, end)
            # Only the current block is eligible: score it alone (the float64 softmax is the costly part).
            logits[..., mask_id] = -float("inf")  # never "predict" the mask token itself
            if temperature > 0:  # Gumbel-max in float64: low precision would make the sampling almost greedy
                logits64 = logits.double()
                gumbel = (-torch.log(torch.rand_like(logits64))) ** temperature
                choice = (logits64.exp() / gumbel).argmax(-1)
            else:
                choice = logits.argmax(-1)
            probs = F.softmax(logits.double(), dim=-1)
            confidence = probs.gather(-1, choice[..., None]).squeeze(-1)  # (B, L)
            confidence = torch.where(masked, confidence, torch.full_like(confidence, -float("inf")))
            # commit each row's k most confident positions: rank positions by confidence, keep rank < k
            order = confidence.argsort(dim=-1, descending=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(end - start, device=x.device).expand_as(order))
            commit = ranks < transfer[:, step : step + 1]
            if threshold is not None:
                commit |= confidence >= threshold
            commit &= masked
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
             cfg_scale: float = 0.0, cache: str | None = None, threshold: float | None = None) -> list[str]:
    """Sample answers from a masked-diffusion model; plugins add stop tokens via ``tokplug_prepare_generation``.
    ``cache`` (``"prefix"``/``"dual"``, approximate) and ``threshold`` (parallel commits) speed it up: see
    :func:`diffusion_sample`."""
    tokenizer, model = ctx.tokenizer, ctx.model
    if tokenizer.mask_token_id is None:
        from .errors import TokPlugError

        raise TokPlugError("masked-diffusion sampling needs a mask token, and this tokenizer has none",
                           fix="add one (tokenizer.add_special_tokens({'mask_token': '<|mdm_mask|>'}) and resize the "
                               "model), or train with task masked_diffusion_sft, which adds it")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kwargs = {"gen_length": gen_length, "block_length": block_length, "steps": steps, "temperature": temperature,
              "cfg_scale": cfg_scale, "cache": cache, "threshold": threshold,
              "stop_token_ids": [tokenizer.eos_token_id]}
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
