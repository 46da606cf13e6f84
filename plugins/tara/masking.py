"""The TARA mechanism on PEFT LoRA layers: token masks, masked cross-attention K/V branches, composition.

For every PEFT LoRA adapter with a rare token, a forward hook on the adapter's ``lora_B`` module inside each
cross-attention ``to_k`` / ``to_v`` multiplies the branch output, per text position, by that adapter's mask:
``dK = (B A c) * M[..., None]``. Masks are recomputed for each prompt: a forward pre-hook on the text encoder
records the ids it encodes (training, and any direct use), and a wrapper around the pipeline's ``encode_prompt``
sets the final masks for the batch the UNet will see, with zeros for the classifier-free-guidance negative half.
Other LoRA branches (self-attention, to_q, to_out) stay global; with several adapters PEFT sums them.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_tokplug.plugin import PluginError, local_folder

META_FILE = "tara.json"
MASKED = ("to_k", "to_v")


def word_ids(tokenizer: Any, word: str) -> list[list[int]]:
    """Token-id sequences a word can take in a prompt (with and without a leading space), longest first."""
    variants = []
    for text in (f" {word}", word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in variants:
            variants.append(ids)
    if not variants:
        raise PluginError(f"the word {word!r} has no tokens under this tokenizer")
    return sorted(variants, key=len, reverse=True)


def token_mask(input_ids: torch.Tensor, variants: list[list[int]]) -> torch.Tensor:
    """``(B, T)`` float mask: 1 at every sub-token of every occurrence of the word (sliding-window match)."""
    mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for ids in variants:
        n = len(ids)
        if n > input_ids.shape[1]:
            continue
        windows = input_ids.unfold(1, n, 1)  # (B, T - n + 1, n)
        hit = (windows == torch.tensor(ids, device=input_ids.device)).all(-1)
        for k in range(n):
            mask[:, k:k + hit.shape[1]] |= hit
    return mask.float()


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    """``{name: module}`` of the LoRA-wrapped to_k / to_v of every cross-attention module."""
    out = {}
    for name, module in unet.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in MASKED and hasattr(module, "lora_B"):
            attention = unet.get_submodule(parent)
            if getattr(attention, "is_cross_attention", False) or parent.endswith("attn2"):
                out[name] = module
    return out


@dataclass
class Concept:
    adapter: str
    rare_token: str
    variants: list[list[int]]


@dataclass
class MaskState:
    """The masks of the batch the UNet sees next: ``masks[adapter]`` is ``(B, T)``."""

    concepts: dict[str, Concept] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)
    version: int = 0  # bumped whenever the masks change (invalidates cached K/V)

    def set_from_ids(self, input_ids: torch.Tensor, negative_rows: int = 0) -> None:
        """Masks for ``input_ids``; ``negative_rows`` zero rows are prepended (the CFG negative half)."""
        self.input_ids = input_ids
        self.version += 1
        for name, concept in self.concepts.items():
            mask = token_mask(input_ids, concept.variants)
            if negative_rows:
                mask = torch.cat([torch.zeros(negative_rows, mask.shape[1], device=mask.device), mask])
            self.masks[name] = mask

    def mask_for(self, adapter: str, output: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(adapter)
        if mask is None:
            raise PluginError(f"TARA adapter {adapter!r} has no token mask for this batch",
                              fix="encode prompts through the pipeline or the text encoder TARA hooked")
        if mask.shape[0] != output.shape[0] or mask.shape[1] != output.shape[1]:
            raise PluginError(
                f"TARA mask of shape {tuple(mask.shape)} does not fit the cross-attention input {tuple(output.shape[:2])}",
                fix="pass prompts (not precomputed prompt_embeds) so TARA can build the masks")
        return mask.to(output.dtype).unsqueeze(-1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install(unet: Any, text_encoder: Any, tokenizer: Any, concepts: dict[str, str], state: MaskState | None = None
            ) -> MaskState:
    """Mask the cross-attention K/V branches of each ``{adapter: rare_token}`` and hook the text encoder."""
    state = state or MaskState()
    layers = cross_attention_layers(unet)
    if not layers:
        raise PluginError("no LoRA-wrapped cross-attention to_k/to_v found in the UNet",
                          fix="add the LoRA adapter on to_k and to_v (TARA's target modules) before installing TARA")
    for adapter, rare in concepts.items():
        state.concepts[adapter] = Concept(adapter, rare, word_ids(tokenizer, rare))
        for module in layers.values():
            if adapter not in module.lora_B:
                raise PluginError(f"adapter {adapter!r} has no LoRA on the cross-attention to_k/to_v")

            def hook(_m: Any, _args: Any, output: torch.Tensor, adapter: str = adapter) -> torch.Tensor:
                return output * state.mask_for(adapter, output)

            state.handles.append(module.lora_B[adapter].register_forward_hook(hook))

    def record(_m: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            state.set_from_ids(ids)

    state.handles.append(text_encoder.register_forward_pre_hook(record, with_kwargs=True))
    return state


def cache_cross_kv(unet: Any, state: MaskState) -> None:
    """Reuse each cross-attention K/V across denoising steps (inference only).

    The text side of cross-attention is the same tensor at every step of one pipeline call, and so are the masks:
    K and V (base + masked deltas) are computed once and returned again while the input tensor (same object, same
    in-place version) and the masks are unchanged. Anything under autograd (training) bypasses the cache.
    """
    for module in cross_attention_layers(unet).values():
        if getattr(module, "_tara_cached", False):
            continue
        original = module.forward
        cache: dict[str, Any] = {}

        def forward(x: torch.Tensor, *args: Any, _original: Any = original, _cache: dict = cache,
                    **kwargs: Any) -> torch.Tensor:
            if torch.is_grad_enabled():  # training (LoRA layers injected at load time keep training=True)
                return _original(x, *args, **kwargs)
            if _cache.get("x") is x and _cache["key"] == (x._version, state.version, args, tuple(kwargs)):
                return _cache["out"]
            out = _original(x, *args, **kwargs)
            _cache.update(x=x, key=(x._version, state.version, args, tuple(kwargs)), out=out)
            return out

        module.forward = forward
        module._tara_cached = True


def patch_pipeline(pipeline: Any, state: MaskState) -> None:
    """Wrap this pipeline instance's ``encode_prompt`` so the masks match the UNet batch (negative half zero)."""
    if getattr(pipeline, "_tara_state", None) is not None:
        pipeline._tara_state = state
        return
    original = pipeline.encode_prompt
    signature = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        prompt = bound.arguments.get("prompt")
        if prompt is None:
            raise PluginError("TARA needs the prompt text to place its masks; got only prompt_embeds",
                              fix="call the pipeline with prompt=...")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = int(bound.arguments.get("num_images_per_prompt", 1) or 1)
        tok = pipeline.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")["input_ids"].repeat_interleave(per_prompt, dim=0)
        cfg = bool(bound.arguments.get("do_classifier_free_guidance", False))
        current = pipeline._tara_state
        current.set_from_ids(ids.to(pipeline.device), negative_rows=ids.shape[0] if cfg else 0)
        return result

    pipeline.encode_prompt = encode_prompt
    pipeline._tara_state = state


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise PluginError(f"{folder} is not a TARA adapter (no {META_FILE})",
                          fix="point at the output folder of a diffusion LoRA run trained with the tara plugin")
    return json.loads(path.read_text(encoding="utf-8"))


