# The one-GPU GRPO timing workload that benchmarks/peers/trl_grpo.py gives TRL's GRPOTrainer:
# random weights of the internlm2-1.8b shape, 16 prompts x 8 answers of exactly 512 tokens,
# GRPO without
# KL (no reference model), the digit rule reward, bf16, lr 1e-6, chunks of 8, one optimizer
# step per 128 samples, vLLM at 0.35 of the GPU.
#
#   rlhf-pipe bench benchmarks/configs/grpo_internlm2_1_8b_shape_1gpu.py --pipe 1,4 --steps 5
from rlhf_pipe.assets.shaped import build_shaped_assets

_m = build_shaped_assets("internlm2-1.8b")

PIPE_MICRO_BATCH_NUM = 1

rollout_config = dict(
    n=8,
    max_new_tokens=512,
    ignore_eos=True,
    temperature=1.0,
    dtype="bfloat16",
    max_model_len=576,
    gpu_memory_utilization=0.35,
    enforce_eager=False,
    # The prompts are short, so sharing their prefill among the 8 answers saves little, and
    # the prefix cache's per-step bookkeeping cost 9% of a 1.8B generation (BENCHMARKS.md,
    # "The decode step").
    engine_kwargs=dict(enable_prefix_caching=False),
)
repeater_config = dict(algorithm="grpo", kl_coeff=0.0, norm_rewards=False)
train_config = dict(
    train_micro_bs=8,
    infer_micro_bs=8,
    max_train_step=7,
    seed=0,
    work_dir="work_dirs/grpo_internlm2_1_8b_shape_1gpu",
    stage_timeout_s=600,
    progress_bar=False,
)
model_configs = dict(
    policy=dict(
        model_path=str(_m.policy),
        trainer_config=dict(torch_dtype="bfloat16", lr=1e-6, max_grad_norm=1.0),
        generator_config=dict(generator_type="vllm"),
    ),
    reward=dict(reward_fn="rlhf_pipe.assets.tiny:digit_reward"),
)
prompt_dataset_config = dict(
    samples_each_epoch=16, max_len=64, message_datasets=[f"{_m.prompts}::1.0:digits"]
)
placement_config = dict(device="cuda", gpus_per_node=1)
