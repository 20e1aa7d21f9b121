"""TRL's GRPOTrainer on rlhf_pipe's one-GPU GRPO timing workload, for a side-by-side step time.

    python benchmarks/peers/trl_grpo.py --shape qwen2-0.5b --is-correction off --steps 7 \
        --out trl_0.5b_is_off.json

The workload is the one `benchmarks/configs/grpo_<shape>_1gpu.py` gives rlhf_pipe:
- the random-weight model of `--shape` from rlhf_pipe.assets.shaped, with its tokenizer;
- 16 prompts x 8 answers per optimizer step, every answer exactly 512 tokens (ignore_eos);
- GRPO with beta=0 (no reference model) and the digit rule reward;
- bf16, lr 1e-6, micro-batches of 8 (8 x 16 accumulation steps = 128 samples per update),
  one generation per optimizer step (num_iterations=1), vLLM colocated at 0.35 of the GPU.

TRL is called, not copied: this file only configures it and times its steps. A step is the
time between two `on_step_end` callbacks (generation, scoring, 16 micro-batches, the optimizer
step and TRL's weight sync to vLLM); the first `--warmup` steps are dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def digit_reward(prompts, completions, **_) -> list[float]:
    from rlhf_pipe.assets.tiny import digit_reward as score

    return score(prompts, completions)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2-0.5b")
    p.add_argument("--is-correction", choices=("on", "off"), default="off")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import transformers
    import trl
    import vllm
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_pipe.assets.shaped import build_shaped_assets

    if args.shape == "tiny":  # a CPU smoke test of this script, not a measurement
        from rlhf_pipe.assets.tiny import build_tiny_assets

        assets = build_tiny_assets()
    else:
        assets = build_shaped_assets(args.shape)
    on_gpu = torch.cuda.is_available()
    lines = Path(assets.prompts).read_text().splitlines()[:16]
    dataset = Dataset.from_list([json.loads(line) for line in lines] * 64)
    tokenizer = AutoTokenizer.from_pretrained(str(assets.policy))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = [time.perf_counter()]

        def on_step_end(self, *_, **__):
            if on_gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir="/tmp/trl_grpo_out",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=16,
        num_generations=8,
        max_completion_length=512,
        generation_kwargs={"ignore_eos": True},
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-6,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.35,
        vllm_importance_sampling_correction=args.is_correction == "on",
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    times = StepTimes()
    trainer = GRPOTrainer(
        model=str(assets.policy),
        reward_funcs=digit_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[times],
    )
    times.ends = [time.perf_counter()]
    trainer.train()
    steps = [b - a for a, b in zip(times.ends, times.ends[1:])]
    measured = steps[args.warmup :]
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    result = {
        "system": "trl.GRPOTrainer",
        "shape": args.shape,
        "is_correction": args.is_correction,
        "step_s": steps,
        "median_step_s": statistics.median(measured) if measured else None,
        "measured_steps": len(measured),
        "versions": {
            "trl": trl.__version__,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "log_history": logs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"trl {args.shape} IS {args.is_correction}: median step {result['median_step_s']:.3f} s "
        f"over {len(measured)} steps; all {[round(s, 3) for s in steps]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
