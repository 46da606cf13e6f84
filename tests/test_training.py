"""Loss-term composition: exact under gradient accumulation, logged one by one, usable in users' own trainers."""

from __future__ import annotations


import hf_tokplug
from hf_tokplug import toy

from conftest import read_log, run_recipe

SGD = {"optim": "sgd", "learning_rate": 0.5, "max_steps": 2, "logging_steps": 1}  # SGD: update scales with the gradient


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accum_4x2_equals_batch_8_with_loss_term(tmp_path):
    data = {"max_samples": 16}
    plugins = {"zloss": {"weight": 0.5}}
    big, _ = run_recipe(tmp_path, "big", data=data, plugins=plugins,
                        train={**SGD, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1})
    acc, _ = run_recipe(tmp_path, "acc", data=data, plugins=plugins,
                        train={**SGD, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    w_big, w_acc = _weights(big.ctx.model), _weights(acc.ctx.model)
    start = _weights(_toy()[0])
    assert max((start[k] - w_big[k]).abs().max().item() for k in start) > 1e-3  # the steps did move the weights
    moved = max((w_big[k] - w_acc[k]).abs().max().item() for k in w_big)
    assert moved < 1e-5, f"grad-accum result differs by {moved}"
    for log in (read_log(tmp_path / "big"), read_log(tmp_path / "acc")):
        steps = [row for row in log if "loss" in row]
        assert all("zloss/z" in row and "zloss/mean_log_z" in row for row in steps)


def test_loss_term_is_added_to_loss(tmp_path):
    train = {"max_steps": 1, "logging_steps": 1}
    on, _ = run_recipe(tmp_path, "on", plugins={"zloss": {"weight": 0.1}}, train=train)
    off, _ = run_recipe(tmp_path, "off", plugins={"zloss": {"weight": 0.0}}, train=train)
    row_on = [r for r in read_log(tmp_path / "on") if "loss" in r][0]
    row_off = [r for r in read_log(tmp_path / "off") if "loss" in r][0]
    assert "zloss/z" not in row_off
    assert abs((row_on["loss"] - row_off["loss"]) - row_on["zloss/z"]) < 1e-3


def _toy():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy.resolve("toy://llama")), toy.load_toy_tokenizer()


def test_apply_and_attach_in_users_sft_trainer(tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _toy()
    ctx = hf_tokplug.apply(model, tokenizer, plugins={"zloss": {"weight": 0.1}},
                           peft_config=LoraConfig(r=4, target_modules="all-linear"))
    train = toy.load_toy_dataset("toy://kjv-chat").select(range(16))
    args = SFTConfig(output_dir=str(tmp_path / "user"), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = ctx.attach(SFTTrainer(model=ctx.model, args=args, train_dataset=train, processing_class=ctx.tokenizer))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and all("zloss/z" in row for row in logged)
    assert read_log(tmp_path / "user")[0]["step"] == 1  # TokPlugCallback wrote the jsonl log
    out = ctx.save_pretrained(tmp_path / "saved")
    restored = hf_tokplug.from_pretrained(out)
    assert restored.plugins["zloss"].log_z_count == ctx.plugins["zloss"].log_z_count > 0


def test_attach_in_plain_trainer(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tokenizer = _toy()
    ctx = hf_tokplug.apply(model, tokenizer, plugins={"zloss": {"weight": 0.1}})
    texts = toy.load_toy_dataset("toy://kjv-text").select(range(16))
    data = texts.map(lambda ex: tokenizer(ex["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=2, per_device_train_batch_size=4,
                             logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = ctx.attach(Trainer(model=ctx.model, args=args, train_dataset=data,
                                 data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)))
    trainer.train()
    assert all("zloss/z" in row for row in trainer.state.log_history if "loss" in row)


def test_trainer_class_factory_is_cached():
    from trl import SFTTrainer

    cls = hf_tokplug.trainer_class(SFTTrainer)
    assert cls is hf_tokplug.trainer_class(SFTTrainer) and issubclass(cls, SFTTrainer)


class Doubles(hf_tokplug.Plugin):
    """Replaces the main loss by twice itself, plus a constant the test can see (a MainLoss)."""

    @hf_tokplug.hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
        from hf_tokplug.plugin import MainLoss

        return {"double": MainLoss(2.0 * outputs.loss + 1.0)}


class DoublesToo(Doubles):
    pass


def test_main_loss_replaces_the_trainers_loss(tmp_path, capsys):
    """A MainLoss term replaces the main loss (other terms are still added); two replacements are an error."""
    import torch

    from conftest import base_recipe, write_recipe
    from hf_tokplug import manager
    from hf_tokplug.cli import main

    train = {"max_steps": 1, "logging_steps": 1, "optim": "sgd", "learning_rate": 0.0}
    with manager.registered("doubles", Doubles), manager.registered("doubles_too", DoublesToo):
        plain, _ = run_recipe(tmp_path, "plain", train=train)
        ran, _ = run_recipe(tmp_path, "ran", train=train, plugins={"doubles": None, "zloss": {"weight": 0.1}})
        trainer = ran.ctx.trainer
        trainer.model.train()
        inputs = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            replaced = trainer.compute_loss(trainer.model, dict(inputs))
            own = plain.ctx.trainer.compute_loss(plain.ctx.trainer.model, dict(inputs))
        z = float(ran.ctx.host["terms_train"]["zloss/z"][-1])
        assert z > 0 and torch.allclose(replaced, 2 * own + 1 + z, atol=1e-5), (replaced, own, z)
        assert any("doubles/double" in r for r in read_log(tmp_path / "ran"))

        recipe = write_recipe(tmp_path / "two.yaml", base_recipe(tmp_path / "two", train=train,
                                                                 plugins={"doubles": None, "doubles_too": None}))
        assert main(["run", str(recipe)]) == 2
        assert "replace the main loss" in capsys.readouterr().err


def test_output_logits_are_the_models_own():
    """output_logits (what loss-term plugins score hidden states with) reproduces the model's logits: Gemma2's final
    soft-capping, Granite's logits scaling, a plain Llama, and through a PEFT wrapper."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    from hf_tokplug.plugin import output_logits

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    models = [Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5)),
              GraniteForCausalLM(GraniteConfig(**{k: v for k, v in small.items() if k != "head_dim"}, logits_scaling=4.0)),
              LlamaForCausalLM(LlamaConfig(**small))]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model in models:
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=2.0)  # large logits: the capping shows
        model.eval()
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(output_logits(model, hidden), model(input_ids=ids).logits)
            if isinstance(model, Gemma2ForCausalLM):
                assert output_logits(model, hidden).abs().max() <= 0.5 + 1e-6
    wrapped = get_peft_model(models[0], LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        hidden = wrapped.get_base_model().model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(output_logits(wrapped, hidden), wrapped(input_ids=ids).logits)
