"""TARA on the tiny Stable Diffusion: token masks, exactness of composition (1, 2, 3 adapters), the CFG negative half,
the alignment loss, the saved format, bad input and the generate command. (Mask-off parity and save/restore are in
the conformance suite.)"""

from __future__ import annotations

import json

import pytest
import torch

import hf_tokplug
from hf_tokplug.cli import main
from hf_tokplug.plugin import load_pipeline
from hf_tokplug_plugins.tara import compose, token_mask
from hf_tokplug_plugins.tara.masking import word_ids
from hf_tokplug_plugins.tara.testing import capture_kv, random_adapter

from conftest import base_recipe, read_log, run_recipe, write_recipe

SD = {"task": "diffusion_lora", "model": {"name_or_path": "toy://sd"}, "data": None, "adapter": {"r": 4, "alpha": 8},
      "task_options": {"instance_data_dir": "toy://shapes/red-square", "instance_prompt": "a photo of sks square",
                       "resolution": 32}}
CONCEPTS = [("sks", "square"), ("zwx", "circle"), ("qlm", "triangle")]


def test_token_mask_matches_every_subtoken_of_every_occurrence():
    ids = torch.tensor([[1, 7, 8, 9, 7, 8, 2], [7, 3, 7, 8, 0, 0, 0]])
    mask = token_mask(ids, [[7, 8]])
    assert mask.tolist() == [[0, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tara")
    return [random_adapter("toy://sd", root / rare, rare, cls, seed=i) for i, (rare, cls) in enumerate(CONCEPTS)]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_composition_is_exact_outside_concept_tokens(adapters, n):
    pipe = load_pipeline("toy://sd")
    compose(pipe, [str(a) for a in adapters[:n]])
    prompt = "a photo of sks square next to zwx circle and qlm triangle"
    negative = "sks zwx qlm"  # concept words in the negative prompt still get no delta
    with capture_kv(pipe.unet) as records:
        pipe(prompt, negative_prompt=negative, num_inference_steps=1, guidance_scale=5.0, height=32, width=32,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    assert records
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")["input_ids"]
    concept = torch.zeros(ids.shape[1], dtype=torch.bool)
    for rare, _ in CONCEPTS[:n]:
        concept |= token_mask(ids, word_ids(tok, rare))[0].bool()
    assert concept.sum() >= n
    for _, out, base in records:
        assert out.shape[0] == 2  # [negative, prompt]
        torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-6)  # the CFG negative half: no deltas
        torch.testing.assert_close(out[1][~concept], base[1][~concept], rtol=0, atol=1e-6)
        assert (out[1][concept] - base[1][concept]).abs().max() > 1e-3  # the concepts' own positions do change


def test_each_adapter_changes_only_its_own_tokens(adapters):
    """With two adapters, the K/V change at concept A's tokens is A's alone (B adds nothing there)."""
    prompt = "a photo of sks square next to zwx circle"
    outs = {}
    for combo in (["sks"], ["sks", "zwx"]):
        pipe = load_pipeline("toy://sd")
        compose(pipe, [str(a) for a, (r, _) in zip(adapters, CONCEPTS) if r in combo])
        with capture_kv(pipe.unet) as records:
            pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
        outs[len(combo)] = records
        tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")["input_ids"]
    sks = token_mask(ids, word_ids(tok, "sks"))[0].bool()
    for (_, one, _), (_, two, _) in zip(outs[1], outs[2]):
        torch.testing.assert_close(one[0][sks], two[0][sks], rtol=0, atol=1e-5)


def test_training_logs_alignment_and_saves_diffusers_lora(tmp_path):
    runner, metrics = run_recipe(tmp_path, "t", **SD, plugins={"tara": {"rare_token": "sks", "class_word": "square"}})
    rows = [r for r in read_log(tmp_path / "t") if "loss" in r]
    assert rows and all(r["tara/tara_align"] > 0 for r in rows)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert any(k.startswith("unet.") and "attn2.to_k" in k for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    tara = json.loads((tmp_path / "t" / "tara.json").read_text())
    assert tara["rare_token"] == "sks" and tara["rank"] == 4 and tara["alpha"] == 8
    # plain diffusers loads it too, at the training scale
    pipe = load_pipeline("toy://sd")
    pipe.load_lora_weights(str(tmp_path / "t"), adapter_name="x")
    layer = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    assert layer.scaling["x"] == pytest.approx(8 / 4)
    restored = hf_tokplug.from_pretrained(tmp_path / "t")
    assert restored.pipeline is not None and restored.plugins["tara"].state is not None


def test_alignment_loss_needs_the_class_word(tmp_path, capsys):
    recipe = base_recipe(tmp_path / "out", **SD, plugins={"tara": {"rare_token": "sks", "class_word": "dog"}})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe)), "--offline"]) == 2
    err = capsys.readouterr().err
    assert "class word 'dog'" in err and "plugins.tara.class_word" in err


