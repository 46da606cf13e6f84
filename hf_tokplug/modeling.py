"""Small facts about models that plugins and the host both need: one copy each.

    unwrap(model)              the model under DDP / accelerate wrappers and a PEFT tuner
    peft_base(model)           the model under a PEFT tuner only (a plain model is returned as is)
    is_peft(model)             a PEFT model (``peft_config`` + ``get_base_model``)
    is_tied(model)             input and output embeddings share one matrix (or there is no output layer)
    output_module_name(model)  the attribute name of an *untied* output layer (``lm_head``), else ``None``
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
