"""Preference and RL tasks on TRL's own trainers: ``preference_dpo`` (DPOTrainer), ``reward_model``
(RewardTrainer) and ``grpo`` (GRPOTrainer). ``train:`` goes to the trainer's config (DPOConfig, RewardConfig,
GRPOConfig), so its loss types, beta, reference-model options, generation settings... all work.

    tokplug run recipes/dpo.yaml
    tokplug run recipes/reward.yaml
    tokplug run recipes/grpo.yaml

Data (TRL's formats): ``preference_dpo`` and ``reward_model`` take ``prompt`` / ``chosen`` / ``rejected`` (explicit
prompt) or conversational ``chosen`` / ``rejected`` messages (implicit prompt); ``grpo`` takes ``prompt`` plus any
columns its reward functions read. The examples are tokenized with TRL's own preparation (``_prepare_dataset`` of
the trainer), so ``tokplug_prepare_dataset`` and ``tokplug preview`` see what the trainer trains on.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import toy
from ..errors import RecipeError
from ..lifecycle import Run
from ..modeling import is_peft
from ..task import Runner
from ..traits import TaskTraits
from .causal_lm import CausalLMSFT, precision_defaults


class _TRLTask(CausalLMSFT):
    """Shared parts: a causal LM (or its sequence-classification form) on one TRL trainer."""

    config_name: str  # the trl config class

    def read_data(self, ctx: Run) -> dict[str, Any]:
        return Runner.read_data(self, ctx)  # TRL's columns (each task checks its own), not SFT's text formats

    def training_args_class(self) -> type:
        import trl

        return getattr(trl, self.config_name)

    def trl_arguments(self, ctx: Run) -> Any:
        """The trainer's config from ``train:`` (built once: data preparation, collator and trainer share it)."""
        if getattr(self, "_trl_args", None) is None:
            self._trl_args = self._trl_arguments(ctx)
        return self._trl_args

    def _trl_arguments(self, ctx: Run) -> Any:
        train = self.recipe.train
        forced: dict[str, Any] = precision_defaults(train)
        data = self.recipe.data
        if "max_length" not in train and data is not None and data.max_length is not None and self.config_name != "GRPOConfig":
            forced["max_length"] = data.max_length
        return self.trainer_arguments(ctx, **forced)

    def require_columns(self, raw: dict[str, Any], *groups: tuple[str, ...]) -> None:
        """Each split has one of the column ``groups`` (e.g. explicit or implicit prompt), else a clear error."""
        for split, ds in raw.items():
            columns = set(ds.column_names)
            if not any(set(group) <= columns for group in groups):
                wanted = " or ".join("/".join(g) for g in groups)
                raise RecipeError(f"task {self.task!r} needs columns {wanted}; the {split} data has {sorted(columns)}",
                                  where=f"{self.source}: data.{split}",
                                  fix="rename the columns (TRL's preference format: prompt, chosen, rejected)")


class DPOOptions(BaseModel):
    """``task_options`` of preference_dpo.

    Args:
        ref_model: the reference model: a Hub id or folder with the policy's tokenizer. Default: the policy itself
            with its adapter disabled (LoRA), or a frozen copy of the prepared initial model (full fine-tuning).
    """

    model_config = ConfigDict(extra="forbid")
    ref_model: str | None = Field(None, description="Reference model (Hub id or folder); default: see above.")


