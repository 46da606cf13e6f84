"""Reward functions for the ``grpo`` task, named in a recipe: built-ins, or any importable ``module:function``.

    task_options:
      rewards:
        - exact_match                                   # the completion's first word equals the `answer` column
        - {name: regex, pattern: "^\\s*[A-Z][a-z]+", weight: 0.5}
        - {name: length, target: 40, weight: 0.1}
        - {name: mypkg.rewards:my_reward, weight: 2.0}  # your own: f(completions, **columns) -> list[float | None]

Each entry becomes a function with TRL's reward signature ``f(prompts, completions, **columns) -> list[float |
None]`` (dataset columns arrive as keyword arguments, one value per completion); the weights go to
``GRPOConfig.reward_weights``. A user function is checked when the recipe is validated (it imports, it is
callable, it accepts ``completions`` and the columns it names exist) and each call's result is checked (one number
or ``None`` per completion), so a broken reward fails with its name instead of deep inside the trainer.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import RecipeError

# Arguments GRPOTrainer passes to every reward function besides the dataset's columns.
TRAINER_ARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


def text_of(completion: Any) -> str:
    """A completion's text: a string, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _first_word(text: str) -> str:
    words = re.findall(r"[\w']+", text)
    return words[0].lower() if words else ""


def _last_number(text: str) -> str:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else ""


MATCH_MODES = {"first_word": _first_word, "last_number": _last_number, "full": lambda text: text.strip()}


def exact_match(column: str = "answer", mode: str = "first_word") -> Callable[..., list[float]]:
    """1.0 when the completion matches the ``column`` value, else 0.0: ``first_word`` compares first words
    (case-insensitive), ``last_number`` the last number of each (GSM8K's ``#### 72``), ``full`` the stripped texts."""
    if mode not in MATCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(MATCH_MODES)}, got {mode!r}")
    key = MATCH_MODES[mode]

    def reward(completions: list[Any], **columns: Any) -> list[float]:
        answers = columns[column]
        out = []
        for completion, answer in zip(completions, answers):
            expected = key(str(answer))
            out.append(float(bool(expected) and key(text_of(completion)) == expected))
        return out

    reward.__name__ = f"exact_match_{column}"
    reward.columns = (column,)  # type: ignore[attr-defined]
    return reward


def regex(pattern: str) -> Callable[..., list[float]]:
    """1.0 when ``re.search(pattern, completion)`` finds a match (a format reward), else 0.0."""
    compiled = re.compile(pattern)

    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [float(compiled.search(text_of(c)) is not None) for c in completions]

    reward.__name__ = "regex"
    return reward


def length(target: int = 200) -> Callable[..., list[float]]:
    """``-|len(text) - target| / target``: 0 at ``target`` characters, negative the further away."""
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")

    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [-abs(len(text_of(c)) - target) / target for c in completions]

    reward.__name__ = "length"
    return reward


BUILTIN: dict[str, Callable[..., Callable[..., list[float]]]] = {"exact_match": exact_match, "regex": regex,
                                                                    "length": length}


@dataclass
class RewardSpec:
    """One resolved entry of ``task_options.rewards``."""

    name: str
    function: Callable[..., Any]
    weight: float = 1.0
    columns: tuple[str, ...] = field(default_factory=tuple)


def _columns_of(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Dataset columns a function names as parameters (those without defaults, beyond TRL's own arguments)."""
    declared = getattr(fn, "columns", None)
    if declared is not None:
        return tuple(declared)
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.default is p.empty and p.name not in TRAINER_ARGS)


def _import(name: str, where: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module
        raise RecipeError(f"reward function {name!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}",
                          where=where, fix="check the module path (importable from the current directory or "
                                           "installed), or use a built-in: " + ", ".join(BUILTIN)) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError(f"reward function {name!r}: {module_name} has no callable {attr!r}", where=where,
                          fix="name a function as module:function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "completions" not in params and not takes_kwargs:
        raise RecipeError(f"reward function {name!r} does not accept `completions`", where=where,
                          fix="define it as f(completions, **kwargs) -> list[float] (TRL's reward signature; dataset "
                              "columns arrive as keyword arguments)")
    if not takes_kwargs:
        raise RecipeError(f"reward function {name!r} takes no **kwargs; the trainer passes prompts, completion ids "
                          "and every dataset column", where=where, fix="add **kwargs to its parameters")
    return fn


def _checked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its result checked on every call: one float (or None) per completion, errors naming it."""

    def reward(*args: Any, **kwargs: Any) -> list[float | None]:
        completions = kwargs.get("completions", args[1] if len(args) > 1 else [])
        try:
            values = fn(*args, **kwargs)
        except Exception as exc:
            raise RecipeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}",
                              where="task_options.rewards", fix="fix the function (it gets completions and the "
                              "dataset's columns as keyword arguments)") from exc
        values = list(values) if values is not None else []
        if len(values) != len(completions) or not all(v is None or isinstance(v, (int, float)) for v in values):
            raise RecipeError(f"reward function {name!r} returned {len(values)} values of types "
                              f"{sorted({type(v).__name__ for v in values})} for {len(completions)} completions",
                              where="task_options.rewards", fix="return one float (or None) per completion")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = getattr(fn, "__name__", name).replace(".", "_")
    return reward


def resolve(entries: list[Any], where: str = "task_options.rewards") -> list[RewardSpec]:
    """Resolve recipe entries (a name, or ``{name, weight, ...options}``) into checked reward functions."""
    if not entries:
        raise RecipeError("the grpo task needs at least one reward function", where=where,
                          fix=f"e.g. rewards: [exact_match] (built-ins: {', '.join(BUILTIN)}, or module:function)")
    specs = []
    for i, entry in enumerate(entries):
        key = f"{where}[{i}]"
        options = {"name": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
        if options is None or "name" not in options:
            raise RecipeError(f"invalid reward entry {entry!r}", where=key,
                              fix="a name (exact_match, regex, length, module:function) or {name: ..., weight: ...}")
        name = str(options.pop("name"))
        weight = options.pop("weight", 1.0)
        if not isinstance(weight, (int, float)):
            raise RecipeError(f"reward weight must be a number, got {weight!r}", where=f"{key}.weight")
        if name in BUILTIN:
            try:
                fn = BUILTIN[name](**options)
            except (TypeError, ValueError, re.error) as exc:
                params = ", ".join(inspect.signature(BUILTIN[name]).parameters)
                raise RecipeError(f"invalid options for reward {name!r}: {exc}", where=key,
                                  fix=f"{name} takes: {params}") from None
        elif ":" in name:
            if options:
                raise RecipeError(f"reward {name!r}: a user function takes no options ({sorted(options)})", where=key,
                                  fix="read settings inside the function, or wrap it in a module-level function")
            fn = _import(name, key)
        else:
            raise RecipeError(f"unknown reward function {name!r}", where=key,
                              fix=f"use a built-in ({', '.join(BUILTIN)}) or module:function")
        specs.append(RewardSpec(name, _checked(name, fn), float(weight), _columns_of(fn)))
    return specs
