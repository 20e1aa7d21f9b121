"""Two costs of the one-GPU colocated step: vLLM's sleep mode, and the actor's train kernels.

    python benchmarks/one_gpu_costs.py --model qwen2-0.5b --out F.json

1. Sleep mode. An in-process engine built with `enable_sleep_mode=True` generates the GRPO
   workload's batch (128 answers of 512 tokens), then `sleep(level=1)` drops its KV cache and
   moves its weights to host memory, and `wake_up()` brings them back. It records the GPU
   memory each frees, the seconds of each call, and that the woken engine generates the same
   tokens as before it slept (same seeds): the weights came back whole.
2. The actor's train call on that batch's shape, for each chunk size x head path (full logits
   or the fused head, `logit_chunk_tokens`), timed in alternating order, with its peak memory;
   then one call per head path under torch.profiler, whose costliest CUDA kernels name what
   bounds the Train stage.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _free_gb() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 1e9


def sleep_mode(model_path: str, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model_path,
        dtype="bfloat16",
        gpu_memory_utilization=0.35,
        max_model_len=576,
        enable_sleep_mode=True,
        seed=0,
    )
    params = [SamplingParams(max_tokens=512, ignore_eos=True, seed=i) for i in range(len(prompts))]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def generate():
        start = time.perf_counter()
        out = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in out]

    generate()  # warm-up: graphs, allocator
    gen_s, before = generate()
    free_awake = _free_gb()
    start = time.perf_counter()
    llm.sleep(level=1)
    sleep_s = time.perf_counter() - start
    free_asleep = _free_gb()
    start = time.perf_counter()
    llm.wake_up()
    wake_s = time.perf_counter() - start
    _, after = generate()
    result = {
        "generate_s": gen_s,
        "free_gb_awake": free_awake,
        "free_gb_asleep": free_asleep,
        "freed_gb": free_asleep - free_awake,
        "sleep_s": sleep_s,
        "wake_up_s": wake_s,
        "same_tokens_after_wake_up": before == after,
    }
    # The engine stays until the process ends; train_costs fits in the 0.65 of the GPU it left.
    return result


def train_costs(model_path: str, prompts: list[list[int]], chunk_sizes, repeat: int) -> dict:
    from rlhf_pipe.models import load_causal_lm
    from rlhf_pipe.pipeline.batch import Sample
    from rlhf_pipe.roles import LossSettings, PolicyRole

    loss = LossSettings(0.2, None, 1.0, 1.0, "token_mean")
    g = torch.Generator().manual_seed(0)
    model = load_causal_lm(model_path, "bfloat16").cuda()
    vocab = model.config.vocab_size
    samples = []
    for i, p in enumerate(prompts):
        s = Sample(i, i // 8, 0, torch.tensor(p), torch.randint(3, vocab, (512,), generator=g))
        s.advantages = torch.randn(512, generator=g)
        samples.append(s)
    tokens = sum(len(p) + 512 for p in prompts)

    def role(chunk: int, head: int) -> PolicyRole:
        return PolicyRole(
            model,
            0,
            lr=1e-7,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0,
            max_grad_norm=1.0,
            infer_micro_bs=chunk,
            train_micro_bs=chunk,
            logit_chunk_tokens=head,
        )

    variants = [(c, h) for c in chunk_sizes for h in (0, 4096)]
    seconds = {f"chunks {c}, logit_chunk_tokens {h}": [] for c, h in variants}
    peaks = {}
    for r in range(repeat + 1):  # round 0 warms up
        for c, h in variants if r % 2 == 0 else variants[::-1]:
            actor = role(c, h)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            actor.train(samples, loss, len(samples))
            torch.cuda.synchronize()
            name = f"chunks {c}, logit_chunk_tokens {h}"
            if r:
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = torch.cuda.max_memory_allocated() / 1e9
            actor.drop_grads()
    profiles = {}
    for h in (0, 4096):
        actor = role(chunk_sizes[0], h)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            actor.train(samples[: chunk_sizes[0]], loss, chunk_sizes[0])
            torch.cuda.synchronize()
        actor.drop_grads()
        profiles[f"logit_chunk_tokens {h}"] = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=12
        )
    return {
        "tokens": tokens,
        "train_s": {k: sorted(v)[len(v) // 2] for k, v in seconds.items()},
        "peak_gb": peaks,
        "profiles": profiles,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-0.5b")
    ap.add_argument("--chunks", default="8,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-sleep", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from rlhf_pipe.assets.shaped import build_shaped_assets

    assets = build_shaped_assets(args.model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (24,), generator=g).tolist() for _ in range(128)]
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_sleep:
        result["sleep_mode"] = sleep_mode(str(assets.policy), prompts)
        print("sleep mode:", json.dumps(result["sleep_mode"]), flush=True)
    result["train"] = train_costs(
        str(assets.policy), prompts, [int(c) for c in args.chunks.split(",")], args.repeat
    )
    print(
        "train:",
        json.dumps({k: v for k, v in result["train"].items() if k != "profiles"}),
        flush=True,
    )
    for name, table in result["train"]["profiles"].items():
        print(name, table, sep="\n", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
