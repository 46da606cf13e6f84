"""Recipes: YAML -> validated :class:`Recipe`, command-line overrides, resolved-recipe dump.

    tokplug run recipes/quickstart.yaml train.max_steps=5 ~adapter

Overrides: ``a.b=value`` sets a key (the value is parsed as YAML, so ``1e-4``, ``true`` and ``[1, 2]`` keep their
types; quote to force a string), ``~a.b`` deletes it. Relative paths in a recipe resolve against the current
working directory, like ``datasets.load_dataset``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from .errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """The model to fine-tune: any Hub id, a local folder, or a ``toy://`` embedded default."""

    name_or_path: str = Field(description="Hub id, local folder, or toy://NAME (embedded default).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype at load time; mixed precision is set in `train` (bf16/fp16)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from name_or_path.")
    trust_remote_code: StrictBool = Field(
        False, description="Allow model code from the Hub (LLaDA, Dream). Off by default; `tokplug validate` never "
        "runs remote code (it reads config.json only), `tokplug run` does.")
    attn_implementation: str | None = Field(None, description="e.g. sdpa or flash_attention_2 on GPU.")
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Pad the embedding matrix to a multiple of this when plugins add tokens."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra from_pretrained keyword arguments.")


class DatasetSpec(Strict):
    """One dataset split, with ``datasets.load_dataset`` arguments (or ``toy://NAME`` for bundled data)."""

    path: str = Field(description="toy://NAME, a Hub dataset id, a builder name (json, csv, text) or a folder.")
    name: str | None = Field(None, description="Dataset configuration name.")
    data_files: str | list[str] | dict[str, Any] | None = Field(None, description="Files for builder datasets.")
    split: str = Field("train", description="Split to load.")
    revision: str | None = Field(None, description="Hub revision.")


# file extension -> datasets builder, for `data.train: file.jsonl`
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
                 ".txt": "text"}


