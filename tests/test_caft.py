"""CAFT: generic heads, chunked head loss, the two stages, saving, metrics, validation. (Parity with alpha = 0 and
save/restore are in the conformance suite.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hf_tokplug
from hf_tokplug import toy
from hf_tokplug.errors import PluginError
from hf_tokplug_plugins.caft.heads import BlockHead, build_heads, decoder_layers, final_norm, head_context, head_losses
from hf_tokplug_plugins.caft.plugin import schedule_value

from conftest import read_log, run_recipe

ARCHS = ["toy://llama", "toy://qwen2", "toy://gpt-neox"]


def _model(name="toy://llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy.resolve(name)).eval()


@pytest.mark.parametrize("name", ARCHS)
def test_block_head_copy_of_last_layer_reproduces_the_model(name):
    # Fed the hidden state entering the last layer, a head copied from that layer (and the final norm) must give the
    # model's own output: proves masks (with padding) and rotary embeddings are passed the way the model does.
    model = _model(name)
    ids = torch.randint(10, 2000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        head = BlockHead(decoder_layers(model.base_model)[-1], final_norm(model.base_model))
        hc = head_context(model, out.hidden_states[-2], mask)
        y = head(out.hidden_states[-2], mask=hc.mask, position_embeddings=hc.position_embeddings, position_ids=hc.position_ids)
    torch.testing.assert_close(y[mask.bool()], out.last_hidden_state[mask.bool()], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_type,unembedding", [("transformer", "shared"), ("linear", "separate")])
def test_chunked_head_loss_equals_naive(head_type, unembedding):
    model = _model("toy://qwen2")
    heads = build_heads(model, 3, head_type, -2, unembedding)
    for p in heads.parameters():  # make the linear heads non-trivial
        p.data.add_(torch.randn_like(p) * 0.01)
    hidden = torch.randn(2, 10, 64, requires_grad=True)
    labels = torch.randint(0, 2048, (2, 10))
    labels[:, :3] = -100
    mask = torch.ones(2, 10, dtype=torch.long)
    got = head_losses(heads, model, hidden, labels, mask, chunk_size=5)
    hc = head_context(model, hidden, mask)
    want = []
    for i, head in enumerate(heads.heads, start=1):
        h = head(hidden, mask=hc.mask, position_embeddings=hc.position_embeddings, position_ids=hc.position_ids)
        w = heads.unembeddings[i - 1].weight if heads.unembeddings is not None else model.get_output_embeddings().weight
        logits = h[:, : -(1 + i)] @ w.T  # the full (B, T, V) tensor the plugin never builds
        want.append(F.cross_entropy(logits.reshape(-1, 2048), labels[:, 1 + i:].reshape(-1), ignore_index=-100, reduction="sum"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.loss_sum, w.float(), rtol=1e-5, atol=1e-4)
    grad_got = torch.autograd.grad(sum(g.loss_sum for g in got), hidden)[0]
    grad_want = torch.autograd.grad(sum(want), hidden)[0]
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    assert [g.count for g in got] == [int((labels[:, 1 + i:] != -100).sum()) for i in (1, 2, 3)]


def test_schedules():
    assert schedule_value("rsine", 0, 100) == 1.0 and schedule_value("rsine", 100, 100) < 1e-12
    assert schedule_value("rsine", 50, 100) == pytest.approx(math.sin(math.pi / 4))
    assert schedule_value("sine", 0, 100) == 0.0 and schedule_value("sine", 100, 100) == 1.0
    assert schedule_value("linear", 25, 100) == 0.75 and schedule_value("linear_up", 25, 100) == 0.25
    assert schedule_value("constant", 7, 100) == 1.0


def _stage_a(tmp_path, name="heads", **caft):
    return run_recipe(tmp_path, name, plugins={"caft": {"stage": "heads", "num_heads": 2, **caft}},
                      train={"learning_rate": 1e-2, "max_steps": 4})


def test_stage_a_trains_only_the_heads(tmp_path):
    runner, _ = _stage_a(tmp_path)
    out = tmp_path / "heads"
    base = _model()
    trained = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("caft_heads") for k in trained)  # the saved model is the plain base model
    for key, value in base.state_dict().items():
        if key in trained:
            torch.testing.assert_close(trained[key], value, rtol=0, atol=0)
    heads = load_file(str(out / "caft_heads.safetensors"))
    fresh = build_heads(base, 2, "transformer", -2, "shared").state_dict()
    assert any(not torch.equal(heads[k], fresh[k]) for k in fresh)  # the heads did train
    meta = json.loads((out / "caft_heads.json").read_text())
    assert meta["num_heads"] == 2 and meta["model_type"] == "llama"
    rows = [r for r in read_log(out) if "loss" in r]
    assert {"caft/head_1", "caft/head_2", "caft/head_1_acc", "caft/head_2_loss", "caft/selection"} <= set(rows[-1])
    assert rows[-1]["caft/schedule"] == 1.0  # stage A: constant schedule, alpha 1


def test_stage_b_uses_frozen_heads_and_saves_a_plain_model(tmp_path):
    _stage_a(tmp_path)
    heads_dir = tmp_path / "heads"
    runner, metrics = run_recipe(
        tmp_path, "sft", plugins={"caft": {"num_heads": 2, "heads_path": str(heads_dir)}}, adapter={"r": 4},
        data={"eval_size": 8},
        train={"eval_strategy": "steps", "eval_steps": 2, "metric_for_best_model": "caft/selection",
               "greater_is_better": False, "save_strategy": "steps", "save_steps": 2, "load_best_model_at_end": True})
    heads = runner.ctx.plugins["caft"].heads
    assert not [n for n, _ in heads.named_modules() if "lora" in n]  # kept out of LoRA (exclude_modules)
    assert [n for n, _ in runner.ctx.model.named_modules() if n.endswith("lora_A")]  # while the base has it
    before = load_file(str(heads_dir / "caft_heads.safetensors"))
    after = runner.ctx.plugins["caft"].heads.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen in stage B
    assert "eval_caft/selection" in metrics and "eval_caft/head_2_acc" in metrics
    rows = [r for r in read_log(tmp_path / "sft") if "loss" in r]
    assert rows[0]["caft/schedule"] > rows[-1]["caft/schedule"]  # rsine fades
    assert not (tmp_path / "sft" / "caft_heads.safetensors").exists()
    restored = hf_tokplug.from_pretrained(tmp_path / "sft")
    assert not hasattr(restored.model.get_base_model(), "caft_heads")


def test_keep_heads_restores_them(tmp_path):
    runner, _ = run_recipe(tmp_path, "keep", plugins={"caft": {"num_heads": 2, "train_heads": True, "keep_heads": True,
                                                               "head_type": "linear"}})
    restored = hf_tokplug.from_pretrained(tmp_path / "keep")
    got, want = restored.plugins["caft"].heads.state_dict(), runner.ctx.plugins["caft"].heads.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert hasattr(restored.model, "caft_heads")


@pytest.mark.parametrize("plugins,adapter,message", [
    ({"caft": {"stage": "heads"}}, {"r": 4}, "remove the adapter"),
    ({"caft": {}}, None, "needs trained heads"),
])
def test_validation(tmp_path, plugins, adapter, message):
    with pytest.raises(PluginError, match=message):
        run_recipe(tmp_path, "bad", plugins=plugins, **({"adapter": adapter} if adapter else {}))
    assert not (tmp_path / "bad").exists()


def test_heads_that_do_not_fit_are_refused(tmp_path):
    _stage_a(tmp_path, num_heads=2)
    with pytest.raises(PluginError, match="do not fit"):
        run_recipe(tmp_path, "mismatch", plugins={"caft": {"num_heads": 3, "heads_path": str(tmp_path / "heads")}})


def test_heads_from_a_hub_repo(tmp_path, monkeypatch):
    from fake_hub import fake_hub

    from hf_tokplug.hub import push_folder

    _stage_a(tmp_path)
    with fake_hub(monkeypatch) as hub:
        push_folder(tmp_path / "heads", "me/caft-heads")
        assert "caft_heads.safetensors" in hub.repos["me/caft-heads"]["files"]
        runner, _ = run_recipe(tmp_path, "from-hub", plugins={"caft": {"num_heads": 2, "heads_path": "me/caft-heads"}})
    want = load_file(str(tmp_path / "heads" / "caft_heads.safetensors"))
    got = runner.ctx.plugins["caft"].heads.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_full_finetune_keeps_lm_head_frozen_by_default(tmp_path):
    runner, _ = run_recipe(tmp_path, "full", plugins={"caft": {"num_heads": 1, "train_heads": True}},
                           train={"learning_rate": 1e-2})
    base = _model()
    trained = runner.ctx.model
    torch.testing.assert_close(trained.get_output_embeddings().weight, base.get_output_embeddings().weight, rtol=0, atol=0)
    assert (trained.get_input_embeddings().weight - base.get_input_embeddings().weight).abs().max() > 0


def test_heads_path_problems_are_reported_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PluginError, match="no caft_heads.safetensors") as err:
        run_recipe(tmp_path, "x", plugins={"caft": {"heads_path": str(empty)}})
    assert "Stage A" in str(err.value) and not (tmp_path / "x").exists()  # validate: nothing written
    with pytest.raises(PluginError, match="not a local folder") as err:  # offline in tests: the Hub is unreachable
        run_recipe(tmp_path, "y", plugins={"caft": {"heads_path": "runs/never-trained"}})
    assert "recipes/caft_heads.yaml" in str(err.value)
