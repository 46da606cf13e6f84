"""The plugin-facing surface: everything a plugin (or an outside task) needs from the host, in one module.

    from hf_tokplug.plugin import Plugin, PluginConfig, hookimpl, PluginError, TaskTraits, add_tokens, TokenLoss

Every name here is also importable from ``hf_tokplug`` itself. Heavy parts (torch, transformers) load on first use.
Plugins import nothing else from ``hf_tokplug`` (a test checks the built-in ones and the tutorial plugin).

Writing a plugin:
    Plugin, PluginConfig       base classes (below); hookimpl marks hook implementations
    PluginError, RecipeError, TokPlugError     errors that say what, where and the fix
    TaskTraits, MODEL_KINDS    what the run's task is (``ctx.traits``); ``ctx.traits.require(...)`` in validate
    RunContext                 the type of ``ctx``
Tokens and rows:
    add_tokens, AddedToken, TokenInitRequest   add tokens (``tokplug_prepare_tokenizer``); token-init strategies
Training:
    TokenLoss, ForwardCapture, TokenBatch   loss terms (``tokplug_loss_terms``) and what they receive
    MainLoss                   a loss term that replaces the trainer's main loss (a method's own objective)
    FrozenLogProbs, reference_log_probs     a frozen model's (a preference trainer's reference's) per-token
                                            log-probs of a TokenBatch, cached per example (token-weight plugins)
Models:
    unwrap, peft_base, is_peft, is_tied, output_module_name      facts about (wrapped) models
    output_logits              the model's own logits from final hidden states (bias, logit_scale, softcapping)
    layer_attention            one no-gradient forward with one layer's attention probabilities (under sdpa)
    tokenizer_vocab, load_frozen_causal_lm     another model's vocabulary; a frozen scoring model (adapters merged)
    SD_ATTENTION_TARGETS, load_pipeline, save_unet_lora          Stable Diffusion LoRA targets, pipelines, LoRA files
Files and locations:
    local_folder               a local folder, or a Hub repo fetched into the cache (with a clear error)
    write_json_atomic, write_text_atomic       atomic writes; LOG_FILE (trainer_log.jsonl)
    resolve_location, load_tokenizer, is_toy, check_toy_location, cache_root, packaged_path   embedded defaults
Data and scores:
    load_data, load_split, DatasetSpec         recipe datasets; bits_per_byte (tokenizer-independent LM score)
    prepare_examples           a recipe's data phases without a model: the trainer's own examples, for offline scoring
Tasks (for plugins that register one):
    Runner, jsonable           the task base class (see :mod:`hf_tokplug.task`)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .errors import PluginError, RecipeError, TokPlugError
from .hookspecs import hookimpl
from .traits import MODEL_KINDS, TaskTraits

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily (see _LAZY)
    from .context import RunContext


class PluginConfig(BaseModel):
    """Base for plugin configs: unknown keys are rejected, so a typo in a recipe is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """A plugin: hook implementations (``@hf_tokplug.hookimpl`` methods) on one class.

    The entry point in the ``hf_tokplug`` group points at the class. The host builds one instance per run as
    ``cls(name=..., config=...)``, where ``config`` is an instance of ``config_class`` validated from the recipe's
    ``plugins.<name>`` block, so per-run state may live on ``self``. Setup hooks (``tokplug_register_*``) are
    called on the class, without an instance: declare them as ``@staticmethod``.

    Class attributes:
        config_class: pydantic model of the plugin's recipe block (derive from :class:`PluginConfig`).
            ``None`` means the plugin takes no options.
        citation: BibTeX of the method, copied into model cards.
        paper: a link to the method's paper, for ``tokplug plugins`` and model cards.
    """

    config_class: ClassVar[type[BaseModel] | None] = None
    citation: ClassVar[str | None] = None
    paper: ClassVar[str | None] = None

    def __init__(self, name: str, config: BaseModel | None = None):
        self.name = name
        self.config = config

    @property
    def where(self) -> str:
        """Where this plugin's options live in a recipe (``plugins.<name>``), for errors' ``where=``."""
        return f"plugins.{self.name}"

    def config_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, for the manifest."""
        return self.config.model_dump(mode="json") if self.config is not None else {}

    def log(self, ctx: RunContext, name: str, value: float, split: str = "train") -> None:
        """``ctx.log(self.name, name, value, split)``: logged as ``<plugin>/<name>`` in the next log line of ``split``."""
        ctx.log(self.name, name, value, split)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# name -> (module, attribute): loaded on first access
_LAZY: dict[str, tuple[str, str]] = {
    "RunContext": ("context", "RunContext"),
    "add_tokens": ("tokens", "add_tokens"),
    "AddedToken": ("tokens", "AddedToken"),
    "TokenInitRequest": ("tokens", "TokenInitRequest"),
    "TokenLoss": ("training", "TokenLoss"),
    "MainLoss": ("training", "MainLoss"),
    "ForwardCapture": ("training", "ForwardCapture"),
    "TokenBatch": ("training", "TokenBatch"),
    "FrozenLogProbs": ("training", "FrozenLogProbs"),
    "reference_log_probs": ("training", "reference_log_probs"),
    "unwrap": ("modeling", "unwrap"),
    "peft_base": ("modeling", "peft_base"),
    "is_peft": ("modeling", "is_peft"),
    "layer_attention": ("modeling", "layer_attention"),
    "tokenizer_vocab": ("hub", "tokenizer_vocab"),
    "load_frozen_causal_lm": ("hub", "load_frozen_causal_lm"),
    "is_tied": ("modeling", "is_tied"),
    "output_module_name": ("modeling", "output_module_name"),
    "output_logits": ("modeling", "output_logits"),
    "SD_ATTENTION_TARGETS": ("modeling", "SD_ATTENTION_TARGETS"),
    "load_pipeline": ("modeling", "load_pipeline"),
    "save_unet_lora": ("modeling", "save_unet_lora"),
    "local_folder": ("hub", "local_folder"),
    "write_json_atomic": ("rundir", "write_json_atomic"),
    "write_text_atomic": ("rundir", "write_text_atomic"),
    "LOG_FILE": ("rundir", "LOG_FILE"),
    "resolve_location": ("toy", "resolve"),
    "load_tokenizer": ("toy", "load_tokenizer"),
    "is_toy": ("toy", "is_toy"),
    "check_toy_location": ("toy", "check_location"),
    "cache_root": ("toy", "cache_root"),
    "packaged_path": ("toy", "packaged_path"),
    "load_data": ("data", "load_data"),
    "load_split": ("data", "load_split"),
    "DatasetSpec": ("recipe", "DatasetSpec"),
    "bits_per_byte": ("evaluation", "bits_per_byte"),
    "Runner": ("task", "Runner"),
    "jsonable": ("lifecycle", "jsonable"),
    "prepare_examples": ("lifecycle", "prepare_examples"),
}

__all__ = ["MODEL_KINDS", "Plugin", "PluginConfig", "PluginError", "RecipeError", "TaskTraits", "TokPlugError",
           "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