class DataSpec(Strict):
    """Training and evaluation data and how it is tokenized."""

    train: DatasetSpec | None = Field(
        None, description="Training split (a string is shorthand for {path: ...}; a data file such as data/train.jsonl "
        "loads with its builder: json, csv, parquet, arrow, text).")
    eval: DatasetSpec | None = Field(None, description="Evaluation split.")
    eval_size: float | int | None = Field(
        None, description="Hold out this fraction (or number) of train examples for evaluation when eval is unset."
    )
    format: Literal["auto", "chat", "prompt_completion", "text"] = Field(
        "auto", description="auto detects messages / prompt+completion / text columns."
    )
    text_field: str = Field("text", description="Column holding raw text for the text format.")
    max_length: int | None = Field(512, ge=1, description="Truncate tokenized examples to this many tokens.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    assistant_only_loss: StrictBool = Field(
        False, description="Chat data: train only on assistant turns (needs {% generation %} in the template)."
    )
    completion_only_loss: StrictBool | None = Field(
        None, description="Prompt/completion data: train only on the completion (default: true, like TRL)."
    )

    @field_validator("eval_size")
    @classmethod
    def _eval_size(cls, value: Any) -> Any:
        """A fraction in (0, 1) or a whole number of examples (>= 1), like ``train_test_split``'s ``test_size``."""
        if value is None:
            return value
        if isinstance(value, float):
            if 0 < value < 1:
                return value
            whole = f"; write {int(value)} for that many examples" if value.is_integer() and value >= 1 else ""
            raise ValueError(f"{value} is not a fraction strictly between 0 and 1{whole}")
        if value < 1:
            raise ValueError("give a fraction in (0, 1) or a number of examples >= 1")
        return value

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``train: x`` is ``{path: x}``; a data file (``x.jsonl``, ``x.csv``, ...) as ``path`` loads with its builder."""
        if isinstance(value, str):
            value = {"path": value}
        if isinstance(value, dict) and isinstance(value.get("path"), str) and value.get("data_files") is None:
            builder = FILE_BUILDERS.get(os.path.splitext(value["path"])[1].lower())
            if builder is not None:
                value = {**value, "path": builder, "data_files": value["path"]}
        return value


class AdapterSpec(Strict):
    """A PEFT adapter; omit the block (or ``~adapter``) for full fine-tuning."""

    type: Literal["lora"] = Field("lora", description="Adapter type (PEFT).")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get LoRA.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra peft.LoraConfig arguments.")


class HubSpec(Strict):
    """Upload the finished run with huggingface_hub (needs a token: HF_TOKEN or `hf auth login`)."""

    repo_id: str | None = Field(None, description="Repository to push to at the end of the run; null: no push.")
    private: StrictBool = Field(True, description="Create the repository as private.")
    revision: str | None = Field(None, description="Branch to push to.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        """Checked here, not after training: ``user/name`` (or ``name``) with letters, digits, ``-_.``."""
        if value is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(value)
            except HFValidationError as exc:
                raise ValueError(f"not a valid Hub repository id ({exc})") from None
        return value


class Recipe(Strict):
    """A fine-tuning run: task, model, data, plugins (in order), adapter, trainer arguments, outputs."""

    task: str = Field(description="Runner name: causal_lm_sft, causal_lm_prepare, or one a plugin registers.")
    model: ModelSpec = Field(description="The model to start from (see the model section).")
    data: DataSpec | None = Field(None, description="Datasets; required by training tasks.")
    plugins: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="Plugins in the order their hooks run; each block is the plugin's config."
    )
    adapter: AdapterSpec | None = Field(None, description="PEFT adapter; null means full fine-tuning.")
    train: dict[str, Any] = Field(
        default_factory=dict, description="Trainer arguments (TRL SFTConfig / TrainingArguments fields)."
    )
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the task itself, validated by the runner (see the task's docs)."
    )
    output_dir: str = Field("runs/{task}", description="Run folder; {task} is replaced by the task name.")
    overwrite: StrictBool = Field(
        False, description="Replace a previous run in output_dir: deletes only what tokplug runs wrote there (never an "
        "unrelated folder, the current directory, or the run whose own recipe is being run).")
    hub: HubSpec = Field(default_factory=HubSpec, description="Upload at the end of the run (see the hub section).")

    @field_validator("train")
    @classmethod
    def _seed(cls, value: dict[str, Any]) -> dict[str, Any]:
        seed = value.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"train.seed must be a whole number, got {seed!r}")
        return value

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output_dir is empty")
        return value

    @model_validator(mode="after")
    def _fill(self) -> Recipe:
        self.output_dir = self.output_dir.replace("{task}", self.task)
        return self

    @property
    def seed(self) -> int:
        return int(self.train.get("seed", 42))


# --------------------------------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars where 1.1 bites recipes: ``1e-4`` is a float (1.1 wants ``1.0e-4``), and
    only ``true``/``false`` are booleans (1.1 also reads ``no``/``yes``/``on``/``off``, but ``eval_strategy: no``
    is a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """Mappings refuse duplicate keys (YAML would silently keep the last one)."""
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); a key may appear once",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(raw: str) -> Any:
    try:
        return _yaml_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError):
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` and ``~a.b`` overrides to a nested dict (a copy is returned)."""
    data = copy.deepcopy(data)
    for item in overrides:
        where = f"override {item!r}"
        if item.startswith("~"):
            keys = item[1:].split(".")
            node = data
            for key in keys[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict) or keys[-1] not in node:
                raise RecipeError(
                    f"cannot delete {item[1:]!r}: the key is not in the recipe",
                    where=where,
                    fix="check the key path (`tokplug validate RECIPE` shows the resolved recipe)",
                )
            del node[keys[-1]]
            continue
        if "=" not in item:
            raise RecipeError(
                "an override must look like `key.path=value` or `~key.path`", where=where, fix="e.g. train.max_steps=5"
            )
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".")]
        if not all(keys):
            raise RecipeError(f"empty key in {path!r}", where=where, fix="e.g. train.max_steps=5")
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = _parse_value(raw)
    return data


