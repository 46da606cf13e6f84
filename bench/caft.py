"""CAFT benchmark: 4 auxiliary heads vs plain SFT on a toy Llama pretrained here.

    python bench/caft.py [--sft-steps 150] [--timing-steps 30]

1. Pretrain toy://llama on bundled KJV text (full fine-tuning, cached under $HF_TOKPLUG_CACHE/bench).
2. Stage A (cached): 4 transformer heads on the frozen pretrained model, text data.
3. ``next_k_acc``: each head's next-(1+i)-token accuracy on held-out text (the eval split).
4. ``eval_loss``: plain SFT and CAFT (Stage B, LoRA r 16, frozen heads, alpha 0.01, beta 0.8, rsine) with the same
   data, seed and step budget on chat data; eval loss = next-token cross-entropy of the final model on the eval split
   (computed by this script the same way for both, no head terms).
5. ``step_time_ratio``: CAFT / plain median step time, alternated A/B/A/B in one process.
6. ``flop_ratio``: analytical, per training step of the same batch (LoRA: frozen weights get input gradients only, so
   a step costs forward + input-gradient backward ~= 2 x forward for both sides; LoRA's own FLOPs are ignored):

       F_plain = 2 * P_body * N + A * L + 2 * H * V * S_main
       F_layer = 2 * P_layer * N + A;   F_head_i = F_layer + 2 * H * V * S_i
       flop_ratio = (2 * F_plain + sum_i (2 * F_head_i + F_layer + 2 * H * V * S_i)) / (2 * F_plain)

   (the last two terms are the recomputation in backward: head layers and chunk projections are checkpointed)

   with N tokens in the batch, P_body the non-embedding parameters, P_layer one decoder layer's, L layers,
   A = 2 * T * H * N the causal attention score/value products of one layer (T = padded length), S_main the
   positions the main loss projects (all N on CPU, where TRL's fused head scores every position) and S_i the
   valid positions of head i.
7. ``peak_mem_ratio``: CUDA: peak allocated memory of one training step, CAFT / plain. CPU (no allocator stats):
   bytes saved for backward during one step (``torch.autograd.graph.saved_tensors_hooks``, each storage once),
   which is what stacking full-vocabulary logits would inflate. ``peak_mem_method`` says which.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import StepTimer, TimerPlugin  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_tokplug  # noqa: E402
from hf_tokplug import manager, toy  # noqa: E402
from hf_tokplug.data import tokenize_dataset  # noqa: E402
from hf_tokplug.recipe import DataSpec, parse_recipe  # noqa: E402
from hf_tokplug.runners.causal_lm import CausalLMSFT  # noqa: E402
from hf_tokplug_plugins.caft.heads import decoder_layers, head_losses  # noqa: E402

CHAT = {"train": "toy://kjv-chat", "eval": {"path": "toy://kjv-chat", "split": "eval"}, "assistant_only_loss": True,
        "max_length": 128}
COMMON = {"gradient_checkpointing": False, "seed": 0, "disable_tqdm": True, "report_to": "none", "logging_steps": 25}
CACHE = toy.cache_root() / "bench" / "caft-v1"


def run(name: str, out: Path, **sections) -> CausalLMSFT:
    recipe = parse_recipe({"task": "causal_lm_sft", "output_dir": str(out / name), "overwrite": True, **sections})
    runner = CausalLMSFT(recipe, f"bench:{name}")
    runner.run()
    return runner


def pretrained_base(steps: int) -> Path:
    target = CACHE / "base"
    if not (target / "model.safetensors").is_file():
        print("pretraining the toy base (cached)...", flush=True)
        run("base", CACHE, model={"name_or_path": "toy://llama"},
            data={"train": "toy://kjv-text", "max_length": 128},
            train={**COMMON, "max_steps": steps, "learning_rate": 3e-3, "per_device_train_batch_size": 32,
                   "lr_scheduler_type": "cosine", "warmup_steps": 20, "save_strategy": "no"})
    return target


def stage_a_heads(base: Path, steps: int) -> Path:
    target = CACHE / "heads"
    if not (target / "caft_heads.safetensors").is_file():
        print("training Stage A heads (cached)...", flush=True)
        run("heads", CACHE, model={"name_or_path": str(base)},
            data={"train": "toy://kjv-text", "max_length": 128},
            plugins={"caft": {"stage": "heads", "num_heads": 4}},
            train={**COMMON, "max_steps": steps, "learning_rate": 3e-3, "per_device_train_batch_size": 32,
                   "lr_scheduler_type": "cosine", "warmup_steps": 20, "save_strategy": "no"})
    return target


def eval_batches(tokenizer, spec: DataSpec, split: str, n: int = 256, batch: int = 32):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    name = "toy://kjv-chat" if spec.assistant_only_loss else "toy://kjv-text"
    data = tokenize_dataset(toy.load_toy_dataset(name, split).select(range(n)), tokenizer, spec)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data]
    return [collate(rows[i:i + batch]) for i in range(0, len(rows), batch)]


@torch.no_grad()
def next_token_eval_loss(model, batches) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


@torch.no_grad()
def heads_accuracy(base_dir: Path, heads_dir: Path, tokenizer) -> list[float]:
    ctx = hf_tokplug.apply(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer,
                           plugins={"caft": {"num_heads": 4, "heads_path": str(heads_dir)}})
    model, heads = ctx.model.eval(), ctx.plugins["caft"].heads.eval()
    correct, counts = [0.0] * 4, [0] * 4
    for b in eval_batches(tokenizer, DataSpec(max_length=128), "eval"):
        hidden = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        for i, hl in enumerate(head_losses(heads, model, hidden, b["labels"], b["attention_mask"], 1024)):
            correct[i] += float(hl.correct)
            counts[i] += hl.count
    return [round(c / max(n, 1), 4) for c, n in zip(correct, counts)]


def analytical_flop_ratio(model, batch, num_heads: int) -> float:
    cfg = model.config
    h, v, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    p_layer = sum(p.numel() for p in decoder_layers(model.base_model)[0].parameters())
    p_body = p_layer * n_layers
    n_tok, t = batch["input_ids"].numel(), batch["input_ids"].shape[1]
    attn = 2 * t * h * n_tok
    s_main = n_tok if not torch.cuda.is_available() else int((batch["labels"][:, 1:] != -100).sum())
    f_plain = 2 * p_body * n_tok + attn * n_layers + 2 * h * v * s_main
    extra = 0
    for i in range(1, num_heads + 1):
        s_i = int((batch["labels"][:, 1 + i:] != -100).sum())
        layer = 2 * p_layer * n_tok + attn
        f_head = layer + 2 * h * v * s_i
        # forward + input-grad backward, + the recomputed head layer and chunk projections (checkpointing)
        extra += 2 * f_head + layer + 2 * h * v * s_i
    return (2 * f_plain + extra) / (2 * f_plain)


def saved_tensor_bytes(step) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except Exception:  # tensors without storage (e.g. some views under checkpointing)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def one_step_memory(base_dir: Path, heads_dir: Path, tokenizer, batch, caft: bool) -> tuple[int, str]:
    from peft import LoraConfig

    plugins = {"caft": {"num_heads": 4, "heads_path": str(heads_dir)}} if caft else {}
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if torch.cuda.is_available():
        model = model.cuda()
        batch = {k: v.cuda() for k, v in batch.items()}
    ctx = hf_tokplug.apply(model, tokenizer, plugins=plugins,
                           peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = ctx.model.train()

    def step():  # the training path: one fused forward, hidden state captured from the backbone, heads on top
        captured = {}
        backbone = model.get_base_model().base_model
        handle = backbone.register_forward_hook(lambda _m, _a, out: captured.update(h=out.last_hidden_state))
        out = model(**batch, fused_lm_head=True)
        handle.remove()
        loss = out.loss
        if caft:
            for hl in head_losses(ctx.plugins["caft"].heads, model.get_base_model(), captured["h"], batch["labels"],
                                  batch["attention_mask"], 1024, checkpoint_heads=True):
                loss = loss + hl.loss_sum / max(hl.count, 1)
        loss.backward()

    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    return saved_tensor_bytes(step), "bytes_saved_for_backward"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--heads-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--timing-steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = CACHE / "runs"
    tokenizer = toy.load_toy_tokenizer()
    base = pretrained_base(args.pretrain_steps)
    heads = stage_a_heads(base, args.heads_steps)
    next_k = heads_accuracy(base, heads, tokenizer)
    print("next_k_acc", next_k, flush=True)

    lora = {"r": 16, "alpha": 32, "dropout": 0.1}
    caft = {"caft": {"num_heads": 4, "heads_path": str(heads), "alpha": 0.01, "beta": 0.8, "schedule": "rsine"}}
    sft_train = {**COMMON, "max_steps": args.sft_steps, "learning_rate": 2e-3, "per_device_train_batch_size": 16,
                 "save_strategy": "no", "eval_strategy": "no"}
    chat_spec = DataSpec(max_length=128, assistant_only_loss=True)
    batches = eval_batches(tokenizer, chat_spec, "eval")
    eval_loss = {}
    for name, plugins in (("plain_sft", {}), ("caft", caft)):
        runner = run(name, out, model={"name_or_path": str(base)}, data=CHAT, plugins=plugins, adapter=lora,
                     train=sft_train)
        eval_loss[name] = round(next_token_eval_loss(runner.ctx.model, batches), 4)
        print(name, "eval_loss", eval_loss[name], flush=True)

    times = {"plain_sft": [], "caft": []}
    timing_train = {**sft_train, "max_steps": args.timing_steps, "logging_steps": 1000}
    with manager.registered("bench_probe", TimerPlugin):
        for r in range(2):
            order = [("plain_sft", {}), ("caft", caft)]
            for name, plugins in order if r == 0 else reversed(order):
                TimerPlugin.timer = StepTimer()
                run(f"time-{name}", out, model={"name_or_path": str(base)}, data=CHAT,
                    plugins={**plugins, "bench_probe": None}, adapter=lora, train=timing_train)
                times[name].append(TimerPlugin.timer.median())
                print(f"round {r} {name}: {times[name][-1] * 1e3:.1f} ms/step", flush=True)

    batch = eval_batches(tokenizer, chat_spec, "train", n=16, batch=16)[0]
    model = AutoModelForCausalLM.from_pretrained(base)
    flop_ratio = analytical_flop_ratio(model, batch, 4)
    mem_plain, method = one_step_memory(base, heads, tokenizer, batch, caft=False)
    mem_caft, _ = one_step_memory(base, heads, tokenizer, batch, caft=True)
    step_ratio = statistics.median(c / p for c, p in zip(times["caft"], times["plain_sft"]))
    print(json.dumps({
        "step_time_ratio": round(step_ratio, 4),
        "flop_ratio": round(flop_ratio, 4),
        "peak_mem_ratio": round(mem_caft / mem_plain, 4),
        "next_k_acc": next_k,
        "eval_loss": eval_loss,
        "step_time_over_flop_ratio": round(step_ratio / flop_ratio, 4),
        "peak_mem_method": method,
        "peak_mem_bytes": {"plain_sft": mem_plain, "caft": mem_caft},
        "ms_per_step": {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()},
    }))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
