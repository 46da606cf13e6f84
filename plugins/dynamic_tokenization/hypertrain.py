"""Training a hypernetwork for a frozen model: random re-tokenisation of text, two objectives.

Every step: 0.5 x lexical MSE (single base tokens must come out as their own rows: the identity), and after
``warmup_steps`` identity-only steps, the model's loss on a batch re-tokenised at a random merge level in
``[1, max_merges]``:

    distill  encoders without an LM head (sentence encoders such as MiniLM): 1 - cosine between the mean-pooled
             output under dynamic tokens and under the original tokenization (replaces the paper's MLM loss)
    lm       decoders: next-token cross-entropy over the base vocabulary plus the batch's dynamic tokens, whose
             input rows come from the input head and whose output rows (logits) from the output head

The model's weights never change; only the hypernetwork trains (AdamW, one-cycle schedule).
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from .embeddings import HyperNetwork, mean_of_pieces, pad_pieces, piece_table
from .encoder import DynamicEncoder
from .merge import DynamicBatch, encode_batch, merge_batch

OBJECTIVES = ("distill", "lm")


def default_objective(model: Any) -> str:
    return "lm" if model.get_output_embeddings() is not None else "distill"


def lm_loss(model: Any, encoder: DynamicEncoder, batch: DynamicBatch, out_rows: torch.Tensor,
            use_cache: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (dynamic ids included) with predicted input and output rows.

    ``out_rows``: ``(V, H)`` the frozen LM head rows of the base vocabulary; the batch's dynamic tokens get theirs
    from the hypernetwork's output head (FVT of the pieces' output rows when the encoder uses FVT)."""
    device = out_rows.device
    embeds = encoder.inputs_embeds(batch, use_cache=use_cache)  # (B, T, H)
    mask = batch.attention_mask.to(device)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, H)
    vocab = out_rows[: batch.base_vocab]
    if batch.pieces:
        ids = pad_pieces(batch.pieces, device)
        if encoder.hypernet is not None and "output" in encoder.hypernet.heads:
            dyn = encoder.hypernet(ids, "output")
        else:
            dyn = mean_of_pieces(out_rows, ids)
        vocab = torch.cat([vocab, dyn.to(vocab.dtype)])
    logits = hidden[:, :-1] @ vocab.T  # (B, T-1, V + n): dynamic id base_vocab + i is column base_vocab + i
    targets = batch.ids[:, 1:].to(device)
    valid = (targets >= 0) & (batch.ids[:, :-1].to(device) >= 0)
    return torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid])


def train_hypernetwork(model: Any, tokenizer: Any, texts: list[str], *, objective: str | None = None,
                       steps: int = 300, batch_size: int = 32, max_merges: int = 200, warmup_steps: int = 50,
                       lr: float = 1e-3, lexical_weight: float = 0.5, mode: str = "pretokens", width: int = 256,
                       layers: int = 2, heads: int = 4, seed: int = 0, max_length: int = 128, progress: bool = True,
                       on_step: Callable[[dict[str, float]], None] | None = None
                       ) -> tuple[HyperNetwork, list[dict[str, float]]]:
    """Train a hypernetwork for ``model`` (frozen) on ``texts``; returns it and the per-step log."""
    from tqdm.auto import tqdm

    objective = objective or default_objective(model)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    decoder = objective == "lm"
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.eval().requires_grad_(False)
    emb_in = model.get_input_embeddings().weight.detach()
    out_layer = model.get_output_embeddings() if decoder else None
    emb_out = out_layer.weight.detach() if out_layer is not None else emb_in
    table = piece_table(model, output_head=decoder)
    net = HyperNetwork(table, emb_in.shape[1], width=width, layers=layers, heads=heads, output_head=decoder)
    net.to(emb_in.device)
    encoder = DynamicEncoder(model, tokenizer, "hypernet", net, mode)
    teacher = DynamicEncoder(model, tokenizer, "fvt", mode=mode)  # at 0 merges: the original tokenization
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), emb_in.shape[0])) if i not in specials]
    log = []
    for step in tqdm(range(steps), desc="hypernetwork", disable=not progress, mininterval=5):
        singles = torch.tensor(rng.sample(vocab, min(256, len(vocab))), device=emb_in.device)
        lexical = torch.nn.functional.mse_loss(net(singles.unsqueeze(1)), emb_in[singles])
        if decoder:
            lexical = lexical + torch.nn.functional.mse_loss(net(singles.unsqueeze(1), "output"), emb_out[singles])
        loss, task = lexical, torch.tensor(0.0)
        if step >= warmup_steps:
            chunk = rng.sample(texts, min(batch_size, len(texts)))
            merges = rng.randint(1, max_merges)
            if decoder:
                batch = merge_batch(encode_batch(tokenizer, chunk, mode, max_length=max_length), max_merges=merges)
                task = lm_loss(model, encoder, batch, emb_out)
            else:
                with torch.no_grad():
                    target, _ = teacher.embed(chunk, 0, max_length)
                pred, _ = encoder.embed(chunk, merges, max_length, use_cache=False)
                task = 1 - (pred * target).sum(-1).mean()
            loss = task + lexical_weight * lexical
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        row = {"step": step, "loss": loss.item(), f"{objective}_loss": task.item(), "lexical": lexical.item()}
        log.append(row)
        if on_step is not None:
            on_step(row)
    net.eval()
    return net, log
