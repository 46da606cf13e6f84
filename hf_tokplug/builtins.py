"""The host's own registrations (tasks and generic token-init strategies), made through the same hooks a plugin uses."""

from __future__ import annotations

from typing import Callable

from .hookspecs import hookimpl


@hookimpl
def tokplug_register_runners(register: Callable[[str, type], None]) -> None:
    from .runners.causal_lm import CausalLMPrepare, CausalLMSFT
    from .runners.classification import SequenceClassification
    from .runners.diffusion_lora import DiffusionGenerate, DiffusionLoRA
    from .runners.masked_diffusion import MaskedDiffusionSFT

    for runner in (CausalLMSFT, CausalLMPrepare, MaskedDiffusionSFT, DiffusionLoRA, DiffusionGenerate,
                   SequenceClassification):
        register(runner.task, runner)


@hookimpl
def tokplug_register_token_inits(register: Callable[[str, Callable], None]) -> None:
    from .tokens import BUILTIN_INITS

    for name, fn in BUILTIN_INITS.items():
        register(name, fn)
