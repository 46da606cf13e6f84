"""The ``rainbow_padding`` plugin: K pad tokens, cyclic tail filling, pads as stop tokens at sampling time.

Training data keeps exactly one EOS at the true end of each answer; the tail the collator pads (marked by the
``pad_mask`` a task's batches carry, trait ``batch_fields``) is filled with pad_{s}, pad_{s+1}, ... (mod K). With K = 0 the batch is
left untouched: plain EOS padding.
"""

from __future__ import annotations

import torch

from hf_tokplug.plugin import Plugin, PluginError, add_tokens, hookimpl

from .config import RainbowPaddingConfig


def fill_rainbow(batch: dict, pad_ids: torch.Tensor, start_index: int) -> dict:
    """Replace the padded tail (``pad_mask``) of ``input_ids`` and ``labels`` by the cycle of ``pad_ids``."""
    pad_mask = batch["pad_mask"]  # (B, T) True where the collator padded
    k = pad_ids.numel()
    position = pad_mask.long().cumsum(dim=1) - 1  # 0, 1, 2, ... along each row's padded tail
    cycle = pad_ids.to(pad_mask.device)[(position.clamp(min=0) + start_index) % k]  # (B, T)
    batch["input_ids"] = torch.where(pad_mask, cycle, batch["input_ids"])
    if "labels" in batch:
        batch["labels"] = torch.where(pad_mask, cycle, batch["labels"])
    return batch


class RainbowPaddingPlugin(Plugin):
    config_class = RainbowPaddingConfig
    citation = """@inproceedings{rainbowpadding2026,
  title={Rainbow Padding: Mitigating Early Termination in Instruction-Tuned Diffusion LLMs},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2026}
}"""
    test_configs = {"noop": {"num_pads": 0}, "active": {"num_pads": 3}}
    test_traits = {"model_kind": "masked_lm", "batch_fields": ("pad_mask",)}  # conformance: a masked-diffusion task

    @property
    def tokens(self) -> list[str]:
        return [self.config.token_format.format(i=i) for i in range(self.config.num_pads)]

    def pad_ids(self, tokenizer) -> list[int]:
        return [int(tokenizer.convert_tokens_to_ids(t)) for t in self.tokens]

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:  # it rewrites the padded tail of masked-diffusion batches (marked by pad_mask)
            ctx.traits.require(self.name, task=ctx.task, model_kind="masked_lm", token_labels=True,
                               batch_fields=("pad_mask",))
        if "{i}" not in self.config.token_format:
            raise PluginError("token_format must contain {i}", where=f"{self.where}.token_format")

    @hookimpl
    def tokplug_prepare_tokenizer(self, ctx, tokenizer):
        if self.config.num_pads == 0:
            return
        if self.config.init == "eos":
            init, options = "copy", {"token": tokenizer.eos_token, "noise_std": self.config.noise_std}
        else:
            init, options = "mean", {}
        add_tokens(ctx, tokenizer, self.tokens, plugin=self.name, init=init, init_options=options)

    @hookimpl
    def tokplug_wrap_collator(self, ctx, collator):
        if self.config.num_pads == 0:
            return None
        pad_ids = torch.tensor(self.pad_ids(ctx.tokenizer))
        start = self.config.start_index

        def collate(examples):
            batch = collator(examples)
            if "pad_mask" not in batch:
                raise PluginError("rainbow padding needs a collator that marks padding (pad_mask): a task whose "
                                  "traits list pad_mask in batch_fields", where=self.where,
                                  fix="use the masked-diffusion SFT task's collator, or one that returns pad_mask")
            return fill_rainbow(batch, pad_ids, start)

        return collate

    @hookimpl
    def tokplug_prepare_generation(self, ctx, model, kwargs):
        if self.config.num_pads == 0 or "stop_token_ids" not in kwargs:
            return None
        return {**kwargs, "stop_token_ids": [*kwargs["stop_token_ids"], *self.pad_ids(ctx.tokenizer)]}

    @hookimpl
    def tokplug_model_card(self, ctx):
        k = self.config.num_pads
        if k == 0:
            return ["## Rainbow padding\n\nK = 0: plain EOS padding (baseline)."]
        return [f"## Rainbow padding\n\n{k} pad tokens (`{self.tokens[0]}` ... `{self.tokens[-1]}`) fill the tail after "
                f"one EOS, cyclically from pad_{self.config.start_index}; rows initialised with `{self.config.init}`. "
                "Cut generations at the first EOS or pad; the pads are special tokens, so `skip_special_tokens` "
                "removes them."]
