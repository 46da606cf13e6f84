"""Loss-term composition for Trainer / TRL trainers, and tokens-per-second bookkeeping.

The trainer's own ``compute_loss`` runs unchanged (TRL's fused LM head included); when an enabled plugin implements
``tokplug_loss_terms``, the host captures the backbone's last hidden state and the model's output during that
call, asks the plugins for their terms and adds them. Normalisation follows the main loss, so gradient
accumulation is exact: a :class:`TokenLoss` sum is divided by ``num_items_in_batch`` (the label tokens of the
whole optimizer step) exactly when the main loss is; a plain scalar term (a per-micro-batch mean) is divided by
the number of accumulation steps when the trainer does not do it itself.

Two ways to use it: :class:`TokPlugTrainerMixin` (recipe runners, ``trainer_class(SFTTrainer)``), or
``ctx.attach(trainer)`` which wraps one trainer *instance* (no class is patched).
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

import torch

from .modeling import unwrap


@dataclass
class TokenLoss:
    """A loss term given as a sum over tokens and its token count (normalised like the main token loss)."""

    sum: torch.Tensor
    count: torch.Tensor | int


@dataclass
class ForwardCapture:
    """What ``tokplug_loss_terms`` receives as ``outputs``.

    Attributes:
        loss: the main loss of this micro-batch, as the trainer computed it.
        model_output: whatever the top-level model's forward returned (logits for a plain Trainer; TRL's
            ``FusedCausalLMOutput`` with per-token log-probs for ``SFTTrainer``, which never builds logits).
        last_hidden_state: ``(B, T, H)`` output of the backbone (after its final norm, before the LM head), or
            ``None`` when the model has no separable backbone.
        shift: the output at position t is scored against ``labels[:, t + shift]``: 1 for causal LMs (next
            token), 0 for masked-diffusion LMs (the position's own token): the task's ``traits.label_shift``.
    """

    loss: torch.Tensor
    model_output: Any
    last_hidden_state: torch.Tensor | None
    shift: int = 1


def _backbone(model: Any) -> Any | None:
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else None


def _hidden(output: Any) -> torch.Tensor | None:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _tokens_seen(inputs: dict[str, Any]) -> Any:
    """Real tokens in a batch (attention mask sum, else the ids' size); ``None`` for batches without token ids."""
    if torch.is_tensor(inputs.get("attention_mask")):
        return inputs["attention_mask"].sum().detach()
    if torch.is_tensor(inputs.get("input_ids")):
        return inputs["input_ids"].numel()
    return None


def _loss_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Trainer's own rule (transformers 5 ``training_step``) for whether it divides by accumulation steps."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )


def compute_loss_with_terms(
    trainer: Any,
    ctx: Any,
    compute_loss: Callable[..., Any],
    model: Any,
    inputs: dict[str, Any],
    return_outputs: bool = False,
    num_items_in_batch: Any = None,
) -> Any:
    """Run ``compute_loss`` and add the plugins' named loss terms (see module docstring)."""
    training = model.training
    host = ctx.host
    if training:
        host.setdefault("last_log", time.perf_counter())
        seen = _tokens_seen(inputs)
        if seen is not None:
            host["tokens"] = host.get("tokens", 0) + seen
    if not ctx.hooks.has("tokplug_loss_terms"):
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    captured: dict[str, Any] = {}
    unwrapped = unwrap(model)
    backbone = _backbone(unwrapped)

    # Forward hooks must return None (a returned value would replace the module's output).
    def keep_output(_module: Any, _args: Any, out: Any) -> None:
        captured.setdefault("output", out)

    def keep_hidden(_module: Any, _args: Any, out: Any) -> None:
        captured.setdefault("hidden", _hidden(out))

    handles = [unwrapped.register_forward_hook(keep_output)]
    if backbone is not None:
        handles.append(backbone.register_forward_hook(keep_hidden))
    try:
        result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    finally:
        for handle in handles:
            handle.remove()
    loss, rest = (result[0], result[1:]) if return_outputs else (result, ())

    traits = ctx.traits
    shift = traits.label_shift if traits is not None and traits.label_shift is not None else 1
    capture = ForwardCapture(loss, captured.get("output"), captured.get("hidden"), shift)
    terms = ctx.call("tokplug_loss_terms", model=model, inputs=inputs, outputs=capture)
    if terms:
        scaled = _loss_scaled_for_ga(trainer, num_items_in_batch)
        steps = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
        args = trainer.args
        world = trainer.accelerator.num_processes if getattr(args, "average_tokens_across_devices", False) else 1
        mode = "train" if training else "eval"
        for name, value in terms.items():
            if isinstance(value, TokenLoss):
                count = torch.as_tensor(value.count, device=value.sum.device).clamp(min=1)
                shown = value.sum / count
                if scaled and num_items_in_batch is not None:
                    # Same normalisation as the main loss: tokens of the whole optimizer step, all ranks.
                    added = value.sum / torch.as_tensor(num_items_in_batch, device=value.sum.device) * world
                else:
                    added = shown
            else:
                shown = value
                added = value / steps if scaled and training else value
            loss = loss + added
            host.setdefault(f"terms_{mode}", {}).setdefault(name, []).append(shown.detach())
    return (loss, *rest) if return_outputs else loss


def log_with_terms(trainer: Any, ctx: Any, log: Callable[..., Any], logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
    """Add the averaged loss terms, plugin metrics and tokens/s to a Trainer log line."""
    host = ctx.host
    mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
    prefix = "eval_" if mode == "eval" else ""
    for name, values in host.pop(f"terms_{mode}", {}).items():
        logs[f"{prefix}{name}"] = torch.stack([v.float() for v in values]).mean().item()
    if mode == "eval" or "loss" in logs:  # not the end-of-training summary line
        for key in [k for k in ctx.pending_logs if k.startswith(f"{mode}:")]:
            values = ctx.pending_logs.pop(key)
            logs[prefix + key.split(":", 1)[1]] = sum(values) / len(values)
    if mode == "train" and "loss" in logs:
        now = time.perf_counter()
        tokens = host.get("tokens")
        if tokens is not None and "last_log" in host:
            seen = float(tokens) - host.get("tokens_at_last_log", 0.0)
            logs["tokens_per_second"] = seen / max(now - host["last_log"], 1e-9)
        host["last_log"], host["tokens_at_last_log"] = now, float(tokens) if tokens is not None else 0.0
    return log(logs, *args, **kwargs)


class TokPlugTrainerMixin:
    """Mix into a Trainer class (before it) to get plugin loss terms and log fields; needs ``self.tokplug_ctx``."""

    tokplug_ctx: Any = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        return compute_loss_with_terms(
            self, self.tokplug_ctx, super().compute_loss, model, inputs, return_outputs, num_items_in_batch
        )

    def log(self, logs, *args, **kwargs):  # noqa: D102
        return log_with_terms(self, self.tokplug_ctx, super().log, logs, *args, **kwargs)


@cache
def trainer_class(base: type) -> type:
    """``trainer_class(SFTTrainer)`` -> a subclass with plugin loss terms; set ``trainer.tokplug_ctx = ctx``."""
    return type(f"TokPlug{base.__name__}", (TokPlugTrainerMixin, base), {"__module__": __name__})


def attach_loss_terms(trainer: Any, ctx: Any) -> None:
    """Wrap ``compute_loss`` and ``log`` of this trainer instance only."""
    if isinstance(trainer, TokPlugTrainerMixin):
        trainer.tokplug_ctx = ctx
        return
    if getattr(trainer, "_tokplug_attached", False):
        return
    compute_loss, log = trainer.compute_loss, trainer.log

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return compute_loss_with_terms(self, ctx, compute_loss, model, inputs, return_outputs, num_items_in_batch)

    def _log(self, logs, *args, **kwargs):
        return log_with_terms(self, ctx, log, logs, *args, **kwargs)

    trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    trainer.log = types.MethodType(_log, trainer)
    trainer._tokplug_attached = True
    handler = getattr(trainer.accelerator, "ddp_handler", None)
    if ctx.hooks.has("tokplug_loss_terms") and trainer.args.ddp_find_unused_parameters is None and handler is not None:
        # As in recipe runs: loss-term parameters are used after the DDP forward (see Runner.trainer_arguments).
        handler.find_unused_parameters = False
