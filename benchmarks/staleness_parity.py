"""Learning parity of run-ahead: the tiny CPU task, seeds x max_staleness, final reward.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/staleness_parity.py [--steps 30]

Prints, per max_staleness s, each seed's mean reward over the last 5 steps (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--staleness", default="0,1,2")
    p.add_argument(
        "--correction", default=None, help="train_config.behaviour_correction: tis | decoupled"
    )
    args = p.parse_args()

    from safetensors.torch import load_file

    from rlhf_pipe.assets.tiny import build_tiny_assets
    from rlhf_pipe.rollout.vllm_engine import VLLMEngine
    from rlhf_pipe.trainer import RLHFTrainer
    from rlhf_pipe.validation import load_config

    assets = build_tiny_assets()
    initial = load_file(str(assets.policy / "model.safetensors"))
    engine = VLLMEngine(
        str(assets.policy),
        dtype="float32",
        seed=0,
        max_model_len=64,
        gpu_memory_utilization=0.3,
        engine_kwargs={"kv_cache_memory_bytes": 256 * 2**20},
    )
    config = os.path.join(os.path.dirname(__file__), "..", "examples", "rlhf", "tiny_pipe_cpu.py")
    out: dict = {}
    for s in map(int, args.staleness.split(",")):
        for seed in map(int, args.seeds.split(",")):
            engine.load_weights(initial.items(), version=0)
            cfg = load_config(
                config,
                {
                    "train_config.work_dir": tempfile.mkdtemp(prefix="parity_"),
                    "train_config.progress_bar": False,
                    "train_config.tensorboard": False,
                    "train_config.max_staleness": s,
                    "train_config.seed": seed,
                    "rollout_config.seed": seed,
                    "prompt_dataset_config.seed": seed,
                    "train_config.behaviour_correction": args.correction,
                },
            )
            trainer = RLHFTrainer(cfg, engine=engine, console=False)
            history = trainer.learn(args.steps)
            trainer.close()
            last = [h["reward"] for h in history[-5:]]
            out.setdefault(s, {})[seed] = sum(last) / len(last)
            print(json.dumps({"s": s, "seed": seed, "reward_last5": out[s][seed]}), flush=True)
    for s, by_seed in out.items():
        values = list(by_seed.values())
        print(
            f"s={s}: "
            + " ".join(f"{v:.3f}" for v in values)
            + f"  mean {sum(values) / len(values):.3f}"
        )


if __name__ == "__main__":
    main()
