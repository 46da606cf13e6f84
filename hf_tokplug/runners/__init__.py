"""The host's built-in tasks, registered like any plugin's: the ``hf_tokplug`` entry point names
:class:`BuiltinTasks`, whose ``tokplug_register_runners`` / ``tokplug_register_token_inits`` add them. The core
(``hf_tokplug.manager``, ``lifecycle``, ``cli``...) imports none of these modules; it finds tasks in
``hf_tokplug.manager.registries().runners``.

    causal_lm_sft, causal_lm_prepare     runners/causal_lm.py
    masked_diffusion_sft                 runners/masked_diffusion.py
    sequence_classification              runners/classification.py
    diffusion_lora, diffusion_generate   runners/diffusion_lora.py
    preference_dpo, reward_model, grpo   runners/preference.py (TRL's DPOTrainer, RewardTrainer, GRPOTrainer)
"""

from __future__ import annotations

from typing import Callable

from ..hookspecs import hookimpl
from ..plugin import Plugin
from ..task import Runner

__all__ = ["BuiltinTasks", "Runner"]


class BuiltinTasks(Plugin):
    """The host's tasks and generic token-init strategies (``mean``, ``normal``, ``copy``). Setup hooks only: it has
    nothing to do in a run, and is always loaded (``HF_TOKPLUG_LOAD_PLUGINS`` does not filter it out)."""

    @staticmethod
    @hookimpl
    def tokplug_register_runners(register: Callable[[str, type], None]) -> None:
        from .causal_lm import CausalLMPrepare, CausalLMSFT
        from .classification import SequenceClassification
        from .diffusion_lora import DiffusionGenerate, DiffusionLoRA
        from .masked_diffusion import MaskedDiffusionSFT
        from .preference import GRPO, PreferenceDPO, RewardModel

        for runner in (CausalLMSFT, CausalLMPrepare, MaskedDiffusionSFT, DiffusionLoRA, DiffusionGenerate,
                       SequenceClassification, PreferenceDPO, RewardModel, GRPO):
            register(runner.task, runner)

    @staticmethod
    @hookimpl
    def tokplug_register_token_inits(register: Callable[[str, Callable], None]) -> None:
        from ..tokens import BUILTIN_INITS

        for name, fn in BUILTIN_INITS.items():
            register(name, fn)
