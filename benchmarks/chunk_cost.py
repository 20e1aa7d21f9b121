"""What the Train and Forward stages' chunks cost: padded or packed, and per chunk size.

    python benchmarks/chunk_cost.py --model qwen2-0.5b --samples 32 --train-mbs 4,8 \
        --order length --repeat 3 --out F.json

Holds the actor and the critic of a shaped model (rlhf_pipe.assets.shaped) on one device and
times, for each variant (batch layout x train chunk size) in turn, reversing the order every
round so that drift hits all, the roles' own methods on the same samples: `actor.train`,
`critic.train`, `actor.logprobs`, `critic.values`. The answer lengths are drawn as the GPU
bench draws them (64..1024 tokens). `--order length` sorts the samples by answer length, as
they leave vLLM when every request starts at once; `random` is the worst case for padding.
Then one actor train chunk per layout runs under torch.profiler, and the report lists its
costliest operators. Nothing is written but `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from rlhf_pipe.assets.shaped import build_shaped_assets
from rlhf_pipe.models import load_causal_lm, load_value_model
from rlhf_pipe.pipeline.batch import Sample
from rlhf_pipe.roles import CriticRole, LossSettings, PolicyRole

LOSS = LossSettings(
    policy_clip=0.2,
    value_clip=0.5,
    ppo_loss_weight=1.0,
    value_loss_weight=1.0,
    loss_agg="token_mean",
)


def make_samples(n: int, vocab: int, seed: int, answer=(64, 1024), prompt=(16, 64)) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(*prompt), rng.randint(*answer)
        s = Sample(
            i,
            i,
            0,
            torch.tensor([rng.randrange(3, vocab) for _ in range(p)]),
            torch.tensor([rng.randrange(3, vocab) for _ in range(r)]),
        )
        s.old_logp = -torch.rand(r) * 5
        s.values, s.returns, s.advantages = torch.randn(r), torch.randn(r), torch.randn(r)
        out.append(s)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-0.5b")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--train-mbs", default="4", help="chunk sizes to compare, e.g. 4,8")
    ap.add_argument("--order", choices=("length", "random"), default="length")
    ap.add_argument("--infer-mbs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assets = build_shaped_assets(args.model, dtype=args.dtype)
    actor_model = load_causal_lm(str(assets.policy), args.dtype).to(device)
    critic_model = load_value_model(str(assets.critic), args.dtype).to(device)
    sizes = dict(
        lr=1e-7,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=args.infer_mbs,
        train_micro_bs=4,
    )
    train_sizes = [int(x) for x in args.train_mbs.split(",")]

    def roles(layout: str, train_mbs: int):
        """The two roles as one variant builds them (layout and chunk size are theirs)."""
        kw = {**sizes, "train_micro_bs": train_mbs, "packed": layout == "packed"}
        return PolicyRole(actor_model, 0, **kw), CriticRole(critic_model, 0, **kw)

    actor, critic = roles("padded", train_sizes[0])
    samples = make_samples(args.samples, actor_model.config.vocab_size, seed=0)
    if args.order == "length":
        samples.sort(key=lambda s: s.num_actions)
    tokens = sum(int(s.prompt_ids.numel()) + s.num_actions for s in samples)

    work = {
        "actor.train": lambda: actor.train(samples, LOSS, len(samples)),
        "critic.train": lambda: critic.train(samples, LOSS, len(samples)),
        "actor.logprobs": lambda: actor.logprobs(samples),
        "critic.values": lambda: critic.values(samples),
    }
    layouts = ("padded", "packed")
    variants = [f"{lay} mbs {m}" for lay in layouts for m in train_sizes]
    seconds = {v: {name: [] for name in work} for v in variants}
    for r in range(args.repeat + 1):  # round 0 warms up (allocator, kernels)
        for v in variants if r % 2 == 0 else variants[::-1]:
            lay, mbs = v.split(" mbs ")
            actor, critic = roles(lay, int(mbs))
            for name, fn in work.items():
                if name.endswith("train") or mbs == str(train_sizes[0]):  # forward: once
                    t = timed(fn, device)
                    actor.drop_grads()
                    critic.drop_grads()
                    if r:
                        seconds[v][name].append(t)

    profiles = {}
    activity = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activity.append(torch.profiler.ProfilerActivity.CUDA)
    chunk = samples[len(samples) // 2 : len(samples) // 2 + train_sizes[0]]
    for lay in layouts:
        actor, _ = roles(lay, train_sizes[0])
        with torch.profiler.profile(activities=activity) as prof:
            actor.train(chunk, LOSS, len(chunk))
            _sync(device)
        actor.drop_grads()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profiles[lay] = prof.key_averages().table(sort_by=key, row_limit=15)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "dtype": args.dtype,
        "samples": args.samples,
        "tokens": tokens,
        "order": args.order,
        "train_micro_bs": train_sizes,
        "infer_micro_bs": args.infer_mbs,
        "repeat": args.repeat,
        "median_s": {
            v: {n: sorted(t)[len(t) // 2] for n, t in seconds[v].items() if t} for v in variants
        },
        "seconds": seconds,
    }
    base = variants[0]
    print(
        f"{args.samples} samples, {tokens} tokens, order {args.order}; medians of "
        f"{args.repeat}, ratio to {base}"
    )
    for v in variants:
        for name, t in result["median_s"][v].items():
            ref = result["median_s"][base][name]
            print(f"{v:14s} {name:15s} {t:.3f} s  x{t / ref:.2f}")
    for lay in layouts:
        print(f"\n# one actor train chunk, {lay}\n{profiles[lay]}")
    result["profiles"] = profiles
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
