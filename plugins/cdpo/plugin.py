"""cDPO (ICML 2025): DPO whose rejected tokens are weighted by how "critical" they are.

A positive model (trained on correct trajectories) and a negative one (on incorrect ones) score each token of a
rejected completion offline: p_t = softmax((1 + lam) z_pos - lam z_neg)[y_t], weight w_t = 1 - p_t (chosen tokens
weigh 1). DPO then runs with the rejected side's per-token log-ratios multiplied by w_t, sequence-level:
-log sigmoid(beta sum_t Delta^w_t - beta sum_t w_t Delta^l_t), through ``tokplug_token_weights``.

The weights are computed before training over the final prepared training pairs (TRL's own tokenisation of prompt
and rejected completion), keyed per pair, and saved with the run (and its checkpoints) as
``cdpo_weights.safetensors``, reusable with ``weights_path``; ``tokplug cdpo-score RECIPE`` scores the same pairs
offline and writes the file next to the data. In training each rejected row is looked up by its exact token ids; a
row whose ids or length differ from the scored ones (another tokeniser, truncation) is an error, never a shifted
weight. ``loss: position`` is the reference code's per-position form instead (a :class:`MainLoss`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from hf_tokplug.plugin import (
    MainLoss,
    Plugin,
    PluginConfig,
    PluginError,
    hookimpl,
    load_frozen_causal_lm,
    reference_log_probs,
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
        loss: ``sequence`` (default, the paper's framing): -log sigmoid(beta sum_t Delta^w_t - beta sum_t w_t
            Delta^l_t), DPO's own loss with weighted rejected tokens; ``position``: the reference code's
            -log sigmoid(beta (Delta^w_k - w_k Delta^l_k)) averaged over completion positions k, chosen and rejected
            tokens paired by index (replaces DPO's loss; ``loss_type: sigmoid`` only).
    """

    positive_model: str | None = Field(None, description="Model trained on correct trajectories.")
    negative_model: str | None = Field(None, description="Model trained on incorrect trajectories.")
    lam: float = Field(1.0, ge=0.0, description="Contrast strength lambda.")
    scale: float = Field(1.0, ge=0.0, le=1.0, description="w = 1 - scale * p (1: the paper; 0: plain DPO).")
    weights_path: str | None = Field(None, description="Precomputed cdpo_weights.safetensors.")
    batch_size: int = Field(8, ge=1, description="Pairs per scoring forward.")
    loss: Literal["sequence", "position"] = Field("sequence", description="Sequence-level (paper) or per-position "
                                                                          "(reference code) loss.")


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """A short digest of a tokenizer's vocabulary: weights scored with one tokenizer are refused with another."""
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def weights_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def score_pairs(pairs: list[tuple[list[int], list[int]]], positive, negative, *, lam: float, scale: float,
                batch_size: int, device=None, desc: str = "cDPO: scoring rejected tokens") -> dict[str, torch.Tensor]:
    """One weight per rejected token of each ``(prompt_ids, rejected_ids)`` pair, keyed by the pair's ids:
    ``w_t = 1 - scale * softmax((1 + lam) z_pos - lam z_neg)[y_t]``, without gradient."""
    from tqdm.auto import tqdm

    out = {}
    with torch.no_grad():
        for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
            chunk = pairs[start: start + batch_size]
            length = max(len(p) + len(r) for p, r in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            z = (1 + lam) * positive(input_ids=ids, attention_mask=mask).logits.float() \
                - lam * negative(input_ids=ids, attention_mask=mask).logits.float()
            probs = torch.softmax(z, dim=-1)
            for i, (p, r) in enumerate(chunk):
                # output position t predicts token t + 1: the rejected tokens are predicted at len(p) - 1 ...
                at = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=ids.device)
                picked = probs[i, at].gather(-1, torch.tensor(r, device=ids.device)[:, None])[:, 0]
                out[_key(p + r)] = (1.0 - scale * picked).cpu()
    return out