class PreferenceDPO(_TRLTask):
    task = "preference_dpo"
    description = "DPO (and TRL's other preference losses) on DPOTrainer: prompt/chosen/rejected pairs; LoRA or full."
    config_name = "DPOConfig"
    options_class = DPOOptions
    traits = TaskTraits(model_kind="causal_lm", label_shift=1, batch_fields=("input_ids", "attention_mask",
                        "completion_mask"), roles=("chosen", "rejected"), generates="text", token_weights=True)

    def check(self, offline: bool) -> None:
        super().check(offline)
        ref = self.options.ref_model
        if ref is None:
            return
        spec = self.recipe.model
        try:
            policy = _tokenizer(spec.tokenizer or spec.name_or_path, offline)
            theirs = _tokenizer(ref, offline)
        except Exception as exc:
            if offline:
                self.notes.append(f"reference tokenizer of {ref!r} not checked (offline): {exc}")
                return
            raise RecipeError(f"cannot load the tokenizer of the reference model {ref!r}: {exc}",
                              where=f"{self.source}: task_options.ref_model", fix="check the Hub id or folder") from None
        if policy.get_vocab() != theirs.get_vocab():
            raise RecipeError(f"the reference model {ref!r} has another tokenizer than the policy "
                              f"({len(theirs)} vs {len(policy)} tokens)", where=f"{self.source}: task_options.ref_model",
                              fix="use a reference trained with the policy's tokenizer, or drop ref_model")

    def read_data(self, ctx: Run) -> dict[str, Any]:
        raw = super().read_data(ctx)
        self.require_columns(raw, ("prompt", "chosen", "rejected"), ("chosen", "rejected"))
        return raw

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        from trl import DPOTrainer

        args = self.trl_arguments(ctx)
        shim = SimpleNamespace(_tokenizer=ctx.tokenizer)  # all TRL's preparation reads from the trainer
        return {split: DPOTrainer._prepare_dataset(shim, ds, ctx.tokenizer, args, split) for split, ds in raw.items()}

    def base_collator(self, ctx: Run) -> Any:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        args = self.trl_arguments(ctx)
        return DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id, max_length=args.max_length,
                                         truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)

    def reference(self, ctx: Run) -> Any:
        if self.options.ref_model is not None:
            import transformers

            spec = self.recipe.model
            return transformers.AutoModelForCausalLM.from_pretrained(toy.resolve(self.options.ref_model), dtype=spec.dtype)
        if is_peft(ctx.model):
            return None  # DPOTrainer uses the policy with its adapter disabled
        ref = copy.deepcopy(ctx.model)  # the prepared initial model (plugin rows, resized embeddings included)
        ref.requires_grad_(False)
        return ref.eval()

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        from trl import DPOTrainer

        if ctx.hooks.has("tokplug_token_weights") and self.trl_arguments(ctx).precompute_ref_log_probs:
            raise RecipeError("token weights multiply the reference's per-token log-probs too; precomputed reference "
                              "log-probs are sums without them", where=f"{self.source}: train.precompute_ref_log_probs",
                              fix="set train.precompute_ref_log_probs: false with a token-weight plugin")
        trainer = DPOTrainer(model=ctx.model, ref_model=self.reference(ctx), args=self.trl_arguments(ctx),
                             data_collator=collator, train_dataset=train, eval_dataset=evald,
                             processing_class=ctx.tokenizer, callbacks=callbacks)
        if ctx.hooks.has("tokplug_prepare_dataset"):
            # DPOTrainer re-tokenized the text columns (the same ids as the host's); a plugin changed the examples, so
            # train on the host's (and recompute precomputed reference log-probs on them)
            args = trainer.args
            for attr, data, size in (("train_dataset", train, args.per_device_train_batch_size),
                                     ("eval_dataset", evald, args.per_device_eval_batch_size)):
                if data is None:
                    continue
                if args.precompute_ref_log_probs:
                    data = trainer._precompute_ref_logps(data, attr.split("_")[0], args.precompute_ref_batch_size or size)
                setattr(trainer, attr, data)
        return trainer


class RewardModel(_TRLTask):
    task = "reward_model"
    description = "A reward model (sequence-classification head on a causal LM) on RewardTrainer: chosen/rejected pairs."
    config_name = "RewardConfig"
    auto_class = "AutoModelForSequenceClassification"
    model_mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    traits = TaskTraits(model_kind="causal_classifier", label_shift=None, batch_fields=("input_ids", "attention_mask"),
                        roles=("chosen", "rejected"))

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def load_model(self, ctx: Run) -> Any:
        from transformers import set_seed

        set_seed(self.recipe.seed)  # the new score head's initialisation: same recipe, same head
        return super().load_model(ctx)

    def lora_config(self) -> Any:
        config = super().lora_config()
        config.task_type = "SEQ_CLS"  # PEFT keeps the new score head trainable and saved
        return config

    def read_data(self, ctx: Run) -> dict[str, Any]:
        raw = super().read_data(ctx)
        self.require_columns(raw, ("chosen", "rejected"))
        return raw

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        from trl import RewardTrainer

        args = self.trl_arguments(ctx)
        return {split: RewardTrainer._prepare_dataset(None, ds, ctx.tokenizer, args, split) for split, ds in raw.items()}

    def base_collator(self, ctx: Run) -> Any:
        from trl.trainer.reward_trainer import DataCollatorForPreference

        return DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        from trl import RewardTrainer

        return RewardTrainer(model=ctx.model, args=self.trl_arguments(ctx), data_collator=collator,
                             train_dataset=train, eval_dataset=evald, processing_class=ctx.tokenizer,
                             callbacks=callbacks)

    @classmethod
    def pretrained_model_kwargs(cls, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"num_labels": 1}


