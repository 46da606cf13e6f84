"""Loading recipe datasets and tokenizing them into ``input_ids`` + ``labels`` (TRL's SFT semantics).

The host tokenizes instead of leaving it to ``SFTTrainer`` so that ``tokplug_prepare_dataset`` sees the exact
training examples, and ``tokplug preview`` shows what the trainer will see. Labels follow TRL: prompt/completion
data trains on the completion only (unless ``completion_only_loss: false``), chat data on the whole conversation
unless ``assistant_only_loss: true``; an EOS is appended to non-chat text.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from trl.data_utils import common_prefix_length, is_conversational

from . import toy
from .errors import RecipeError
from .recipe import DatasetSpec, DataSpec


def _local_files(spec: DatasetSpec) -> list[str]:
    files = spec.data_files
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        out: list[str] = []
        for value in files.values():
            out.extend([value] if isinstance(value, str) else list(value))
        return out
    return list(files)


def check_dataset_spec(spec: DatasetSpec, key: str, source: str) -> None:
    """Fail before loading anything when local data files are missing."""
    if toy.is_toy(spec.path):
        if spec.path[len(toy.SCHEME):] not in toy.TOY_DATASETS:
            raise RecipeError(
                f"unknown embedded dataset {spec.path!r}",
                where=f"{source}: {key}.path",
                fix=f"use one of: {', '.join(toy.SCHEME + n for n in toy.TOY_DATASETS)}",
            )
        return
    for pattern in _local_files(spec):
        if "://" in pattern:
            continue
        matches = glob.glob(pattern)
        if not matches:
            raise RecipeError(
                f"data file not found: {pattern} (looked in {os.path.abspath(pattern)})",
                where=f"{source}: {key}.data_files",
                fix="relative paths resolve against the current directory; check the path or run from the right folder",
            )
        if spec.path in TEXT_BUILDERS:
            for path in matches:
                check_text_file(path, f"{source}: {key}")
    # `org/name` is a Hub id; only an explicit local path (./x, ../x, /x, ~/x) can be checked here
    if spec.data_files is None and spec.path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec.path)):
        raise RecipeError(
            f"dataset folder not found: {spec.path}", where=f"{source}: {key}.path", fix="check the path"
        )


TEXT_BUILDERS = ("json", "csv", "text")  # builders that read text files (checked for UTF-8 before parsing)


def check_text_file(path: str, where: str) -> None:
    """A data file for a text builder must be UTF-8 text: binary input is refused here (pyarrow's JSON reader can
    crash the process on it)."""
    if os.path.isdir(path):
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    problem = None
    if b"\x00" in head:
        problem = "holds NUL bytes: it is a binary file, not text"
    else:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if len(head) < 1 << 16 or exc.start < len(head) - 4:  # not a character cut by the sample's end
                problem = f"is not UTF-8 text (byte {exc.start} is {head[exc.start]:#04x})"
    if problem is None and path.endswith((".jsonl", ".json")):
        problem = _json_lines_problem(head, complete=len(head) < 1 << 16)
    if problem:
        raise RecipeError(f"data file {path} {problem}", where=where,
                          fix="convert the file to UTF-8 text (json/jsonl: one JSON object per line)")


def _json_lines_problem(head: bytes, complete: bool) -> str | None:
    """JSON Lines rows must be objects (pyarrow's reader can crash on other rows); a file that starts with ``[`` is
    one JSON array, left to the loader."""
    import json

    text = head.decode("utf-8", errors="ignore")
    if text.lstrip().startswith("["):
        return None
    lines = text.splitlines()
    if not complete:
        lines = lines[:-1]  # the sample may cut the last line
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            if number == 1 and text.lstrip().startswith("{"):  # one (pretty-printed) JSON document?
                try:
                    return None if not complete or isinstance(json.loads(text), dict) else "is not a JSON object"
                except ValueError:
                    pass
            return f"line {number} is not valid JSON ({exc.msg})"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object (one {{...}} per line)"
    return None


def is_local(spec: DatasetSpec) -> bool:
    """The split loads without the network: an embedded ``toy://`` set, local data files or a local folder."""
    if toy.is_toy(spec.path):
        return True
    files = _local_files(spec)
    if files:
        return all("://" not in f and glob.glob(f) for f in files)
    return spec.path.startswith((".", "/", "~")) and os.path.exists(os.path.expanduser(spec.path))


def load_split(spec: DatasetSpec, key: str = "data.train", source: str = "<recipe>") -> Any:
    """One split; a file that does not parse, an unknown split or a dataset that cannot be reached is a
    :class:`RecipeError` naming the key (not the loader's traceback)."""
    if toy.is_toy(spec.path):
        return toy.load_toy_dataset(spec.path, spec.split)
    from datasets import load_dataset

    import logging

    what = ", ".join(_local_files(spec)) or spec.path
    quiet = logging.getLogger("datasets")  # its builders log the parser's traceback before raising: one message
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ds = load_dataset(spec.path, name=spec.name, data_files=spec.data_files, split=spec.split, revision=spec.revision)
    except Exception as exc:
        text = describe_load_error(exc)
        if "split" in text.lower() and spec.split not in ("train",):
            fix = f"check {key}.split (a split the dataset has; `train` for plain data files)"
        else:
            fix = "check that the file is valid (json/jsonl: one JSON object per line, UTF-8) and the path is right"
        raise RecipeError(f"cannot read {what}: {text}", where=f"{source}: {key}", fix=fix) from None
    finally:
        quiet.setLevel(level)
    if len(ds) == 0:
        raise RecipeError(f"{what} holds no examples", where=f"{source}: {key}", fix="check the data file / split")
    return ds


def load_data(data: DataSpec, seed: int, source: str = "<recipe>") -> tuple[Any, Any | None]:
    """Train and eval datasets (eval may be held out from train with ``eval_size``)."""
    train = load_split(data.train, "data.train", source) if data.train is not None else None
    evald = load_split(data.eval, "data.eval", source) if data.eval is not None else None
    if evald is None and data.eval_size and train is not None:
        size = data.eval_size
        if isinstance(size, int) and size >= len(train) or len(train) < 2:
            raise RecipeError(f"data.eval_size {size} leaves no training examples ({len(train)} in data.train)",
                              where=f"{source}: data.eval_size", fix="hold out fewer examples, or give data.eval")
        parts = train.train_test_split(test_size=size, seed=seed)
        train, evald = parts["train"], parts["test"]
    if train is not None and data.max_samples is not None:
        train = train.select(range(min(data.max_samples, len(train))))
    return train, evald


def detect_format(example: dict[str, Any], data: DataSpec) -> str:
    if data.format != "auto":
        return data.format
    if "messages" in example:
        return "chat"
    if "prompt" in example and "completion" in example:
        return "prompt_completion"
    if data.text_field in example:
        return "text"
    raise RecipeError(
        f"cannot tell the data format from the columns {sorted(example)}",
        where="data.format",
        fix=f"use columns `messages`, `prompt`+`completion` or `{data.text_field}`, or set data.format / data.text_field",
    )


def tokenize_example(example: dict[str, Any], tokenizer: Any, data: DataSpec, fmt: str) -> dict[str, list[int]]:
    eos = tokenizer.eos_token or ""
    if fmt == "chat":
        out = tokenizer.apply_chat_template(
            example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=data.assistant_only_loss
        )
        ids = list(out["input_ids"])
        if data.assistant_only_loss:
            mask = list(out["assistant_masks"])
            if 1 not in mask:
                raise RecipeError(
                    "assistant_only_loss is on, but the chat template marks no assistant tokens",
                    where="data.assistant_only_loss",
                    fix="use a template with {% generation %} markers, or set data.assistant_only_loss: false",
                )
            labels = [t if m else -100 for t, m in zip(ids, mask)]
        else:
            labels = list(ids)
    elif fmt == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if is_conversational(example):
            prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
            ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
            prompt_ids = prompt_ids["input_ids"]
        else:
            if eos and not completion.endswith(eos):
                completion = completion + eos
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + completion)["input_ids"]
        ids = list(ids)
        n_prompt = common_prefix_length(list(prompt_ids), ids)
        only = True if data.completion_only_loss is None else data.completion_only_loss
        labels = [-100] * n_prompt + ids[n_prompt:] if only else list(ids)
    else:
        text = example[data.text_field]
        if eos and not text.endswith(eos):
            text = text + eos
        ids = list(tokenizer(text)["input_ids"])
        labels = list(ids)
    if data.max_length is not None:
        ids, labels = ids[: data.max_length], labels[: data.max_length]
    return {"input_ids": ids, "labels": labels}


