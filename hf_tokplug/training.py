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
class MainLoss:
    """A loss term that *replaces* the trainer's main loss of this micro-batch instead of adding to it.

    For a method that changes the main objective's form (cDPO's per-position loss) rather than adding a term or
    weighting tokens. ``value`` is a scalar (a mean over this micro-batch) and is normalised like a plain scalar
    term (divided by the accumulation steps when the trainer leaves that to the loss); other plugins' terms are
    still added to it. At most one plugin may return a ``MainLoss`` per micro-batch (two are an error). The
    trainer's own main loss is still computed (its graph is dropped) and the replacement is what is logged as
    ``loss``.
    """

    value: torch.Tensor


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

    def token_log_probs(self, batch: TokenBatch) -> torch.Tensor:
        """``(B, T)`` log-probability of ``batch.targets`` under the model, with gradient, in the batch's output
        frame (0 where nothing is scored): TRL's fused per-token ``log_probs`` when the trainer used its fused LM
        head, else from the output's ``logits``. Under ``tokplug_token_weights`` the fused values are the weighted
        ones the trainer reduced."""
        targets = batch.targets
        fused = getattr(self.model_output, "log_probs", None)
        if torch.is_tensor(fused):
            width = min(fused.shape[1], targets.shape[1])
            out = fused.new_zeros(targets.shape, dtype=torch.float32)
            out[:, :width] = fused[:, :width].float()
        else:
            logits = getattr(self.model_output, "logits", None)
            if logits is None and isinstance(self.model_output, (tuple, list)) and self.model_output:
                logits = self.model_output[0]
            if not torch.is_tensor(logits):
                raise ValueError("the model output has neither per-token log_probs nor logits")
            logits = logits[:, : targets.shape[1]].float()
            out = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return out.masked_fill(~batch.scored, 0.0)


# Trainer families whose batches stack two completions per example: rows [0, B/2) chosen, [B/2, B) rejected.
PAIRED_TRAINERS = ("DPOTrainer", "RewardTrainer")
# Trainer families whose rows are sampled completions scored by an advantage.
POLICY_TRAINERS = ("GRPOTrainer", "RLOOTrainer")


@dataclass
class TokenBatch:
    """A trainer-independent view of the batch one forward runs on: what ``tokplug_loss_terms`` (argument
    ``batch``) and every per-token hook read instead of trainer-specific keys.

    Attributes:
        labels: ``(B, T)`` the target id of each *input* position, ``-100`` where the trainer scores nothing
            (prompts, padding): HF's label convention, whatever the trainer (SFT labels; the completion tokens of
            DPO's chosen and rejected rows; GRPO's sampled completions). All ``-100`` for batches without token
            targets (a reward model's pairs).
        shift: the output at position t is scored against ``labels[:, t + shift]`` (the task's ``label_shift``:
            1 causal, 0 masked diffusion).
        roles: one per row: ``"sft"`` (a supervised example), ``"chosen"`` / ``"rejected"`` (a preference pair's
            completions), ``"policy"`` (a sampled RL completion).
        advantages: ``(B,)`` the advantage of each policy row (RL trainers), else ``None``.
        attention_mask: ``(B, T)`` or ``None``.
        input_ids: ``(B, T)`` the token ids the forward runs on (GRPO: prompt and completion joined), or ``None``;
            with ``attention_mask`` enough to run another (frozen) model over the same rows.
    """

    labels: torch.Tensor
    shift: int
    roles: tuple[str, ...]
    advantages: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None

    @property
    def scored(self) -> torch.Tensor:
        """``(B, T)`` bool in the *output* frame: output position t is scored (``labels[:, t + shift] != -100``)."""
        return self.targets != -100

    @property
    def targets(self) -> torch.Tensor:
        """``(B, T)`` in the output frame: the id output position t is scored against (``-100``: not scored)."""
        if not self.shift:
            return self.labels
        pad = self.labels.new_full((self.labels.shape[0], self.shift), -100)
        return torch.cat([self.labels[:, self.shift:], pad], dim=1)

    def rows(self, *roles: str) -> torch.Tensor:
        """``(B,)`` bool: the rows whose role is one of ``roles``."""
        return torch.tensor([r in roles for r in self.roles], device=self.labels.device)

    def only(self, *roles: str) -> TokenBatch:
        """The same batch with the labels of rows of other roles set to ``-100`` (nothing scored there)."""
        keep = self.rows(*roles)[:, None]
        return TokenBatch(self.labels.masked_fill(~keep, -100), self.shift, self.roles, self.advantages,
                          self.attention_mask, self.input_ids)


