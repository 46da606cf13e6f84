"""Small facts about models that plugins and the host both need: one copy each.

    unwrap(model)              the model under DDP / accelerate wrappers and a PEFT tuner
    peft_base(model)           the model under a PEFT tuner only (a plain model is returned as is)
    is_peft(model)             a PEFT model (``peft_config`` + ``get_base_model``)
    is_tied(model)             input and output embeddings share one matrix (or there is no output layer)
    output_module_name(model)  the attribute name of an *untied* output layer (``lm_head``), else ``None``
    output_logits(model, rows) the model's own logits from final hidden states: the output layer (its bias too),
                               ``logit_scale`` and Gemma2/3's ``final_logit_softcapping``
    SD_ATTENTION_TARGETS       the LoRA targets of Stable Diffusion attention (q, k, v, out of attn1 and attn2)
    load_pipeline(name)        a Diffusers pipeline from a Hub id, a folder or ``toy://sd``
    save_unet_lora(unet, dir)  a UNet's PEFT LoRA in the Diffusers format, its config as metadata
"""

from __future__ import annotations

from typing import Any

SD_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_base(model: Any) -> Any:
    """The model a PEFT tuner wraps (``get_base_model()``), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap(model: Any) -> Any:
    """The model under DDP / accelerate wrappers (``.module``) and under a PEFT tuner."""
    return peft_base(getattr(model, "module", model))


def is_peft(model: Any) -> bool:
    return model is not None and hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def is_tied(model: Any) -> bool:
    """Whether the output layer reuses the input embedding matrix (also ``True`` without an output layer)."""
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def output_module_name(model: Any) -> str | None:
    """The attribute name (``lm_head``) of an untied output layer, for PEFT ``modules_to_save``; ``None`` when tied,
    absent, or ``model`` is ``None``."""
    if model is None or model.get_output_embeddings() is None or is_tied(model):
        return None
    out = model.get_output_embeddings()
    return next((name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is out), None)


def output_logits(model: Any, rows: Any, weight: Any = None, bias: Any = None) -> Any:
    """Logits the model itself would give for final hidden states ``rows`` (``(..., H)``, after the final norm).

    ``rows @ weight.T (+ bias)``, then what some architectures do after the output layer: multiply by
    ``config.logit_scale`` (Cohere), divide by ``config.logits_scaling`` (Granite) and soft-cap, ``cap * tanh(logits / cap)`` with ``config.final_logit_softcapping``
    (Gemma2/3). ``weight`` / ``bias`` default to the model's output layer (pass another, e.g. a separate
    unembedding, to score through it). Plugins that score captured hidden states use this, so Gemma's capped logits
    are the ones they see.
    """
    import torch

    base = peft_base(getattr(model, "module", model))
    if weight is None:
        out = base.get_output_embeddings()
        weight, bias = out.weight, getattr(out, "bias", None)
    logits = rows @ weight.T.to(rows.dtype)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1.0:
        logits = logits * scale
    divide = getattr(config, "logits_scaling", None)  # Granite divides instead
    if isinstance(divide, (int, float)) and divide != 1.0:
        logits = logits / divide
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def load_pipeline(name_or_path: str, dtype: Any = None, **kwargs: Any) -> Any:
    """A Diffusers pipeline from a Hub id, folder or ``toy://sd`` (safety checker off: research use)."""
    from diffusers import DiffusionPipeline

    from . import toy

    extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        return DiffusionPipeline.from_pretrained(toy.resolve(name_or_path), torch_dtype=dtype, **extra, **kwargs)
    except TypeError:  # pipelines without a safety checker
        return DiffusionPipeline.from_pretrained(toy.resolve(name_or_path), torch_dtype=dtype, **kwargs)


def unet_lora_state(unet: Any, adapter: str = "default") -> dict[str, Any]:
    """The UNet's LoRA ``adapter`` weights with Diffusers key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))


def save_unet_lora(unet: Any, folder: Any, adapter: str = "default") -> None:
    """The UNet's LoRA ``adapter`` as ``pytorch_lora_weights.safetensors`` (Diffusers format), with the adapter
    config as metadata, so inference applies the training scale (alpha / r)."""
    from diffusers import StableDiffusionPipeline

    config = unet.peft_config[adapter]
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet_lora_state(unet, adapter), unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)


_CAPTURE = "tokplug_capture"
_captured: dict[int, Any] = {}
_capture_layer: list[int] = []


def _capture_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """sdpa, plus (for the layer asked for) the attention probabilities recomputed from the same query and key."""
    import torch

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "layer_idx", None) in _capture_layer:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
        t, s = scores.shape[-2:]
        allowed = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[..., -s:]
        elif attention_mask is not None:
            allowed = allowed & (attention_mask[..., -s:] > -1e4)
        _captured[module.layer_idx] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(dim=1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def layer_attention(model: Any, layer: int, input_ids: Any, attention_mask: Any = None) -> tuple[Any, Any]:
    """One no-gradient forward of a causal LM returning ``(logits, attention)``: ``attention`` is ``(B, T, T)``, the
    head-averaged attention probabilities of decoder layer ``layer`` (Python index), recomputed from that layer's own
    (post-RoPE) queries and keys while the forward runs under sdpa, so no layer materialises attention weights
    except the one asked for (``output_attentions`` would need eager attention everywhere). Works for models that
    use transformers' attention interface (Llama, Qwen, Mistral, Gemma, Phi, OLMo, ... families); eval mode for the
    call, the training flag and attention implementation are restored."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    base = unwrap(model)
    count = base.config.get_text_config().num_hidden_layers
    index = layer % count
    configs = {id(c): c for c in (base.config, base.config.get_text_config())}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    was_training = model.training
    _captured.clear()
    _capture_layer[:] = [index]
    try:
        for config, _ in saved:
            config._attn_implementation = _CAPTURE
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for config, impl in saved:
            config._attn_implementation = impl
        model.train(was_training)
        _capture_layer.clear()
    if index not in _captured:
        raise ValueError(f"{type(base).__name__} does not route layer {index}'s attention through transformers' "
                         "attention interface: its attention cannot be recomputed")
    return logits, _captured.pop(index)
