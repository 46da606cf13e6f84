"""TGDPO: its weights are 1 +/- alpha * beta * (log pi_rm - log pi_ref) per completion token, DPO's loss uses them
as the paper's formula says, pi_rm comes from a previous DPO run (a LoRA adapter folder) or any model with the
policy's tokenizer, and bad input is refused before weights load. (alpha = 0 giving DPO exactly is the conformance
suite's no-op test, which runs tgdpo on preference_dpo.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_run_refused, base_recipe, model_token_log_probs, read_log, run_recipe, write_recipe
from hf_tokplug.cli import main
from hf_tokplug.training import token_batch

PAIRS = {"train": "toy://kjv-preference", "max_samples": 16, "max_length": 48}
DPO = {"task": "preference_dpo", "data": PAIRS,
       "train": {"max_steps": 1, "per_device_train_batch_size": 4, "beta": 0.5}}


def test_weights_and_dpo_loss_follow_the_paper(tmp_path):
    runner, _ = run_recipe(tmp_path, "run", **DPO, plugins={"tgdpo": {"rm_model": "toy://qwen2", "alpha": 1.5}})
    ctx, trainer = runner.ctx, runner.ctx.trainer
    plugin = ctx.plugins["tgdpo"]
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = token_batch(trainer, inputs, ctx.traits)
    assert batch.roles == ("chosen",) * 4 + ("rejected",) * 4
    trainer.model.eval()
    weights = plugin.tokplug_token_weights(ctx, batch)

    rm = plugin.rm.model  # scored independently here, with a plain forward
    reward = 0.5 * (model_token_log_probs(rm, batch) - model_token_log_probs(trainer.ref_model, batch))
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4)[:, None]
    expected = torch.where(batch.scored, 1.0 + 1.5 * sign * reward, torch.ones_like(reward))
    assert torch.allclose(weights, expected, atol=1e-5)
    assert (weights[batch.scored] - 1).abs().max() > 1e-3  # the guidance does something on this toy pair set

    # DPOTrainer's own loss, with the weights applied by the host, is the TGDPO objective
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    delta = model_token_log_probs(trainer.model, batch) - model_token_log_probs(trainer.ref_model, batch)
    ratio = (expected * delta).sum(-1)
    manual = -F.logsigmoid(0.5 * (ratio[:4] - ratio[4:])).mean()
    assert torch.allclose(loss, manual, atol=1e-5), (loss, manual)
    misses, hits = plugin.rm.misses, plugin.rm.hits
    assert torch.equal(plugin.tokplug_token_weights(ctx, batch), weights)  # the same rows: from pi_rm's cache
    assert plugin.rm.misses == misses == 8 and plugin.rm.hits == hits + 8
    logged = [r for r in read_log(tmp_path / "run") if "tgdpo/weight_chosen" in r]
    assert logged and "tgdpo/weight_rejected" in logged[0]


def test_rm_from_a_previous_lora_dpo_run_and_lora_policy(tmp_path):
    run_recipe(tmp_path, "rm", **{**DPO, "train": {**DPO["train"], "max_steps": 2, "learning_rate": 1e-2}},
               adapter={"r": 4})
    assert (tmp_path / "rm" / "adapter_config.json").is_file()
    runner, metrics = run_recipe(tmp_path, "tg", **DPO, adapter={"r": 4},
                                 plugins={"tgdpo": {"rm_model": str(tmp_path / "rm"), "alpha": 1.0, "clamp": 0.0}})
    plugin = runner.ctx.plugins["tgdpo"]
    assert plugin.ref.disable_adapter  # LoRA: pi_ref is the policy with its adapter disabled
    assert not any(p.requires_grad for p in plugin.rm.model.parameters())
    rows = [r for r in read_log(tmp_path / "tg") if "tgdpo/token_reward" in r]
    assert rows and rows[0]["tgdpo/token_reward"] != 0.0  # pi_rm (trained) differs from pi_ref (the base)
    card = (tmp_path / "tg" / "README.md").read_text()
    assert "## TGDPO" in card and "zhu2025tgdpo" in card


def test_rm_with_another_tokenizer_is_refused_before_weights_load(capsys, tmp_path):
    from hf_tokplug.toy import load_tokenizer

    other = tmp_path / "other_rm"
    load_tokenizer("toy://tokenizer/qwen2").save_pretrained(other)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(out, **DPO, plugins={"tgdpo": {"rm_model": str(other)}}))
    for command in ("validate", "run"):
        assert main([command, str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "plugins.tgdpo.rm_model" in err and "another tokenizer" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("plugins,sections,expected", [
    ({"tgdpo": {"rm_model": "toy://qwen2", "alpha": -1}}, DPO, "alpha"),
    ({"tgdpo": {"rm_model": "toy://qwen2", "beta_source": "value"}}, DPO, "rm_beta"),
    ({"tgdpo": {}}, DPO, "rm_model"),
    ({"tgdpo": {"rm_model": "toy://qwen2"}}, {}, "role(s) ['chosen', 'rejected']"),
    ({"tgdpo": {"rm_model": "./no/such/rm"}}, DPO, "rm_model"),
])
def test_bad_tgdpo_input(capsys, tmp_path, plugins, sections, expected):
    assert_run_refused(tmp_path, capsys, expected, **sections, plugins=plugins)


def test_resolved_recipe_records_the_options(tmp_path):
    run_recipe(tmp_path, "run", **DPO, plugins={"tgdpo": {"rm_model": "toy://qwen2", "alpha": 0.0}})
    manifest = json.loads((tmp_path / "run" / "tokplug.json").read_text())
    entry = next(p for p in manifest["plugins"] if p["name"] == "tgdpo")
    assert entry["config"] == {"rm_model": "toy://qwen2", "alpha": 0.0, "beta_source": "policy", "rm_beta": None,
                               "clamp": None, "cache": True}