def tokenize_dataset(dataset: Any, tokenizer: Any, data: DataSpec) -> Any:
    """Add ``input_ids`` and ``labels`` columns; drop examples left with no label after truncation."""
    if len(dataset) == 0:
        raise RecipeError("the dataset is empty", where="data", fix="check the data files / split")
    fmt = detect_format(dataset[0], data)
    out = dataset.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer, "data": data, "fmt": fmt},
        desc="Tokenizing",
        load_from_cache_file=False,
        keep_in_memory=True,
    )
    return out.filter(lambda ex: any(x != -100 for x in ex["labels"]), keep_in_memory=True, desc="Dropping empty")

def check_text_columns(dataset: Any, data: Any, split: str, source: str) -> None:
    """The columns ``data.format`` (or the detected format) needs exist in this split."""
    columns = set(dataset.column_names)
    needed = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": (data.text_field,)}
    if len(dataset) == 0:
        raise RecipeError(f"the {split} data has no examples", where=f"{source}: data.{split}",
                          fix="check the data files, the split and data.max_samples")
    if data.format == "auto":
        try:
            detect_format(dataset[0], data)
        except RecipeError as exc:
            raise RecipeError(exc.message, where=f"{source}: data.{split}", fix=exc.fix) from None
        return
    missing = [c for c in needed[data.format] if c not in columns]
    if missing:
        raise RecipeError(f"data.format is {data.format!r}, which needs column(s) {missing}; the {split} data has "
                          f"{sorted(columns)}", where=f"{source}: data.format",
                          fix="set data.format: auto (or the format the columns hold), or rename the columns")


def describe_load_error(exc: BaseException) -> str:
    """One line for a ``datasets`` failure (they chain the parser's error under a generic one)."""
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if inner is not exc and str(inner).strip():
        text += f" ({type(inner).__name__}: {str(inner).strip().splitlines()[0][:200]})"
    return text