def save_weights(path: str | Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata=metadata)


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
        self.ref = None  # position loss: the reference's per-token log-probs

    @staticmethod
    @hookimpl
    def tokplug_register_commands(register):
        from .score import configure_command, run_command

        register("cdpo-score", "score a DPO recipe's training pairs with the positive and negative models and write "
                 "cDPO weights next to the data", configure_command, run_command)

    @hookimpl
    def tokplug_validate(self, ctx):
        if ctx.traits is not None:
            ctx.traits.require(self.name, task=ctx.task, model_kind="causal_lm", token_labels=True,
                               roles=("chosen", "rejected"))
        c = self.config
        if c.weights_path is None and (c.positive_model is None or c.negative_model is None):
            raise PluginError("cdpo needs positive_model and negative_model (or weights_path from an earlier run)",
                              where=self.where, fix="set plugins.cdpo.positive_model and negative_model, or score "
                                                    "offline with `tokplug cdpo-score RECIPE`")
        if c.weights_path is not None:
            self._check_weights_file(ctx)
            return
        if ctx.recipe is None:
            return
        policy = self._policy_vocab(ctx)
        for key in ("positive_model", "negative_model"):
            location = getattr(c, key)
            if location.startswith((".", "/", "~")) and not Path(location).expanduser().exists():
                raise PluginError(f"{key} {location!r} is a path, and there is nothing there", where=f"{self.where}.{key}",
                                  fix="give the folder of the run that trained it")
            if policy is None:
                continue
            try:
                theirs = tokenizer_vocab(location)
            except Exception:
                continue
            if theirs != policy:
                raise PluginError(f"{key} {location!r} has another tokenizer than the policy: its per-token "
                                  "estimates would not line up", where=f"{self.where}.{key}",
                                  fix="use models trained from the policy's base (same tokenizer)")

    @staticmethod
    def _policy_vocab(ctx) -> dict[str, int] | None:
        if ctx.recipe is None:
            return None
        spec = ctx.recipe.model
        try:
            return tokenizer_vocab(spec.tokenizer or spec.name_or_path)
        except Exception:
            return None  # not reachable now: compared when the models load

    def _check_weights_file(self, ctx) -> None:
        path = Path(self.config.weights_path).expanduser()
        where = f"{self.where}.weights_path"
        if not path.is_file():
            raise PluginError(f"weights_path {str(path)!r} is not a file", where=where,
                              fix=f"point at the {WEIGHTS_FILE} of an earlier cdpo run or `tokplug cdpo-score` output")
        try:
            meta = weights_metadata(path)
        except Exception as exc:
            raise PluginError(f"weights_path {str(path)!r} is not a safetensors file ({exc})", where=where,
                              fix="score the data again with `tokplug cdpo-score RECIPE`") from None
        policy = self._policy_vocab(ctx)
        if meta.get("tokenizer") and policy is not None and meta["tokenizer"] != vocab_fingerprint(policy):
            raise PluginError(f"weights_path {str(path)!r} was scored with another tokenizer than this run's policy: "
                              "its per-token weights would not line up", where=where,
                              fix="score this recipe's data again with `tokplug cdpo-score RECIPE`")

    # ------------------------------------------------------------------------------------------------ scoring

    @hookimpl(trylast=True)
    def tokplug_prepare_dataset(self, ctx, dataset, split):
        if split != "train" or self.weights is not None:
            return None
        if not {"prompt_ids", "rejected_ids"} <= set(dataset.column_names):
            raise PluginError(f"cdpo scores TRL's prepared preference pairs (prompt_ids, rejected_ids); the {split} "
                              f"data has {dataset.column_names}", where=self.where, fix="use a DPO task (TRL's prepared pairs)")
        if ctx.model is None:
            return None  # no model (preview, `tokplug cdpo-score`): the pairs are scored by whoever has the models
        if self.config.weights_path is not None:
            from safetensors.torch import load_file

            self.weights = load_file(str(Path(self.config.weights_path).expanduser()))
        else:
            param = next(unwrap(ctx.model).parameters())
            self.weights = self.score(pairs(dataset), device=param.device, dtype=param.dtype)
        self.lengths = [len(p) + len(r) for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"])]
        missing = sum(_key(p + r) not in self.weights for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"]))
        if missing:
            raise PluginError(f"{missing} of {len(dataset)} training pairs have no cdpo weights in "
                              f"{self.config.weights_path or 'the scores'}: other data or another tokenisation",
                              where=f"{self.where}.weights_path",
                              fix="score this data (drop weights_path, or run `tokplug cdpo-score RECIPE`)")
        return None

    def score(self, rows: list[tuple[list[int], list[int]]], *, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """Load the positive and negative models (frozen) and score ``rows`` (see :func:`score_pairs`)."""
        c = self.config
        pos, neg = (load_frozen_causal_lm(getattr(c, key), dtype=dtype, what=key, where=f"{self.where}.{key}").to(device)
                    for key in ("positive_model", "negative_model"))
        try:
            return score_pairs(rows, pos, neg, lam=c.lam, scale=c.scale, batch_size=c.batch_size, device=device)
        finally:
            del pos, neg

    def metadata(self, tokenizer) -> dict[str, str]:
        c = self.config
        # the model's own tokenizer, what validate compares a weights file against (ids are checked per pair anyway)
        return {"tokplug": "cdpo", "tokenizer": vocab_fingerprint(tokenizer.get_vocab()), "lam": str(c.lam),
                "scale": str(c.scale), "positive_model": str(c.positive_model), "negative_model": str(c.negative_model),
                "pairs": str(len(self.weights or {}))}

    @hookimpl
    def tokplug_post_trainer_create(self, ctx, trainer):
        """Weights are per token of the whole rejected completion: a trainer that truncates pairs would score
        other tokens than the weights describe, so that is refused here, before training."""
        if self.config.loss == "position":
            types = list(getattr(trainer, "loss_types", None) or ["sigmoid"])
            if types != ["sigmoid"]:
                raise PluginError(f"cdpo loss: position is the sigmoid DPO loss per position; the trainer's loss_type "
                                  f"is {types}", where=f"{self.where}.loss",
                                  fix="use loss: sequence (it weights tokens inside any DPO loss type), or "
                                      "train.loss_type: sigmoid")
            self.ref = reference_log_probs(trainer)
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

    # ------------------------------------------------------------------------------------------------ weights

    def _rejected_weights(self, ctx, batch) -> dict[int, torch.Tensor]:
        """Row -> the weights of its scored tokens, for the batch's rejected rows that were scored (evaluation
        pairs were not: weight 1). A training row that was not scored, or whose length differs, is an error."""
        found = {}
        mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)
        training = ctx.trainer is not None and ctx.trainer.model.training
        for row in batch.rows("rejected").nonzero()[:, 0].tolist():
            ids = batch.input_ids[row][mask[row].bool()].tolist()
            count = int(batch.scored[row].sum())
            w = self.weights.get(_key(ids))
            if w is None:
                if training:
                    raise PluginError("a training pair has no cdpo weights (its token ids differ from the scored "
                                      "ones)", where=self.where, fix="run without weights_path to score this data")
                continue
            if len(w) != count:
                raise PluginError(f"cdpo weights of a pair cover {len(w)} tokens, the trainer scores {count}: "
                                  "the completion was truncated or tokenised differently", where=self.where,
                                  fix="raise train.max_length (or data.max_length) so no rejected completion is cut")
            found[row] = w.to(batch.targets.device)
        if found and training:
            self.log(ctx, "rejected_weight", float(torch.cat(list(found.values())).mean()))
        return found

    @hookimpl
    def tokplug_token_weights(self, ctx, batch):
        if self.weights is None or self.config.loss != "sequence" or not batch.rows("rejected").any():
            return None
        weights = torch.ones(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
        for row, w in self._rejected_weights(ctx, batch).items():
            weights[row, batch.scored[row].nonzero()[:, 0]] = w
        return weights

    @hookimpl
    def tokplug_loss_terms(self, ctx, model, inputs, outputs, batch):
        """``loss: position``: -log sigmoid(beta (Delta^w_k - w_k Delta^l_k)) averaged over completion positions k,
        the k-th chosen token paired with the k-th rejected one (a side that ended counts Delta 0), replacing DPO's
        loss (a :class:`MainLoss`)."""
        if self.config.loss != "position" or self.weights is None or self.ref is None:
            return None
        chosen, rejected = batch.rows("chosen").nonzero()[:, 0], batch.rows("rejected").nonzero()[:, 0]
        if len(chosen) != len(rejected) or not len(chosen):
            return None
        delta = outputs.token_log_probs(batch) - self.ref(batch).to(batch.targets.device)
        found = self._rejected_weights(ctx, batch)
        beta = float(getattr(ctx.trainer, "beta", 0.1))
        losses = []
        for c_row, r_row in zip(chosen.tolist(), rejected.tolist()):
            dw = delta[c_row, batch.scored[c_row]]
            dl = delta[r_row, batch.scored[r_row]]
            w = found.get(r_row, torch.ones(len(dl), device=dl.device))
            width = max(len(dw), len(dl))
            pad = lambda x: torch.nn.functional.pad(x, (0, width - len(x)))  # noqa: E731
            losses.append(-torch.nn.functional.logsigmoid(beta * (pad(dw) - pad(w * dl))))
        return {"position_loss": MainLoss(torch.cat(losses).mean())}

    @hookimpl
    def tokplug_save(self, ctx, output_dir):
        if self.weights:  # the scores travel with the run (weights_path reuses them)
            save_weights(Path(output_dir) / WEIGHTS_FILE, self.weights, self.metadata(ctx.base_tokenizer or ctx.tokenizer))
            ctx.add_state_file(self.name, WEIGHTS_FILE)

    @hookimpl
    def tokplug_model_card(self, ctx):
        c = self.config
        form = "per-position loss of the reference code" if c.loss == "position" else "sequence-level loss"
        return [f"## cDPO\n\nDPO with critical-token weights on rejected completions (w = 1 - p, contrastive estimate "
                f"of `{c.positive_model}` vs `{c.negative_model}`, lambda {c.lam}; {form})."]


def pairs(dataset) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, rejected_ids)`` of each row of TRL's prepared preference data."""
    return list(zip(dataset["prompt_ids"], dataset["rejected_ids"]))
