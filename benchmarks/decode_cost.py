"""Where a vLLM decode step goes on the one-GPU GRPO workload: engine core in process or not,
seeded requests or not, and a profile of the in-process step.

    python benchmarks/decode_cost.py --shape internlm2-1.8b --out decode_cost_1.8b.json \
        --variants inproc_seeded,inproc_unseeded,process_seeded,process_unseeded,profile

The workload is `benchmarks/configs/grpo_<shape>_1gpu.py`'s generation: 16 prompts x 8 answers
of exactly 512 tokens, bf16, CUDA graphs, 0.35 of the GPU, the engine arguments VLLMEngine
passes. Every variant runs in a process of its own (the engine core's mode is read from the
environment when vLLM is imported, and the GPU is then free for the next one): one warm-up
generation, then `--repeats` timed ones, whose median is the variant's time.

Variants:
- inproc_*: VLLM_ENABLE_V1_MULTIPROCESSING=0, the core in the caller's process (today's
  one-process layout); process_*: the core in a process of its own, as vLLM runs by default;
- *_seeded: a seed per request (rollout_config.request_seeds=True); *_unseeded: none;
- *_async: engine_kwargs async_scheduling=True;
- modifiers after a '+' (any number): `+noprefix` enable_prefix_caching=False; `+block<N>`
  block_size=N; `+nogc` freezes the heap after the engine is built and keeps Python's cyclic
  collector off during each generation;
- profile: in process, seeded; one generation under torch.profiler (the GPU's kernel time
  against the wall time, and the costliest kernels) and one under cProfile (the host's
  costliest functions);
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS = 512


def _prompts(assets) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.policy))
    lines = Path(assets.prompts).read_text().splitlines()[:16]
    return [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]


def _engine(assets, variant: str):
    from vllm import LLM

    kwargs = dict(
        model=str(assets.policy),
        dtype="bfloat16",
        seed=0,
        enforce_eager=False,
        gpu_memory_utilization=0.35,
        max_model_len=576,
        logprobs_mode="raw_logprobs",
        use_tqdm_on_load=False,
    )
    base, *modifiers = variant.split("+")
    if base.endswith("_async"):
        kwargs["async_scheduling"] = True
    for m in modifiers:
        if m == "noprefix":
            kwargs["enable_prefix_caching"] = False
        elif m.startswith("block"):
            kwargs["block_size"] = int(m[5:])
        elif m != "nogc":
            raise ValueError(f"unknown variant modifier {m!r}")
    return LLM(**kwargs)


def _params(prompts, seeded: bool):
    from vllm import SamplingParams

    return [
        SamplingParams(
            n=8,
            max_tokens=NEW_TOKENS,
            ignore_eos=True,
            temperature=1.0,
            seed=i if seeded else None,
            detokenize=False,
        )
        for i in range(len(prompts))
    ]


def _generate(llm, prompts, params, collect_garbage: bool = True):
    import gc

    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    if not collect_garbage:
        gc.disable()
    start = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    gc.enable()
    return seconds


def _timed(llm, prompts, params, repeats: int, collect_garbage: bool = True) -> dict:
    import gc

    if not collect_garbage:
        gc.collect()
        gc.freeze()  # what is alive now is never scanned again
    _generate(llm, prompts, params, collect_garbage)  # warm-up
    times = [_generate(llm, prompts, params, collect_garbage) for _ in range(repeats)]
    median = statistics.median(times)
    return {
        "seconds": times,
        "median_s": median,
        "ms_per_decode_step": 1e3 * median / NEW_TOKENS,
        "tokens_per_s": len(prompts) * 8 * NEW_TOKENS / median,
    }


def _profile(llm, prompts, params) -> dict:
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    _generate(llm, prompts, params)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = _generate(llm, prompts, params)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    host = cProfile.Profile()
    host.enable()
    host_wall = _generate(llm, prompts, params)
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
    return {
        "profiled_wall_s": wall,
        "gpu_kernel_s": kernel_us / 1e6,
        "gpu_busy_fraction": kernel_us / 1e6 / wall,
        "top_kernels": [
            {"name": e.key[:120], "s": e.self_device_time_total / 1e6, "calls": e.count}
            for e in top
        ],
        "cprofile_wall_s": host_wall,
        "cprofile_top_tottime": text.getvalue().splitlines()[:60],
    }


def child(shape: str, variant: str, repeats: int) -> dict:
    from rlhf_pipe.assets.shaped import build_shaped_assets

    assets = build_shaped_assets(shape)
    prompts = _prompts(assets)
    llm = _engine(assets, variant)
    params = _params(prompts, seeded="unseeded" not in variant)
    if variant == "profile":
        return _profile(llm, prompts, params)
    return _timed(llm, prompts, params, repeats, collect_garbage="+nogc" not in variant)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="internlm2-1.8b")
    p.add_argument("--variants", default="inproc_seeded,process_seeded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per variant")
    p.add_argument("--out", required=True)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(args.shape, args.child, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results: dict = {"shape": args.shape, "new_tokens": NEW_TOKENS, "variants": {}}
    for variant in args.variants.split(","):
        in_process = variant.startswith(("inproc", "profile"))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else "1")
        cmd = [sys.executable, __file__, "--shape", args.shape, "--child", variant]
        cmd += ["--repeats", str(args.repeats), "--out", args.out]
        start = time.perf_counter()
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            entry = json.loads(lines[-1][7:]) if lines else {"error": run.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            entry = {"error": f"timed out after {args.timeout} s"}
        entry["process_s"] = time.perf_counter() - start
        results["variants"][variant] = entry
        summary = {k: v for k, v in entry.items() if not isinstance(v, list)}
        print(variant, json.dumps(summary)[:600], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
