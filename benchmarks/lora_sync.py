"""Time the two LoRA weight syncs to vLLM: 'merged' and 'adapter' (see rlhf_pipe/lora.py).

    python benchmarks/lora_sync.py --model tiny --out results.json

Per mode and step: the adapter is changed (as an optimizer step would), then
    sync_s      actor.named_weights() + engine.load_weights(...), as the trainer's sync phase;
    gen_tok_s   sampled tokens per second for `--prompts` prompts x `--tokens` new tokens
                (ignore_eos, so every step generates the same number of tokens).
The first step is warm-up and is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace


def run(args) -> dict:
    """Both modes in one process, alternating each step, so a change in the machine's load
    (the CPU is shared) hits both alike."""
    import torch

    from rlhf_pipe import lora
    from rlhf_pipe.config import LoraSettings
    from rlhf_pipe.models import load_causal_lm
    from rlhf_pipe.roles import PolicyRole
    from rlhf_pipe.rollout.types import SamplingSettings
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine

    assets = _assets(args.model)
    settings = LoraSettings(
        args.rank, float(args.rank), 0.0, "ColumnParallelLinear,LinearLayer,RowParallelLinear"
    )
    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = lora.apply_lora(
        load_causal_lm(str(assets.policy), args.dtype), settings.peft_kwargs(), "bench", "policy"
    )
    model.to(device)
    actor = PolicyRole(
        model,
        0,
        lr=1e-3,
        betas=[0.9, 0.95],
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=1,
        train_micro_bs=1,
    )
    engines = {
        mode: VLLMEngine(
            str(assets.policy),
            dtype=args.dtype,
            seed=0,
            max_model_len=256,
            gpu_memory_utilization=0.3,
            lora=lora.peft_config(settings.peft_kwargs()).to_dict() if mode == "adapter" else None,
            engine_kwargs={"kv_cache_memory_bytes": 256 * 2**20},
        )
        for mode in ("merged", "adapter")
    }
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 500, (16,), generator=g).tolist() for _ in range(args.prompts)]
    settings = SamplingSettings(args.tokens, 1.0, 1.0, -1, 1, True, ())
    rows = {mode: [] for mode in engines}
    for step in range(args.steps + 1):
        with torch.no_grad():  # a new adapter, as after an optimizer step
            for n, p in model.named_parameters():
                if ".lora_B" in n:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
        for mode, engine in engines.items():
            actor.lora_sync = mode
            start = time.perf_counter()
            engine.load_weights(actor.named_weights(), step + 1)
            sync_s = time.perf_counter() - start
            done = []
            start = time.perf_counter()
            engine.generate(
                prompts,
                list(range(len(prompts))),
                settings,
                [step * 1000 + i for i in range(len(prompts))],
                SimpleNamespace(put=done.append),
            )
            gen_s = time.perf_counter() - start
            tokens = sum(len(c.response_ids) for c in done)
            rows[mode].append(
                {
                    "step": step,
                    "sync_s": sync_s,
                    "gen_s": gen_s,
                    "sync_bytes": engine.last_sync["bytes"],
                    "tokens": tokens,
                    "gen_tok_s": tokens / gen_s,
                }
            )
    out = []
    for mode, steps in rows.items():
        timed = steps[1:]  # step 0 is warm-up
        out.append(
            {
                "mode": mode,
                "model": args.model,
                "dtype": args.dtype,
                "rank": args.rank,
                "prompts": args.prompts,
                "new_tokens": args.tokens,
                "steps": steps,
                "sync_s_median": statistics.median(r["sync_s"] for r in timed),
                "gen_tok_s_median": statistics.median(r["gen_tok_s"] for r in timed),
                "sync_mb": steps[-1]["sync_bytes"] / 2**20,
            }
        )
    return out


def _assets(name: str):
    if name == "tiny":
        from rlhf_pipe.assets.tiny import build_tiny_assets

        return build_tiny_assets()
    from rlhf_pipe.assets.shaped import build_shaped_assets

    return build_shaped_assets(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny or qwen2-0.5b (random, real shape)")
    ap.add_argument("--dtype", default=None, help="default: float32 tiny, bfloat16 shaped")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default=None, help="the actor's; default cuda if there is one")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
    results = run(args)
    for r in results:
        print(
            f"{args.model} {r['mode']}: sync {r['sync_s_median'] * 1e3:.1f} ms "
            f"({r['sync_mb']:.2f} MB), generation {r['gen_tok_s_median']:.1f} tokens/s "
            f"(medians of {args.steps} steps)"
        )
    import torch
    import vllm

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "gpu": gpu,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "command": "python " + " ".join(sys.argv),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
