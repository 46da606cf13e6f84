"""Generation through the inference hooks (``tokplug_prepare_generation``, ``tokplug_postprocess_text``)."""

from __future__ import annotations

from typing import Any

import torch


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
