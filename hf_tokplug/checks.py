"""Checks ``tokplug validate`` and ``tokplug run`` share, before anything is written or loaded: locations, attention
implementations, trainer-argument values, tracking backends, adapter targets (data columns: :mod:`hf_tokplug.data`).

Each raises :class:`~hf_tokplug.errors.RecipeError` naming the file, the key and what to do; a task calls them
from :meth:`hf_tokplug.plugin.Runner.check` (or its ``read_data``), so a run that would fail on its input fails here,
with nothing written into its output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import toy
from .errors import RecipeError, TokPlugError

# --------------------------------------------------------------------------------------------------- locations


def looks_local(location: str) -> bool:
    """A path, not a Hub id: starts with ``.``, ``/`` or ``~``, has a Windows drive, or more than one ``/``."""
    return location.startswith((".", "/", "~", "\\")) or (len(location) > 1 and location[1] == ":") \
        or location.count("/") > 1


def check_location(location: str, where: str) -> None:
    """A ``toy://`` name that exists, an existing local folder (or file), or a well-formed Hub id."""
    if toy.is_toy(location):
        from .toy.diffusion import PIPELINES

        if location[len(toy.SCHEME):] in PIPELINES:
            return
        try:
            toy.check_location(location)
        except TokPlugError as exc:
            raise RecipeError(exc.message, where=where, fix=exc.fix) from None
        return
    path = Path(location).expanduser()
    if path.exists():
        return
    if toy.packaged_path(location):
        return
    if looks_local(location):
        raise RecipeError(f"{location!r} is a path, and there is nothing there (looked in {path.resolve()})",
                          where=where, fix="check the path (relative paths resolve against the current directory)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(location)
    except HFValidationError:
        raise RecipeError(f"{location!r} is neither a local folder (looked in {path.resolve()}) nor a valid Hub id",
                          where=where, fix="give a Hub id like `org/name`, or the path of a local folder") from None


def location_problem(location: str, exc: BaseException) -> str:
    """Why ``location`` could not be read, in one line (transformers' errors run to several paragraphs)."""
    from huggingface_hub import constants

    path = Path(location).expanduser()
    if not path.exists() and constants.HF_HUB_OFFLINE:
        return (f"it is not a local folder (looked in {path.resolve()}) and, as a Hub id, it is not in the local cache "
                "(HF_HUB_OFFLINE is set)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}"


# --------------------------------------------------------------------------------------------------- the model


def check_attn_implementation(value: str | None, where: str) -> None:
    """``eager``, ``sdpa``, a registered attention function (flash / flex / paged), or a Hub kernel ``org/name``."""
    if value is None or "/" in value:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())]
    if value not in valid:
        import difflib

        close = difflib.get_close_matches(value, valid, n=1)
        raise RecipeError(f"unknown attention implementation {value!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                          where=where, fix=f"use one of: {', '.join(valid)}, or a Hub kernel id (org/name)")


def check_adapter_targets(task: Any, config: Any) -> None:
    """Attach the recipe's LoRA to an empty (meta-device) model built from ``config``: target modules that match
    nothing fail here. Anything else that goes wrong building the empty model skips the check (the real attach
    reports it)."""
    import torch
    import transformers

    try:
        auto = getattr(transformers, task.auto_class)
        with torch.device("meta"):
            model = auto.from_config(config, **task.model_kwargs())
    except Exception:
        return
    from peft import get_peft_model

    try:
        get_peft_model(model, task.lora_config())
    except ValueError as exc:
        if "not found" not in str(exc) and "target" not in str(exc).lower():
            return
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise RecipeError(
            f"adapter.target_modules {task.recipe.adapter.target_modules!r} match no module of "
            f"{task.recipe.model.name_or_path!r} ({str(exc).splitlines()[0]})",
            where=f"{task.source}: adapter.target_modules",
            fix=f"use `all-linear` or names of its linear layers: {', '.join(leaves[:12])}",
        ) from None
    except Exception:
        return


# --------------------------------------------------------------------------------------------------- trainer args

# key -> (smallest allowed value, what it means); `None` values are always allowed.
_AT_LEAST: dict[str, tuple[float, str]] = {
    "per_device_train_batch_size": (1, "examples per device and step"),
    "per_device_eval_batch_size": (1, "examples per device and evaluation step"),
    "gradient_accumulation_steps": (1, "batches per optimizer step"),
    "learning_rate": (0, "the optimizer's learning rate"),
    "weight_decay": (0, "weight decay"),
    "warmup_steps": (0, "warm-up steps"),
    "num_train_epochs": (0, "epochs"),
    "logging_steps": (0, "steps between logs"),
    "save_steps": (0, "steps between checkpoints"),
    "eval_steps": (0, "steps between evaluations"),
    "save_total_limit": (1, "checkpoints kept"),
    "dataloader_num_workers": (0, "data-loading worker processes"),
    "max_grad_norm": (0, "gradient clipping norm"),
    "max_length": (1, "tokens per example"),
    "num_generations": (1, "completions per prompt"),
    "max_completion_length": (1, "generated tokens"),
}
_POSITIVE = {"logging_steps", "save_steps", "eval_steps", "num_train_epochs"}


def check_train_values(train: dict[str, Any], source: str, *, has_eval: bool) -> None:
    """Values TrainingArguments accepts but training cannot use (a zero batch, a negative learning rate, ...)."""
    for key, value in train.items():
        where = f"{source}: train.{key}"
        if key in _AT_LEAST and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, meaning = _AT_LEAST[key]
            if value < low or (key in _POSITIVE and value <= 0):
                bound = "> 0" if key in _POSITIVE else f">= {low}"
                raise RecipeError(f"train.{key} is {value}; it is {meaning} and must be {bound}", where=where,
                                  fix=f"set train.{key} to a value {bound}")
    steps = train.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps != -1 and steps < 1:
        raise RecipeError(f"train.max_steps is {steps}: give a number of steps >= 1, or -1 to train "
                          "num_train_epochs epochs", where=f"{source}: train.max_steps", fix="e.g. train.max_steps=100")
    strategy = str(train.get("eval_strategy", "no")).lower()
    if not has_eval and (strategy in ("steps", "epoch") or train.get("load_best_model_at_end")):
        key = "eval_strategy" if strategy in ("steps", "epoch") else "load_best_model_at_end"
        raise RecipeError(f"train.{key} asks for evaluation during training, but the recipe has no evaluation data",
                          where=f"{source}: train.{key}",
                          fix="add data.eval (or data.eval_size: 0.1 to hold out part of train), or set eval_strategy: no")
    for key in ("packing", "padding_free"):
        if train.get(key):
            raise RecipeError(f"train.{key} is not supported yet: the host tokenizes the examples itself so that "
                              "plugins see them, and TRL's packed / padding-free batches bypass that",
                              where=f"{source}: train.{key}", fix=f"remove train.{key} (examples are padded per batch)")
    check_report_to(train.get("report_to"), f"{source}: train.report_to")


def check_report_to(value: Any, where: str) -> None:
    """Every ``report_to`` backend is one transformers knows and is installed (else training would fail after
    start-up)."""
    if value is None or value in ("none", "all") or value == []:
        return
    names = [value] if isinstance(value, str) else list(value)
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    unprobed = {"flyte", "azure_ml"}  # transformers does not report these as available; their callbacks check
    for name in names:
        if name == "none":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(f"unknown report_to backend {name!r}", where=where,
                              fix=f"use one of: none, all, {', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in available and name not in unprobed:
            raise RecipeError(f"report_to backend {name!r} is not installed", where=where,
                              fix=f"pip install {name.replace('_', '-')} (or drop it from train.report_to)")
