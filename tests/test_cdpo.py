"""cDPO: rejected-token weights are 1 - softmax((1 + lam) z_pos - lam z_neg)[y_t], computed independently here, land on
exactly the rejected completion's tokens (chosen rows weigh 1), DPO's loss becomes the sequence-level cDPO loss, the
scores are saved and reused, and misaligned or bad input is refused. (scale = 0, all weights 1, giving DPO exactly
is the conformance suite's no-op test.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import assert_run_refused, base_recipe, model_token_log_probs, read_log, run_recipe, write_recipe
from hf_tokplug import toy
from hf_tokplug.cli import main
from hf_tokplug.training import token_batch

PAIRS = {"train": "toy://kjv-preference", "max_samples": 16, "max_length": 128}  # no pair is cut
DPO = {"task": "preference_dpo", "data": PAIRS, "train": {"max_steps": 1, "per_device_train_batch_size": 4, "beta": 0.5}}
MODELS = {"positive_model": "toy://qwen2", "negative_model": "toy://llama", "lam": 1.0}


def test_weights_and_loss_follow_the_paper(tmp_path):
    from transformers import AutoModelForCausalLM

    runner, _ = run_recipe(tmp_path, "run", **DPO, plugins={"cdpo": MODELS})
    ctx, trainer = runner.ctx, runner.ctx.trainer
    plugin = ctx.plugins["cdpo"]
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = token_batch(trainer, inputs, ctx.traits)
    trainer.model.eval()
    weights = plugin.tokplug_token_weights(ctx, batch)

    pos = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://qwen2")).eval()
    neg = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")).eval()
    with torch.no_grad():
        z = 2.0 * pos(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits \
            - neg(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    p = torch.softmax(z.float(), -1).gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    rejected = batch.rows("rejected")[:, None]
    expected = torch.where(batch.scored & rejected, 1.0 - p, torch.ones_like(p))
    assert torch.allclose(weights, expected, atol=1e-5)
    assert torch.all(weights[~rejected[:, 0]] == 1.0) and (weights[batch.scored & rejected] < 1).all()

    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    delta = (model_token_log_probs(trainer.model, batch) - model_token_log_probs(trainer.ref_model, batch)) * expected
    ratio = delta.sum(-1)
    manual = -F.logsigmoid(0.5 * (ratio[:4] - ratio[4:])).mean()
    assert torch.allclose(loss, manual, atol=1e-5), (loss, manual)
    assert (tmp_path / "run" / "cdpo_weights.safetensors").is_file()
    assert any("cdpo/rejected_weight" in r for r in read_log(tmp_path / "run"))


def test_saved_weights_are_reused_without_the_models(tmp_path):
    first, _ = run_recipe(tmp_path, "a", **DPO, plugins={"cdpo": MODELS})
    saved = tmp_path / "a" / "cdpo_weights.safetensors"
    second, _ = run_recipe(tmp_path, "b", **DPO, plugins={"cdpo": {"weights_path": str(saved)}})
    a, b = first.ctx.plugins["cdpo"].weights, second.ctx.plugins["cdpo"].weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other data (another max_length cuts the completions differently): refused, never shifted
    out = tmp_path / "c"
    recipe = write_recipe(tmp_path / "c.yaml", base_recipe(out, **{**DPO, "data": {**PAIRS, "max_samples": 24}},
                                                           plugins={"cdpo": {"weights_path": str(saved)}}))
    assert main(["run", str(recipe)]) == 2 and not out.exists()


def test_bad_cdpo_input(capsys, tmp_path):
    from hf_tokplug.toy import load_tokenizer

    other = tmp_path / "other"
    load_tokenizer("toy://tokenizer/qwen2").save_pretrained(other)
    cases = [
        ({"cdpo": {"positive_model": "toy://qwen2"}}, DPO, "needs positive_model and negative_model"),
        ({"cdpo": {**MODELS, "negative_model": str(other)}}, DPO, "another tokenizer"),
        ({"cdpo": {**MODELS, "negative_model": "./no/model"}}, DPO, "nothing there"),
        ({"cdpo": {"weights_path": "./none.safetensors"}}, DPO, "not a file"),
        ({"cdpo": {**MODELS, "scale": 2}}, DPO, "scale"),
        ({"cdpo": MODELS}, {}, "role(s) ['chosen', 'rejected']"),
        ({"cdpo": MODELS}, {**DPO, "data": {**PAIRS, "max_length": 48}}, "longer than the trainer's max_length"),
    ]
    for plugins, sections, expected in cases:
        assert_run_refused(tmp_path, capsys, expected, **sections, plugins=plugins)


def _local_pairs(tmp_path, n=16):
    from hf_tokplug.data import load_split
    from hf_tokplug.recipe import DatasetSpec

    rows = load_split(DatasetSpec(path="toy://kjv-preference"), "data.train", "test").select(range(n))
    path = tmp_path / "pairs.jsonl"
    rows.to_json(str(path), lines=True)
    return path


def test_score_command_writes_weights_next_to_the_data(tmp_path, capsys):
    """`tokplug cdpo-score` scores the trainer's own prepared pairs (no policy model) and writes the weights next to
    the data file; a run with weights_path then uses exactly the weights an in-run scoring gives."""
    from hf_tokplug.plugin import tokenizer_vocab
    from plugins.cdpo.plugin import vocab_fingerprint, weights_metadata

    data = _local_pairs(tmp_path)
    sections = {**DPO, "data": {**PAIRS, "train": str(data)}}
    recipe = write_recipe(tmp_path / "score.yaml", base_recipe(tmp_path / "never", **sections, plugins={"cdpo": MODELS}))
    assert main(["preview", str(recipe), "-n", "1"]) == 0  # the data phases run without the scoring models too
    assert main(["cdpo-score", str(recipe)]) == 0, capsys.readouterr().err
    weights = tmp_path / "pairs.cdpo_weights.safetensors"
    assert weights.is_file() and not (tmp_path / "never").exists()
    assert f"weights_path={weights}" in capsys.readouterr().out
    meta = weights_metadata(weights)
    assert meta["tokenizer"] == vocab_fingerprint(tokenizer_vocab("toy://llama")) and meta["pairs"] == "16"

    scored, _ = run_recipe(tmp_path, "scored", **sections, plugins={"cdpo": MODELS})
    reused, _ = run_recipe(tmp_path, "reused", **sections, plugins={"cdpo": {"weights_path": str(weights)}})
    a, b = scored.ctx.plugins["cdpo"].weights, reused.ctx.plugins["cdpo"].weights
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # weights scored with another tokenizer are refused before anything loads
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(weights)), str(bad), metadata={**meta, "tokenizer": "0" * 16})
    out = tmp_path / "bad"
    recipe = write_recipe(tmp_path / "bad.yaml", base_recipe(out, **sections, plugins={"cdpo": {"weights_path": str(bad)}}))
    assert main(["run", str(recipe)]) == 2 and not out.exists()
    assert "another tokenizer" in capsys.readouterr().err
    # a data source that is not one local file needs --out
    recipe = write_recipe(tmp_path / "toy.yaml", base_recipe(out, **DPO, plugins={"cdpo": MODELS}))
    assert main(["cdpo-score", str(recipe)]) == 2 and "--out" in capsys.readouterr().err


def test_position_loss_is_the_reference_form(tmp_path):
    """loss: position replaces DPO's loss by -log sigmoid(beta (Delta^w_k - w_k Delta^l_k)) averaged over completion
    positions k (chosen and rejected tokens paired by index), computed independently here."""
    from plugins.cdpo.plugin import _key as pair_key

    runner, _ = run_recipe(tmp_path, "run", **DPO, plugins={"cdpo": {**MODELS, "loss": "position"}})
    ctx, trainer = runner.ctx, runner.ctx.trainer
    plugin = ctx.plugins["cdpo"]
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = token_batch(trainer, inputs, ctx.traits)
    trainer.model.train()  # the weights are looked up as in training
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        trainer.model.eval()
        delta = model_token_log_probs(trainer.model, batch) - model_token_log_probs(trainer.ref_model, batch)
    mask = inputs["attention_mask"]
    losses = []
    for c in range(4):
        r = c + 4
        dw, dl = delta[c][batch.scored[c]], delta[r][batch.scored[r]]
        w = plugin.weights[pair_key(batch.input_ids[r][mask[r].bool()].tolist())]
        k = max(len(dw), len(dl))
        dw, dl = F.pad(dw, (0, k - len(dw))), F.pad(w * dl, (0, k - len(dl)))
        losses.append(-F.logsigmoid(0.5 * (dw - dl)))
    manual = torch.cat(losses).mean()
    assert torch.allclose(loss, manual, atol=1e-5), (loss, manual)
    plain = run_recipe(tmp_path, "dpo", **DPO)[0].ctx.trainer
    with torch.no_grad():
        assert not torch.allclose(plain.compute_loss(plain.model, dict(inputs)), loss, atol=1e-3)  # another form
    assert any("cdpo/position_loss" in r for r in read_log(tmp_path / "run"))
