"""cDPO (ICML 2025): DPO whose rejected tokens are weighted by how "critical" they are.

A positive model (trained on correct trajectories) and a negative one (on incorrect ones) score each token of a
rejected completion offline: p_t = softmax((1 + lam) z_pos - lam z_neg)[y_t], weight w_t = 1 - p_t (chosen tokens
weigh 1). DPO then runs with the rejected side's per-token log-ratios multiplied by w_t, sequence-level:
-log sigmoid(beta sum_t Delta^w_t - beta sum_t w_t Delta^l_t), through ``tokplug_token_weights``.

The weights are computed before training over the final prepared training pairs (TRL's own tokenisation of prompt
and rejected completion), keyed per pair, and saved with the run (and its checkpoints) as
``cdpo_weights.safetensors``, reusable with ``weights_path``. In training each rejected row is looked up by its exact token ids; a row whose
ids or length differ from the scored ones (another tokeniser, truncation) is an error, never a shifted weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import Field

from hf_tokplug.plugin import (
    Plugin,
    PluginConfig,
    PluginError,
    hookimpl,
    load_frozen_causal_lm,
    tokenizer_vocab,
    unwrap,
)

WEIGHTS_FILE = "cdpo_weights.safetensors"


class CDPOConfig(PluginConfig):
    """cDPO: critical-token weights on DPO's rejected completions.

    Args:
        positive_model: the model trained on correct trajectories (run folder, LoRA adapter folder, Hub repo or
            ``toy://NAME``); its tokenizer must be the policy's.
        negative_model: the model trained on incorrect trajectories (same rules).
        lam: lambda of the contrastive estimate softmax((1 + lam) z_pos - lam z_neg) (the paper: 1).
        scale: w_t = 1 - scale * p_t: 1 is the paper's weight; 0 makes every weight 1 (plain DPO, for parity checks).
        weights_path: a ``cdpo_weights.safetensors`` written by an earlier run on the same data and tokenizer; the
            models are then not loaded.
        batch_size: pairs per scoring forward.
    """

    positive_model: str | None = Field(None, description="Model trained on correct trajectories.")
    negative_model: str | None = Field(None, description="Model trained on incorrect trajectories.")
    lam: float = Field(1.0, ge=0.0, description="Contrast strength lambda.")
    scale: float = Field(1.0, ge=0.0, le=1.0, description="w = 1 - scale * p (1: the paper; 0: plain DPO).")
    weights_path: str | None = Field(None, description="Precomputed cdpo_weights.safetensors.")
    batch_size: int = Field(8, ge=1, description="Pairs per scoring forward.")


def _key(ids: list[int]) -> str:
    return hashlib.sha1(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


class CDPOPlugin(Plugin):
    config_class = CDPOConfig
    paper = "https://arxiv.org/abs/2411.19943"
    citation = """@inproceedings{lin2025critical,
  title={Critical Tokens Matter: Token-Level Contrastive Estimation Enhances {LLM}'s Reasoning Capability},
  author={Lin, Zicheng and Liang, Tian and Xu, Jiahao and Wang, Xing and Luo, Ruilin and Shi, Chufan and Li, Siheng and Yang, Yujiu and Tu, Zhaopeng},
  booktitle={International Conference on Machine Learning},
  year={2025}
}"""
    test_traits = {"roles": ("chosen", "rejected")}
    test_configs = {"noop": {"positive_model": "toy://qwen2", "negative_model": "toy://llama", "scale": 0.0},
                    "active": {"positive_model": "toy://qwen2", "negative_model": "toy://llama", "lam": 1.0}}

    def __init__(self, name: str, config: CDPOConfig):
        super().__init__(name, config)
        self.weights: dict[str, torch.Tensor] | None = None
        self.lengths: list[int] = []

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True,
                               roles=("chosen", "rejected"))
        c = self.config
        if c.weights_path is None and (c.positive_model is None or c.negative_model is None):
            raise PluginError("cdpo needs positive_model and negative_model (or weights_path from an earlier run)",
                              where=self.where, fix="set plugins.cdpo.positive_model and negative_model")
        if c.weights_path is not None and not Path(c.weights_path).is_file():
            raise PluginError(f"weights_path {c.weights_path!r} is not a file", where=f"{self.where}.weights_path",
                              fix=f"point at the {WEIGHTS_FILE} of an earlier cdpo run")
        if ctx.recipe is None or c.weights_path is not None:
            return
        spec = ctx.recipe.model
        try:
            policy = tokenizer_vocab(spec.tokenizer or spec.name_or_path)
        except Exception:
            return  # not reachable now: compared when the models load
        for key in ("positive_model", "negative_model"):
            location = getattr(c, key)
            if location.startswith((".", "/", "~")) and not Path(location).expanduser().exists():
                raise PluginError(f"{key} {location!r} is a path, and there is nothing there", where=f"{self.where}.{key}",
                                  fix="give the folder of the run that trained it")
            try:
                theirs = tokenizer_vocab(location)
            except Exception:
                continue
            if theirs != policy:
                raise PluginError(f"{key} {location!r} has another tokenizer than the policy: its per-token "
                                  "estimates would not line up", where=f"{self.where}.{key}",
                                  fix="use models trained from the policy's base (same tokenizer)")

    # ------------------------------------------------------------------------------------------------ scoring

    @hookimpl(trylast=True)
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        if split != "train" or self.weights is not None:
            return None
        if not {"prompt_ids", "rejected_ids"} <= set(dataset.column_names):
            raise PluginError(f"cdpo scores TRL's prepared preference pairs (prompt_ids, rejected_ids); the {split} "
                              f"data has {dataset.column_names}", where=self.where, fix="use a DPO task (TRL's prepared pairs)")
        if self.config.weights_path is not None:
            from safetensors.torch import load_file

            self.weights = load_file(self.config.weights_path)
        else:
            self.weights = self._score(ctx, dataset)
        self.lengths = [len(p) + len(r) for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"])]
        missing = sum(_key(p + r) not in self.weights for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"]))
        if missing:
            raise PluginError(f"{missing} of {len(dataset)} training pairs have no cdpo weights in "
                              f"{self.config.weights_path or 'the scores'}: other data or another tokenisation",
                              where=f"{self.where}.weights_path", fix="score this data (drop weights_path)")
        return None

    @hookimpl
    def tokplug_post_trainer_create(self, ctx, trainer):
        """Weights are per token of the whole rejected completion: a trainer that truncates pairs would score
        other tokens than the weights describe, so that is refused here, before training."""
        limit = getattr(trainer.args, "max_length", None)
        if self.weights is None or not limit:
            return
        cut = sum(length > limit for length in self.lengths)
        if cut:
            raise PluginError(f"{cut} of {len(self.lengths)} training pairs are longer than the trainer's max_length "
                              f"{limit} (longest {max(self.lengths)} tokens): truncated, their rejected tokens would "
                              "not match the cdpo weights", where=self.where,
                              fix=f"raise data.max_length (train.max_length) to at least {max(self.lengths)}, or drop "
                                  "the longest pairs")

    @torch.no_grad()
    def _score(self, ctx, dataset) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        param = next(unwrap(ctx.model).parameters())
        pos, neg = (load_frozen_causal_lm(getattr(self.config, key), dtype=param.dtype, what=key,
                                          where=f"{self.where}.{key}").to(param.device)
                    for key in ("positive_model", "negative_model"))
        lam, out = self.config.lam, {}
        rows = list(zip(dataset["prompt_ids"], dataset["rejected_ids"]))
        for start in tqdm(range(0, len(rows), self.config.batch_size), desc="cDPO: scoring rejected tokens", leave=False):
            chunk = rows[start: start + self.config.batch_size]
            length = max(len(p) + len(r) for p, r in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
            ids, mask = ids.to(param.device), mask.to(param.device)
            z = (1 + lam) * pos(input_ids=ids, attention_mask=mask).logits.float() \
                - lam * neg(input_ids=ids, attention_mask=mask).logits.float()
            probs = torch.softmax(z, dim=-1)
            for i, (p, r) in enumerate(chunk):
                # output position t predicts token t + 1: the rejected tokens are predicted at len(p) - 1 ...
                at = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=ids.device)
                picked = probs[i, at].gather(-1, torch.tensor(r, device=ids.device)[:, None])[:, 0]
                out[_key(p + r)] = (1.0 - self.config.scale * picked).cpu()
        del pos, neg
        return out

    # ------------------------------------------------------------------------------------------------ weights

    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        if self.weights is None:
            return None
        rejected = batch.rows("rejected")
        if not rejected.any():
            return None
        weights = torch.ones(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
        mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)
        values = []
        for row in rejected.nonzero()[:, 0].tolist():
            ids = batch.input_ids[row][mask[row].bool()].tolist()
            scored = batch.scored[row].nonzero()[:, 0]
            w = self.weights.get(_key(ids))
            if w is None:
                if ctx.trainer is not None and ctx.trainer.model.training:
                    raise PluginError("a training pair has no cdpo weights (its token ids differ from the scored "
                                      "ones)", where=self.where, fix="run without weights_path to score this data")
                continue  # an evaluation pair (only training pairs are scored): weight 1
            if len(w) != len(scored):
                raise PluginError(f"cdpo weights of a pair cover {len(w)} tokens, the trainer scores {len(scored)}: "
                                  "the completion was truncated or tokenised differently", where=self.where,
                                  fix="raise train.max_length (or data.max_length) so no rejected completion is cut")
            weights[row, scored] = w.to(weights.device)
            values.append(w)
        if values and ctx.trainer is not None and ctx.trainer.model.training:
            self.log(ctx, "rejected_weight", float(torch.cat(values).mean()))
        return weights

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if self.weights:  # the scores travel with the run (weights_path reuses them)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.weights.items()}, str(Path(output_dir) / WEIGHTS_FILE))
            ctx.add_state_file(self.name, WEIGHTS_FILE)

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        return [f"## cDPO\n\nDPO with critical-token weights on rejected completions (w = 1 - p, contrastive estimate "
                f"of `{c.positive_model}` vs `{c.negative_model}`, lambda {c.lam})."]
