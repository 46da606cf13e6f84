"""ssToken: the kept tokens are the top ceil(rho * L_resp) of gamma * Norm(REL) + (1 - gamma) * AttnScore, computed
independently here (history model from its saved weights, attention from an eager forward with
``output_attentions``); the history scores are cached on disk and reused; the host capabilities it relies on
(``layer_attention``, ``FrozenLogProbs``) match plain computations; bad input is refused before weights load.
(rho = 1 giving plain SFT exactly is the conformance suite's no-op test.)"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_run_refused, read_log, run_recipe, token_log_probs
from hf_tokplug import toy
from hf_tokplug.modeling import layer_attention
from hf_tokplug.training import FrozenLogProbs, TokenBatch, token_batch


def test_selection_follows_the_paper(tmp_path):
    from transformers import AutoModelForCausalLM

    config = {"rho": 0.5, "gamma": 0.7, "layer": -1}
    runner, _ = run_recipe(tmp_path, "run", plugins={"sstoken": config}, train={"learning_rate": 1e-2})
    ctx, trainer = runner.ctx, runner.ctx.trainer
    plugin = ctx.plugins["sstoken"]
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = token_batch(trainer, inputs, ctx.traits)
    trainer.model.train()
    weights = plugin.tokplug_token_weights(ctx, batch)

    history = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")).eval()  # the model before SFT
    eager = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"), attn_implementation="eager").eval()
    eager.load_state_dict(trainer.model.state_dict())  # the current model, with attention weights returned
    with torch.no_grad():
        out = eager(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
        his = token_log_probs(history(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.targets)
    rel = token_log_probs(out.logits, batch.targets) - his
    attn = out.attentions[-1].mean(1)
    context = ((batch.labels == -100) & batch.attention_mask.bool()).float()
    for row in range(batch.labels.shape[0]):
        pos = batch.scored[row].nonzero()[:, 0]
        r = rel[row, pos]
        norm = (r - r.min()) / (r.max() - r.min())
        score = 0.7 * norm + 0.3 * (attn[row, pos] @ context[row])
        k = math.ceil(0.5 * len(pos))
        expected = set(pos[score.topk(k).indices].tolist())
        assert set(weights[row].nonzero()[:, 0].tolist()) == expected, row
    assert weights.sum() < batch.scored.sum()
    rows = [r for r in read_log(tmp_path / "run") if "sstoken/selected_share" in r]
    assert rows and 0.5 <= rows[0]["sstoken/selected_share"] < 0.6


def test_history_scores_are_cached_on_disk_and_reused(tmp_path):
    from hf_tokplug.toy import cache_root

    data = {"max_samples": 40}  # data no other test uses: a fingerprint of its own (the cache is shared)
    before = set((cache_root() / "sstoken").glob("*.safetensors"))
    first, _ = run_recipe(tmp_path, "a", plugins={"sstoken": {"rho": 0.6}}, data=data)
    assert set((cache_root() / "sstoken").glob("*.safetensors")) - before
    assert first.ctx.plugins["sstoken"].history.misses > 0
    second, _ = run_recipe(tmp_path, "b", plugins={"sstoken": {"rho": 0.6}}, data=data)
    history = second.ctx.plugins["sstoken"].history
    assert history.misses == 0 and history.hits > 0  # every training row came from the file
    other, _ = run_recipe(tmp_path, "c", plugins={"sstoken": {"rho": 0.6}}, data={"max_samples": 36})
    assert other.ctx.plugins["sstoken"].history.misses > 0  # other data: another fingerprint


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_extremes_train(tmp_path, gamma):
    runner, metrics = run_recipe(tmp_path, "run", plugins={"sstoken": {"gamma": gamma, "rho": 0.6, "normalizer": "kept"}})
    assert metrics["train_loss"] > 0


def test_layer_attention_matches_eager_attention_weights():
    from transformers import AutoModelForCausalLM

    for name in ("toy://llama", "toy://qwen2"):
        model = AutoModelForCausalLM.from_pretrained(toy.resolve(name), attn_implementation="eager")
        ids = torch.randint(5, 100, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        for layer in (0, -1):
            logits, attn = layer_attention(model, layer, ids, mask)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            ref = out.attentions[layer].mean(1)
            assert torch.allclose(attn[0], ref[0], atol=1e-5) and torch.allclose(attn[1, :6, :6], ref[1, :6, :6], atol=1e-5)
            assert torch.allclose(logits, out.logits, atol=1e-4)
        assert model.config._attn_implementation == "eager"  # restored


def test_frozen_log_probs_cache_freeze_and_files(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama"))
    ids = torch.randint(5, 100, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    batch = TokenBatch(labels, 1, ("sft",) * 3, None, mask, ids)
    scorer = FrozenLogProbs(model)
    got = scorer(batch)
    with torch.no_grad():
        expected = token_log_probs(model(input_ids=ids, attention_mask=mask).logits, batch.targets)
    assert torch.allclose(got, expected, atol=1e-5) and scorer.misses == 3
    padded = TokenBatch(torch.nn.functional.pad(labels, (0, 4), value=-100), 1, batch.roles, None,
                        torch.nn.functional.pad(mask, (0, 4)), torch.nn.functional.pad(ids, (0, 4)))
    assert torch.allclose(scorer(padded)[:, :8], got) and scorer.hits == 3  # the same rows, padded longer
    scorer.save(tmp_path / "rows.safetensors")
    again = FrozenLogProbs(None)
    again.load(tmp_path / "rows.safetensors")
    again.freeze()
    assert torch.allclose(again(batch), got)
    other = TokenBatch(labels, 1, batch.roles, None, mask, ids.flip(1))
    with pytest.raises(KeyError, match="not scored in advance"):
        again(other)


@pytest.mark.parametrize("plugins,sections,expected", [
    ({"sstoken": {"gamma": 1.5}}, {}, "gamma"),
    ({"sstoken": {"rho": 0}}, {}, "rho"),
    ({"sstoken": {"normalizer": "batch"}}, {}, "normalizer"),
    ({"sstoken": {}}, {"task": "preference_dpo", "data": {"train": "toy://kjv-preference"}}, "role(s) ['sft']"),
])
def test_bad_sstoken_input(capsys, tmp_path, plugins, sections, expected):
    assert_run_refused(tmp_path, capsys, expected, **sections, plugins=plugins)