def _local(folder: str) -> Path:
    return local_folder(folder, what="TARA adapter", where="plugins.tara.compose",
                        fix="give the output folder of a diffusion LoRA run trained with the tara plugin, or a Hub repo id")


def fuse_unmasked(unet: Any, adapters: list[str]) -> int:
    """Merge ``adapters`` into the base weights of every LoRA layer except the masked cross-attention K/V, and put
    the plain base layers back in place of those wrappers (inference only: they cannot be unmerged). Returns the
    number of layers fused."""
    masked = set(cross_attention_layers(unet).values())
    fused = [(name, m) for name, m in unet.named_modules() if hasattr(m, "lora_B") and m not in masked]
    for name, module in fused:
        module.merge(adapter_names=adapters)
        parent, _, leaf = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, leaf, module.get_base_layer())
    return len(fused)


def compose(pipeline: Any, adapters: list[str], fuse_global: bool = True, cache_kv: bool = True) -> MaskState:
    """Load N TARA adapters into ``pipeline`` and mask each at its own rare token; returns the mask state.

    Each adapter's LoRA loads with its saved config (rank, alpha: the training scale). All adapters are active with
    weight 1: PEFT sums their branches; the cross-attention K/V branches are masked per adapter. With
    ``fuse_global`` the unmasked branches are merged into the base weights (identical outputs, no LoRA wrapper left
    outside the masked layers; the pipeline is then for inference: load a fresh one to compose other adapters);
    with ``cache_kv`` the cross-attention K/V are computed once per prompt instead of once per step.
    """
    concepts: dict[str, str] = {}
    for i, ref in enumerate(adapters):
        folder = _local(ref)
        meta = read_meta(folder)
        name = f"tara_{i}_{meta['rare_token']}"
        pipeline.load_lora_weights(str(folder), adapter_name=name)
        concepts[name] = meta["rare_token"]
    pipeline.set_adapters(list(concepts), adapter_weights=[1.0] * len(concepts))
    state = install(pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, concepts)
    if fuse_global:
        fuse_unmasked(pipeline.unet, list(concepts))
    if cache_kv:
        cache_cross_kv(pipeline.unet, state)
    patch_pipeline(pipeline, state)
    return state