def _format_validation(exc: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent_model = _model_at(err["loc"][:-1])
            options = list(parent_model.model_fields) if parent_model else []
            close = difflib.get_close_matches(str(err["loc"][-1]), options, n=1)
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if options:
                msg += f"; valid keys here: {', '.join(options)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{loc}: {msg}" if loc else msg)
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    key = ".".join(str(p) for p in first)
    return RecipeError(
        "invalid recipe:\n  " + "\n  ".join(lines),
        where=f"{source}" + (f": {key}" if key else ""),
        fix="correct the key(s) above; docs/recipes.md lists every key with its type and default",
    )


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def load_recipe_dict(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file not found: {path}",
            fix="give a path to a YAML recipe, or copy a built-in one with `tokplug recipes cp NAME DEST`",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start}): is this a recipe?", where=str(path),
                          fix="save the recipe as UTF-8 YAML") from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror or exc}", where=str(path)) from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"not valid YAML{at}: {getattr(exc, 'problem', exc)}", where=str(path)) from None
    except RecursionError:
        raise RecipeError("the YAML is nested too deeply to be a recipe", where=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping (task:, model:, ...)", where=str(path))
    return data


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None
    except RecursionError:
        raise RecipeError("the recipe is nested too deeply", where=source) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (plugin blocks are validated later, by each plugin's config class)."""
    data = load_recipe_dict(path)
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) + (" (with command-line overrides)" if overrides else "")
    return parse_recipe(data, source)


def dump_resolved(recipe: Recipe, plugin_configs: dict[str, dict[str, Any]]) -> str:
    """The recipe with every default filled in, including each plugin's full validated config; credentials
    (``model.kwargs.token``, ``train.hub_token``, any key named like a token, password, secret or API key) are
    written as ``***``, since this text goes into run folders and model cards that get pushed."""
    from .rundir import redact

    data = recipe.model_dump(mode="json")
    data["plugins"] = {name: plugin_configs.get(name, {}) for name in recipe.plugins}
    return yaml.safe_dump(redact(data), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------------------
# reference documentation (docs/recipes.md is generated from the schema; a test checks it is current)
# --------------------------------------------------------------------------------------------------------------

_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", Recipe), ("model", ModelSpec), ("data", DataSpec), ("data.train / data.eval", DatasetSpec),
    ("adapter", AdapterSpec), ("hub", HubSpec),
]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"hf_tokplug\.recipe\.", "", text).replace("NoneType", "None")


def reference_markdown() -> str:
    """The recipe reference (docs/recipes.md), rendered from the pydantic models."""
    lines = [
        "# Recipe reference", "",
        "<!-- generated by scripts/gen_docs.py from hf_tokplug/recipe.py; do not edit by hand -->", "",
        "A recipe is YAML. Unknown keys are errors. Override any key on the command line with `key.path=value`",
        "(the value is parsed as YAML) and delete one with `~key.path`:", "",
        "```bash", "tokplug run recipes/quickstart.yaml train.max_steps=10 train.learning_rate=1e-4 ~data.eval", "```", "",
        "Relative paths resolve against the current directory. `1e-4` is a float and only `true`/`false` are",
        "booleans (so `eval_strategy: no` stays the string `no`). Each plugin's block under `plugins:` is validated by",
        "the plugin's own config class (see the plugin's page); `train:` takes the fields of TRL's `SFTConfig` (or the",
        "task's trainer arguments), checked by name and type before anything loads. The host sets",
        "`dataset_kwargs.skip_prepare_dataset` and `remove_unused_columns: false` (it tokenizes itself) and defaults",
        "`bf16`/`use_cpu` to what the machine supports (and `ddp_find_unused_parameters: false` when a plugin adds",
        "loss terms); `train.resume_from_checkpoint: true` resumes from the latest complete checkpoint in `output_dir`.",
        "`task_options:` holds options of the task itself (e.g. `masked_diffusion_sft`'s `pad_to_length`), validated",
        "by the task.", "",
    ]
    for title, model in _SECTIONS:
        lines += [f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            default = "required" if field.is_required() else (
                "{}" if field.default_factory is not None else f"`{field.default!r}`"
            )
            desc = (field.description or "").replace("|", "\\|")
            kind = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{key}` | `{kind}` | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)