def test_generate_command_composes(adapters, tmp_path, capsys):
    code = main(["tara-generate", "--base", "toy://sd", "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                 "--prompt", "a photo of sks square and zwx circle", "--steps", "2", "--out", str(tmp_path / "img")])
    assert code == 0 and (tmp_path / "img" / "00.png").is_file()


def test_fused_and_cached_composition_gives_the_same_images(adapters):
    outs = []
    for fuse, cache in ((False, False), (True, True)):
        pipe = load_pipeline("toy://sd")
        compose(pipe, [str(a) for a in adapters[:2]], fuse_global=fuse, cache_kv=cache)
        outs.append(pipe("a photo of sks square and zwx circle", num_inference_steps=3, guidance_scale=5.0, height=32,
                         width=32, generator=torch.Generator().manual_seed(0), output_type="latent").images)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)  # merged weights round differently


def test_compose_recipe_renders_images(adapters, tmp_path):
    _, metrics = run_recipe(tmp_path, "gen", task="diffusion_generate", model={"name_or_path": "toy://sd"}, data=None,
                            task_options={"resolution": 32, "num_inference_steps": 2,
                                          "sample_prompts": ["a photo of sks square and zwx circle"]},
                            plugins={"tara": {"compose": [str(adapters[0]), str(adapters[1])]}}, train={})
    assert metrics["images"] == 1 and (tmp_path / "gen" / "samples" / "00.png").is_file()
    assert "TARA composition" in (tmp_path / "gen" / "README.md").read_text()


def test_diffusion_lora_checkpoints_and_resumes(tmp_path):
    train = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2}
    run_recipe(tmp_path, "r", **SD, plugins={"tara": {"rare_token": "sks", "class_word": "square"}}, train=train)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    runner, _ = run_recipe(tmp_path, "r", **SD, plugins={"tara": {"rare_token": "sks", "class_word": "square"}},
                           train={**train, "max_steps": 6, "resume_from_checkpoint": True}, overwrite=True)
    assert runner.ctx.trainer.state.global_step == 6
    steps = [r["step"] for r in read_log(tmp_path / "r") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4, nothing repeated
    # the resumed run loaded the checkpoint's LoRA: reloading it into the trainer's module reproduces those weights
    module = runner.ctx.trainer.model
    runner.ctx.trainer._load_from_checkpoint(str(tmp_path / "r" / "checkpoint-4"))
    now = module.lora_state()
    assert set(now) == {k[len("unet."):] for k in saved} or set(now) == set(saved)
    key = next(iter(now))
    torch.testing.assert_close(now[key], saved.get(key, saved.get(f"unet.{key}")))


def test_prior_preservation_weights_the_class_rows():
    from hf_tokplug.runners.diffusion_lora import LatentDiffusionLoRA

    pipe = load_pipeline("toy://sd")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = pipe.tokenizer(["a photo of sks square", "a photo of square"], padding="max_length", max_length=77,
                         return_tensors="pt")["input_ids"]
    losses = {}
    for weight, prior in ((1.0, None), (1.0, [False, True]), (0.25, [False, True])):
        torch.manual_seed(0)
        module = LatentDiffusionLoRA(pipe, prior_loss_weight=weight)
        with torch.no_grad():
            losses[(weight, prior is None)] = float(module(latents, ids, None if prior is None else torch.tensor(prior))["loss"])
    plain = losses[(1.0, True)]  # mean of the two rows
    with_prior, quarter = losses[(1.0, False)], losses[(0.25, False)]
    assert with_prior == pytest.approx(2 * plain, rel=1e-5)  # instance + 1.0 x prior
    assert quarter < with_prior


def test_prior_preservation_recipe_runs(tmp_path):
    options = {**SD["task_options"], "class_data_dir": "toy://shapes/blue-circle", "class_prompt": "a photo of square"}
    runner, metrics = run_recipe(tmp_path, "p", **{**SD, "task_options": options},
                                 plugins={"tara": {"rare_token": "sks", "class_word": "square"}})
    assert metrics["train_loss"] > 0
