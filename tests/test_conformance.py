"""Conformance suite: every installed plugin that declares ``test_configs`` must pass these.

Per plugin (parametrized over the ``hf_tokplug`` entry points): apply it, train a few steps, save, restore with
``hf_tokplug.from_pretrained`` and get identical outputs; configured to do nothing (``test_configs["noop"]``) it
gives the unpatched per-step losses and final weights; combined with the tutorial plugin it still trains.
A plugin adds its own case by declaring ``test_configs = {"noop": {...}, "active": {...}}`` and, when it needs
another kind of task, ``test_traits = {...}``: the traits it needs (keyword arguments of ``TaskTraits.require``, e.g.
``{"model_kind": "masked_lm"}``). The suite runs it on the first task below whose traits meet them (default: the
causal-LM SFT task), so plugins never name tasks.
"""

from __future__ import annotations

import pytest
import torch

import hf_tokplug
from hf_tokplug.errors import PluginError
from hf_tokplug.manager import installed_plugins, registries

from conftest import read_log, run_recipe

CASES = sorted(
    name for name, info in installed_plugins().items()
    if info.cls is not None and getattr(info.cls, "test_configs", None)
)
PARTNER = "zloss"  # the tutorial plugin (docs/tutorial_plugin), installed through its entry point

# Recipe sections per task on the embedded default (merged into conftest's 4-step base recipe), in preference order.
TASK_SECTIONS = {
    "causal_lm_sft": {},
    "masked_diffusion_sft": {"task": "masked_diffusion_sft", "model": {"name_or_path": "toy://gemma-bidir"},
                             "task_options": {"pad_to_length": 64}},
    "sequence_classification": {"task": "sequence_classification", "model": {"name_or_path": "toy://bert"},
                                "data": {"train": "toy://kjv-books", "max_samples": 64, "max_length": 64}},
    "preference_dpo": {"task": "preference_dpo", "data": {"train": "toy://kjv-preference", "max_samples": 32,
                                                          "max_length": 128}},  # no pair truncated
    "diffusion_lora": {"task": "diffusion_lora", "model": {"name_or_path": "toy://sd"}, "data": None,
                       "task_options": {"instance_data_dir": "toy://shapes/red-square",
                                        "instance_prompt": "a photo of sks square", "resolution": 32}},
}


def _task(name: str) -> str:
    """The first task of TASK_SECTIONS whose traits meet the plugin's ``test_traits``."""
    needs = getattr(installed_plugins()[name].cls, "test_traits", None) or {}
    for task in TASK_SECTIONS:
        try:
            registries().runners[task].traits.require(name, **needs)
        except PluginError:
            continue
        return task
    raise AssertionError(f"no conformance task meets {name}'s test_traits {needs}")


def _sections(name: str, config: dict, **extra) -> dict:
    sections = dict(TASK_SECTIONS[_task(name)])
    sections["plugins"] = {name: config, **extra.pop("partners", {})}
    sections.update(extra)
    return sections


def _logits(ctx, text: str = "In the beginning God created") -> torch.Tensor:
    """The model's output on a fixed input: LM logits, or a diffusion UNet's prediction for fixed latents."""
    parts = ctx.model if hasattr(ctx.model, "unet") else ctx.pipeline
    if parts is not None and hasattr(parts, "unet"):
        tok = parts.tokenizer
        ids = tok(f"a photo of sks {text}", padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")["input_ids"]
        size = parts.unet.config.sample_size
        latents = torch.randn(1, parts.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        parts.unet.eval()
        with torch.no_grad():
            context = parts.text_encoder(ids)[0]
            return parts.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    ids = ctx.tokenizer(text, return_tensors="pt")["input_ids"]
    ctx.model.eval()
    with torch.no_grad():
        return ctx.model(input_ids=ids).logits


def test_tutorial_plugin_is_installed_through_its_entry_point():
    info = installed_plugins()[PARTNER]
    assert info.dist == "tokplug-zloss" and info.source == "tokplug_zloss:ZLossPlugin"
    assert PARTNER in CASES


@pytest.mark.parametrize("name", CASES)
def test_apply_train_save_restore(tmp_path, name):
    active = installed_plugins()[name].cls.test_configs["active"]
    runner, metrics = run_recipe(tmp_path, "active", **_sections(name, active, adapter={"r": 4}))
    assert metrics["train_loss"] > 0
    restored = hf_tokplug.from_pretrained(tmp_path / "active")
    assert list(restored.plugins) == [name]
    assert restored.plugins[name].config_dict() == runner.ctx.plugins[name].config_dict()
    torch.testing.assert_close(_logits(restored), _logits(runner.ctx), rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_noop_config_gives_unpatched_numbers(tmp_path, name):
    noop = installed_plugins()[name].cls.test_configs["noop"]
    plain, _ = run_recipe(tmp_path, "plain", **{**_sections(name, noop), "plugins": {}})
    patched, _ = run_recipe(tmp_path, "noop", **_sections(name, noop))
    plain_losses = [r["loss"] for r in read_log(tmp_path / "plain") if "loss" in r]
    noop_losses = [r["loss"] for r in read_log(tmp_path / "noop") if "loss" in r]
    assert len(plain_losses) == 4 and noop_losses == plain_losses
    a, b = plain.ctx.model.state_dict(), patched.ctx.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [c for c in CASES if c != PARTNER])
def test_composes_with_tutorial_plugin(tmp_path, name):
    if not registries().runners[_task(name)].traits.token_labels:
        pytest.skip("the tutorial plugin (z-loss) needs a language model's token-level labels")
    active = installed_plugins()[name].cls.test_configs["active"]
    run_recipe(tmp_path, "both", **_sections(name, active, partners={PARTNER: {"weight": 0.1}}))
    rows = [r for r in read_log(tmp_path / "both") if "loss" in r]
    assert rows and all(f"{PARTNER}/z" in r for r in rows)
