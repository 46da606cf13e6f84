"""``tokplug cdpo-score RECIPE``: score a DPO recipe's training pairs offline and write the cDPO weights.

The pairs are the trainer's own: the recipe's data phases run as in ``tokplug run`` (validate, data, tokenizer, TRL's
preparation and every plugin's ``tokplug_prepare_dataset``) without the policy model, so each weight sits on the
token the trainer will score. The file (safetensors, one tensor per pair keyed by the pair's token ids, with the
tokenizer's fingerprint, lambda, scale and both models in its metadata) goes next to a local data file
(``pairs.jsonl`` -> ``pairs.cdpo_weights.safetensors``), or to ``--out``. Train with
``plugins.cdpo.weights_path`` pointing at it; the models are then not loaded again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_tokplug.plugin import PluginError, TokPlugError, prepare_examples

SUFFIX = ".cdpo_weights.safetensors"


def configure_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a DPO recipe with a plugins.cdpo block (positive_model, negative_model)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for `tokplug run`")
    parser.add_argument("--out", default=None,
                        help=f"where to write the weights (default: next to a local data.train file, *{SUFFIX})")
    parser.add_argument("--plugin", default=None, help="the cdpo instance's name when the recipe has several")
    parser.add_argument("--device", default=None, help="device for the scoring models (default: cuda when there is one)")


def default_out(train_spec) -> Path | None:
    """Next to the training data when it is one local file."""
    files = getattr(train_spec, "data_files", None)
    path = getattr(train_spec, "path", None)
    candidates = [files] if isinstance(files, str) else list(files or []) if isinstance(files, list) else []
    if not candidates and isinstance(path, str) and Path(path).expanduser().is_file():
        candidates = [path]
    if len(candidates) != 1 or not Path(candidates[0]).expanduser().is_file():
        return None
    data = Path(candidates[0]).expanduser()
    return data.with_name(data.name.split(".")[0] + SUFFIX)


def run_command(args: argparse.Namespace) -> int:
    import torch

    from .plugin import CDPOPlugin, pairs, save_weights

    ctx, data, _ = prepare_examples(args.recipe, args.overrides)
    found = [p for p in ctx.plugins.values() if isinstance(p, CDPOPlugin)]
    if args.plugin is not None:
        found = [p for p in found if p.name == args.plugin]
    if len(found) != 1:
        raise TokPlugError(f"{args.recipe} enables {len(found)} cdpo plugins{' named ' + args.plugin if args.plugin else ''}",
                           where=f"{args.recipe}: plugins", fix="enable one cdpo block (or name it with --plugin)")
    plugin = found[0]
    c = plugin.config
    if c.positive_model is None or c.negative_model is None:
        raise PluginError("cdpo-score needs positive_model and negative_model", where=plugin.where,
                          fix="set plugins.cdpo.positive_model and negative_model")
    spec = ctx.recipe.data.train
    out = Path(args.out).expanduser() if args.out else default_out(spec)
    if out is None:
        raise TokPlugError(f"data.train ({getattr(spec, 'path', spec)}) is not one local file: say where the weights go",
                           where="--out", fix=f"pass --out FILE{SUFFIX}")
    if out.is_dir():
        raise TokPlugError(f"--out {str(out)!r} is a folder", where="--out", fix=f"give a file name ending {SUFFIX}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = pairs(data["train"])
    plugin.weights = plugin.score(rows, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(out.name + ".partial")
    save_weights(staged, plugin.weights, plugin.metadata(ctx.base_tokenizer or ctx.tokenizer))
    staged.replace(out)  # never a half-written weights file
    values = torch.cat(list(plugin.weights.values()))
    print(f"scored {len(rows)} pairs ({len(values)} rejected tokens, mean weight {float(values.mean()):.3f}) -> {out}")
    print(f"train with: plugins.{plugin.name}.weights_path={out}")
    return 0