class GRPOOptions(BaseModel):
    """``task_options`` of grpo.

    Args:
        rewards: reward functions (:mod:`hf_tokplug.rewards`): built-in names (``exact_match``, ``regex``,
            ``length``) or ``module:function``, each optionally ``{name: ..., weight: ..., <options>}``.
    """

    model_config = ConfigDict(extra="forbid")
    rewards: list[Any] = Field(default_factory=lambda: ["exact_match"], description="Reward functions.")


class GRPO(_TRLTask):
    task = "grpo"
    description = "GRPO on GRPOTrainer: prompts, reward functions named in the recipe (built-in or module:function)."
    config_name = "GRPOConfig"
    options_class = GRPOOptions
    # batches are built from generations: the data hooks do not fire (there is no collator to wrap)
    traits = TaskTraits(model_kind="causal_lm", label_shift=1, batch_fields=("prompt_ids", "prompt_mask",
                        "completion_ids", "completion_mask", "advantages"), roles=("policy",), dataset_hooks=False,
                        generates="text", token_weights=True)

    def check(self, offline: bool) -> None:
        super().check(offline)
        from ..rewards import resolve

        self.rewards = resolve(self.options.rewards, where=f"{self.source}: task_options.rewards")
        if "reward_weights" in self.recipe.train:
            raise RecipeError("set reward weights per function (task_options.rewards: [{name: ..., weight: ...}])",
                              where=f"{self.source}: train.reward_weights", fix="move the weights into task_options")

    def read_data(self, ctx: Run) -> dict[str, Any]:
        raw = super().read_data(ctx)
        needed = tuple(sorted({"prompt", *(c for spec in self.rewards for c in spec.columns)}))
        self.require_columns(raw, needed)
        return raw

    def _trl_arguments(self, ctx: Run) -> Any:
        args = super()._trl_arguments(ctx)
        args.reward_weights = [spec.weight for spec in self.rewards]
        return args

    def examples(self, ctx: Run, raw: dict[str, Any]) -> dict[str, Any]:
        return dict(raw)  # prompts: GRPOTrainer tokenizes them when it generates

    def make_trainer(self, ctx: Run, train: Any, evald: Any, collator: Any, callbacks: list[Any]) -> Any:
        from trl import GRPOTrainer

        args = self.trl_arguments(ctx)
        if ctx.hooks.has("tokplug_token_weights") and (args.num_iterations != 1 or args.beta != 0.0):
            # the old-policy and reference log-probs are computed at generation time, without the weights
            key = "num_iterations" if args.num_iterations != 1 else "beta"
            raise RecipeError("token weights apply to GRPO's on-policy term only (num_iterations: 1, beta: 0)",
                              where=f"{self.source}: train.{key}", fix="set train.num_iterations: 1 and train.beta: 0.0")
        return GRPOTrainer(model=ctx.model, reward_funcs=[spec.function for spec in self.rewards], args=args,
                           train_dataset=train, eval_dataset=evald, processing_class=ctx.tokenizer,
                           callbacks=callbacks)


def _tokenizer(location: str, offline: bool) -> Any:
    """A tokenizer only (no weights): ``toy://`` ones, packaged models, Hub ids (cached only when ``offline``)."""
    if toy.is_toy(location):
        return toy.load_tokenizer(location)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.resolve(location), local_files_only=offline)
