"""Learning parity of run-ahead: the tiny CPU task, seeds x max_staleness, final reward.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/staleness_parity.py [--steps 30]
        [--seeds 0,1,2] [--staleness 0,1,2] [--correction tis] [--out parity.json]

Prints, per max_staleness s, each seed's mean reward over the last 5 steps, and for s >= 1 the
gap to s=0 against the seed noise (BENCHMARKS.md). `--out` keeps every step's reward too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--out", default=None, help="JSON file: every run's reward per step")
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
    curves: dict = {}
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
            curves.setdefault(s, {})[seed] = [h["reward"] for h in history]
            print(json.dumps({"s": s, "seed": seed, "reward_last5": out[s][seed]}), flush=True)
    summary = parity_summary(out, curves)
    for s, row in summary.items():
        line = f"s={s}: " + " ".join(f"{v:.3f}" for v in out[s].values())
        line += f"  mean {row['mean']:.3f}  seed sd {row['sd']:.3f}"
        if "gap" in row:
            line += f"  gap to s=0 {row['gap']:+.3f} (standard error {row['gap_se']:.3f})"
        line += f"; over all steps {row['whole_run_mean']:.3f} (sd {row['whole_run_sd']:.3f})"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            record = {"args": vars(args), "reward_last5": out, "summary": summary}
            json.dump({**record, "reward_per_step": curves}, f, indent=1)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parity_summary(final: dict, curves: dict) -> dict:
    """Per s: the mean and seed standard deviation of the final rewards; for s >= 1 the gap of
    the means to s=0 and its standard error sqrt(sd_0^2 / n_0 + sd_s^2 / n_s) (Welch), so a
    gap within about two standard errors is within the seed noise. `whole_run_mean`: the
    reward averaged over every step (the area under the curve), which tells how fast a run
    learns where the final rewards have all reached the task's ceiling."""
    rows: dict = {}
    for s, by_seed in final.items():
        mean, sd = _mean_sd(list(by_seed.values()))
        area, area_sd = _mean_sd([statistics.fmean(c) for c in curves[s].values()])
        rows[s] = {"mean": mean, "sd": sd, "n": len(by_seed)}
        rows[s].update(whole_run_mean=area, whole_run_sd=area_sd)
    base = rows.get(0)
    for s, row in rows.items():
        if base is not None and s != 0:
            row["gap"] = row["mean"] - base["mean"]
            row["gap_se"] = (base["sd"] ** 2 / base["n"] + row["sd"] ** 2 / row["n"]) ** 0.5
    return rows


if __name__ == "__main__":
    main()