class FrozenLogProbs:
    """Per-token log-probabilities of a frozen model on the rows of a :class:`TokenBatch`, for plugins that weight
    tokens by another model's view (TGDPO's reward model and reference, a history model's losses).

    ``scorer(batch)`` returns ``(B, T)`` float32 in the batch's *output* frame: entry t is
    ``log p(batch.targets[:, t])`` where output position t is scored, 0 elsewhere. The forward runs without gradient,
    in eval mode (dropout off; the training flag is restored), with the adapter disabled when
    ``disable_adapter=True`` (a PEFT policy's base is DPO's reference under LoRA). Results are cached per row
    (keyed by the row's ids, mask and targets with right padding trimmed), so a frozen model is run once per
    distinct example however many epochs see it; ``cache=False`` turns that off.

    Args:
        model: a transformers model (or PEFT model) whose forward returns ``logits``.
        disable_adapter: score with the PEFT adapter disabled (the base model).
        cache: keep each row's result (on CPU) for the next time the same row comes.
    """

    def __init__(self, model: Any, *, disable_adapter: bool = False, cache: bool = True):
        self.model, self.disable_adapter, self.cache = model, disable_adapter, cache
        self.rows: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.frozen = False

    @staticmethod
    def _key(ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor) -> tuple[str, int]:
        import hashlib

        valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        length = int(valid.nonzero().max()) + 1 if valid.any() else 0
        digest = hashlib.sha1()
        for part in [ids[:length], targets[:length], valid[:length]]:
            digest.update(part.detach().to("cpu", torch.int64).numpy().tobytes())
        return digest.hexdigest(), length

    def freeze(self) -> None:
        """From now on only cached rows are served (the model may have changed: a history model's scores were
        computed before training); a row that is not cached raises."""
        self.frozen = True

    def save(self, path: Any) -> None:
        """Write the cache as safetensors (one tensor per row, keyed by the row's fingerprint)."""
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in self.rows.items()}, str(path))

    def load(self, path: Any) -> None:
        from safetensors.torch import load_file

        self.rows.update(load_file(str(path)))

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        if batch.input_ids is None:
            raise ValueError("FrozenLogProbs needs batch.input_ids (the trainer's batch carries no token ids)")
        ids, mask, targets = batch.input_ids, batch.attention_mask, batch.targets
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        keys = [self._key(ids[i], None if mask is None else mask[i], targets[i]) for i in range(ids.shape[0])]
        todo = [i for i, (key, _) in enumerate(keys) if not (self.cache and key in self.rows)]
        if todo and self.frozen:
            raise KeyError(f"{len(todo)} row(s) of this batch were not scored in advance (FrozenLogProbs.freeze): the "
                           "trainer's examples differ from the ones the scores were computed on")
        self.hits += ids.shape[0] - len(todo)
        self.misses += len(todo)
        if todo:
            scored = self._score(ids[todo], None if mask is None else mask[todo], targets[todo])
            for j, i in enumerate(todo):
                key, length = keys[i]
                out[i, :length] = scored[j, :length]
                if self.cache:
                    self.rows[key] = scored[j, :length].cpu()
        for i, (key, length) in enumerate(keys):
            if i not in todo:
                out[i, :length] = self.rows[key].to(out.device)
        return out

    @torch.no_grad()
    def _score(self, ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        import contextlib

        model = self.model
        was_training = model.training
        model.eval()
        peft_model = getattr(model, "module", model)  # under DDP / accelerate wrappers, keeping the PEFT model
        adapter_off = peft_model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        try:
            with adapter_off:
                logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            model.train(was_training)
        logits = logits[:, : targets.shape[1]].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(targets == -100, 0.0)


def reference_log_probs(trainer: Any) -> FrozenLogProbs:
    """The :class:`FrozenLogProbs` of a preference trainer's reference: its ``ref_model``, or (LoRA, no separate
    reference) the policy with its adapter disabled, as DPOTrainer itself does."""
    from .errors import PluginError
    from .modeling import is_peft

    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        return FrozenLogProbs(ref)
    if is_peft(trainer.model):
        return FrozenLogProbs(trainer.model, disable_adapter=True, cache=False)  # the base under a training adapter
    raise PluginError(f"{type(trainer).__name__} has no reference model to score with (ref_model is None and the "
                      "policy has no adapter to disable)",
                      fix="train with an adapter, or give the trainer a reference model (preference_dpo does both)")


def _family(trainer: Any) -> str | None:
    names = {cls.__name__ for cls in type(trainer).__mro__}
    if names & set(PAIRED_TRAINERS):
        return "paired"
    if names & set(POLICY_TRAINERS):
        return "policy"
    return None


def token_batch(trainer: Any, inputs: dict[str, Any], traits: Any = None) -> TokenBatch:
    """The :class:`TokenBatch` of ``inputs``, whichever trainer built them (SFT / Trainer labels, DPO's completion
    mask, GRPO's prompt + completion ids, a reward model's pairs)."""
    shift = traits.label_shift if traits is not None and traits.label_shift is not None else 1
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    advantages = None
    if torch.is_tensor(inputs.get("prompt_ids")) and torch.is_tensor(inputs.get("completion_ids")):  # GRPO / RLOO
        prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs.get("completion_mask", torch.ones_like(completion))
        labels = torch.cat([torch.full_like(prompt, -100), completion.masked_fill(completion_mask == 0, -100)], dim=1)
        prompt_mask = inputs.get("prompt_mask", torch.ones_like(prompt))
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        advantages = inputs.get("advantages")
        ids = torch.cat([prompt, completion], dim=1)
    elif torch.is_tensor(ids) and torch.is_tensor(inputs.get("labels")) and inputs["labels"].shape == ids.shape:
        labels = inputs["labels"]  # SFT, masked diffusion, any Trainer with token labels
    elif torch.is_tensor(ids) and torch.is_tensor(inputs.get("completion_mask")):  # DPO-style pairs
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
    elif torch.is_tensor(ids):  # no token targets (sequence labels, reward pairs)
        labels = torch.full_like(ids, -100)
    else:
        raise ValueError(f"cannot read a token batch from keys {sorted(inputs)}")
    family = _family(trainer)
    rows = labels.shape[0]
    if family == "paired":
        roles = ("chosen",) * (rows // 2) + ("rejected",) * (rows - rows // 2)
    elif family == "policy":
        roles = ("policy",) * rows
    else:
        roles = ((traits.roles[0] if traits is not None else "sft"),) * rows
    return TokenBatch(labels, shift, roles, advantages, mask, ids if torch.is_tensor(ids) else None)


class TokenWeighting:
    """Applies ``tokplug_token_weights`` inside the trainer's own main loss for one ``compute_loss`` call.

    TRL's SFT, DPO and GRPO trainers score tokens through the fused LM head (``model(..., fused_lm_head=True)``
    returns per-token ``log_probs``, shifted: entry t is output position t). A forward hook on the trainer's model
    (and on DPO's separate reference model) multiplies those log-probabilities by the weights before the trainer
    reduces them, so SFT's ``-sum(w log p) / num_items``, DPO's ``sum_t w_t (log pi - log pi_ref)`` and GRPO's
    per-token policy gradient follow with the trainer's own normalisation untouched. The hook tracks rows, since
    GRPO scores a batch in chunks and DPO runs the policy and the reference over the same rows. A trainer whose
    loss applies the weights itself (the masked-diffusion task) sets ``tokplug_applies_token_weights = True`` and
    reads ``trainer.tokplug_token_weights`` during ``compute_loss``.
    """

    def __init__(self, trainer: Any, weights: torch.Tensor):
        self.trainer, self.weights = trainer, weights  # (B, T), output frame
        self.row = 0
        self.applied = False

    def install(self) -> list[Any]:
        if getattr(self.trainer, "tokplug_applies_token_weights", False):
            self.trainer.tokplug_token_weights = self.weights
            self.applied = True
            return []
        models = [self.trainer.model, getattr(self.trainer, "ref_model", None)]
        return [m.register_forward_hook(self.weigh, with_kwargs=True) for m in models if m is not None]

    def weigh(self, _module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        log_probs = getattr(out, "log_probs", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if log_probs is None or ids is None:
            return
        rows = ids.shape[0]
        if self.row >= self.weights.shape[0]:  # another pass over the same rows (DPO's reference)
            self.row = 0
        w = self.weights[self.row : self.row + rows, -ids.shape[1]:][:, : log_probs.shape[1]]  # (b, L)
        self.row += rows
        out.log_probs = log_probs * w.to(log_probs.dtype)
        self.applied = True

    def reset(self) -> None:
        if getattr(self.trainer, "tokplug_applies_token_weights", False):
            self.trainer.tokplug_token_weights = None

    def check(self) -> None:
        """Raise when the weights reached no per-token loss (a trainer this mechanism does not cover)."""
        if not self.applied:
            from .errors import PluginError

            raise PluginError(
                f"token weights (tokplug_token_weights) could not be applied: {type(self.trainer).__name__}'s loss "
                "reads no per-token log-probabilities",
                fix="use a task or trainer whose main loss is per token (TRL SFT, DPO, GRPO; masked diffusion), or "
                    "remove the plugin that returns token weights",
            )


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
    """Real tokens in a batch (attention mask sum; GRPO's prompt + completion masks; else the ids' size); ``None``
    for batches without token ids. Never assumes a key."""
    if torch.is_tensor(inputs.get("attention_mask")):
        return inputs["attention_mask"].sum().detach()
    masks = [inputs[k] for k in ("prompt_mask", "completion_mask") if torch.is_tensor(inputs.get(k))]
    if masks and torch.is_tensor(inputs.get("completion_ids")):
        return sum(m.sum() for m in masks).detach()
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
    with_terms, with_weights = ctx.hooks.has("tokplug_loss_terms"), ctx.hooks.has("tokplug_token_weights")
    if not (with_terms or with_weights):
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    batch = token_batch(trainer, inputs, ctx.traits)  # before the trainer's own compute_loss changes `inputs`
    captured: dict[str, Any] = {}
    handles = []
    weighting = None
    if with_weights:
        weights = ctx.call("tokplug_token_weights", batch=batch)
        if weights is not None:
            weighting = TokenWeighting(trainer, weights.detach().to(batch.labels.device))
            handles += weighting.install()
    if with_terms:
        unwrapped = unwrap(model)
        backbone = _backbone(unwrapped)

        # Forward hooks must return None (a returned value would replace the module's output).
        def keep_output(_module: Any, _args: Any, out: Any) -> None:
            captured.setdefault("output", out)

        def keep_hidden(_module: Any, _args: Any, out: Any) -> None:
            captured.setdefault("hidden", _hidden(out))

        handles.append(unwrapped.register_forward_hook(keep_output))
        if backbone is not None:
            handles.append(backbone.register_forward_hook(keep_hidden))
    try:
        result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    finally:
        for handle in handles:
            handle.remove()
        if weighting is not None:
            weighting.reset()
    if weighting is not None:
        weighting.check()
    loss, rest = (result[0], result[1:]) if return_outputs else (result, ())
    if not with_terms:
        return result

    capture = ForwardCapture(loss, captured.get("output"), captured.get("hidden"), batch.shift)
    terms = ctx.call("tokplug_loss_terms", model=model, inputs=inputs, outputs=capture, batch=batch)
    if terms:
        scaled = _loss_scaled_for_ga(trainer, num_items_in_batch)
        steps = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
        args = trainer.args
        world = trainer.accelerator.num_processes if getattr(args, "average_tokens_across_devices", False) else 1
        mode = "train" if training else "eval"
        replaced, parts = None, []
        for name, value in terms.items():
            main = isinstance(value, MainLoss)
            if main:
                if replaced is not None:
                    from .errors import PluginError

                    raise PluginError(f"two plugins replace the main loss ({replaced} and {name}): only one may",
                                      fix="enable one of the plugins that return a MainLoss")
                replaced, value = name, value.value
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
            parts.append((main, added))
            host.setdefault(f"terms_{mode}", {}).setdefault(name, []).append(shown.detach())
        if replaced is not None:  # the trainer's own main loss is dropped: the replacement, then the other terms
            loss = next(added for main, added in parts if main)
        for main, added in parts:
            if not main:
                loss = loss + added
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
