"""Sampling speed of the masked-diffusion sampler (LLaDA low-confidence remasking) on a ~25M-parameter toy dLLM.

    python bench/dllm_sampling.py

Random weights (speed does not depend on training): bidirectional Gemma, 8 layers, hidden 512. For generation
windows G in {64, 256}, one token committed per step (steps = G), block decoding (block 32) and whole-window, batch
1 and 16, fp32 and (on CUDA) bf16: wall time per call and generated tokens per second. Prints one JSON object on its
last line.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from hf_tokplug import toy  # noqa: E402
from hf_tokplug.inference import diffusion_sample  # noqa: E402


def main() -> None:
    build = partial(toy.TOY_MODELS["gemma-bidir"].build, hidden=512, intermediate=1376, layers=8)
    cfg, cls = build(2049)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = cls(cfg).to(device).eval()
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    windows = (64, 256) if device == "cuda" else (64,)
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    for dtype in dtypes:
        model.to(dtype)
        for g in windows:
            for mode, block in (("block32", 32), ("whole", g)):
                for batch in (1, 16):
                    prompt = torch.randint(10, 2000, (batch, 32), device=device)
                    run = partial(diffusion_sample, model, prompt, mask_id=2048, gen_length=g, block_length=block, steps=g)
                    run()  # warm-up
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    key = f"{str(dtype).split('.')[-1]}/G{g}/{mode}/b{batch}"
                    results[key] = {"seconds": round(seconds, 3), "tokens_per_second": round(batch * g / seconds, 1)}
                    print(key, results[key], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
