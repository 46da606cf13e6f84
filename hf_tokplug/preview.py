"""``tokplug preview``: what the trainer will see for a few examples, after every plugin's data hooks.

The run's own phases up to the collator, without the model: validate, the raw data, the tokenizer phase
(``tokplug_load_tokenizer``, task tokens, ``tokplug_prepare_tokenizer``), the task's examples of the first ``n``
training rows, ``tokplug_prepare_dataset`` and the wrapped collator. No model weights load (``ctx.model`` is
``None`` in the data hooks here).
"""

from __future__ import annotations

from typing import Any

from . import lifecycle
from .training import token_batch


def preview(runner: Any, n: int = 2, max_tokens: int = 64, console: Any = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ctx, data, collator = lifecycle.prepare_examples(runner, rows=n)
    recipe, tokenizer = runner.recipe, ctx.tokenizer
    train = data["train"]
    batch = collator([train[i] for i in range(len(train))])
    # the trainer-independent view gives token labels for every task that scores tokens (DPO's completions too)
    view = token_batch(object(), batch, ctx.traits).labels if ctx.traits.token_labels else None

    added = {t.id: t for t in ctx.added_tokens}
    pad_id = tokenizer.pad_token_id
    summary = {"examples": [], "added_tokens": [t.token for t in ctx.added_tokens]}
    console.print(
        f"[bold]{runner.source}[/]: task {recipe.task}, plugins {', '.join(ctx.plugins) or 'none'}, "
        f"{len(ctx.added_tokens)} added token(s)"
    )
    keys = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if hasattr(v, "shape"))
    console.print(f"batch: {keys}")
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row].tolist()
        labels = view[row].tolist() if view is not None else [None] * len(ids)
        attn = batch["attention_mask"][row].tolist() if "attention_mask" in batch else [1] * len(ids)
        padded = batch["pad_mask"][row].tolist() if "pad_mask" in batch else [a == 0 for a in attn]
        table = Table("pos", "token", "id", "label", "attn", "note", title=f"example {row}")
        trained = sum(1 for x in labels if x is not None and x != -100)
        for pos, (tid, lab, att) in enumerate(zip(ids, labels, attn)):
            if pos >= max_tokens:
                table.add_row("...", f"{len(ids) - max_tokens} more", "", "", "", "")
                break
            notes = []
            if tid in added:
                notes.append(f"added by {added[tid].plugin}")
            if padded[pos] or (tid == pad_id and pos > 0 and ids[pos - 1] == pad_id):
                notes.append("pad")
            label = "-" if lab is None else ("masked" if lab == -100 else str(lab))
            style = "dim" if label == "masked" else ("magenta" if tid in added else None)
            table.add_row(str(pos), repr(tokenizer.convert_ids_to_tokens(tid)), str(tid), label, str(att), ", ".join(notes), style=style)
        console.print(table)
        summary["examples"].append({"length": len(ids), "trained_tokens": trained, "pads": sum(map(bool, padded))})
    return summary
