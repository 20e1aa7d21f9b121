# Timing workload on one GPU, every role in one process (`rlhf-pipe bench`): a random-weight
# model of Qwen2-0.5B's shape, answer lengths drawn in 64..1024 tokens per request (ignore_eos).
#
#   rlhf-pipe bench benchmarks/configs/qwen2_0_5b_shape_1gpu.py --pipe 1,2,4,8 --steps 3
#
# vLLM runs in process (its engine core in this process) beside actor, critic and reference, so
# the stages share the GPU: overlap comes from the host side and from kernels of different
# stages filling the GPU together.
#
# Kept as first measured (chunks of 4). Chunks of 8 made the step 25% faster on an H100
# (BENCHMARKS.md): --set train_config.train_micro_bs=8 --set train_config.infer_micro_bs=8
from rlhf_pipe.assets.shaped import build_shaped_assets

_m = build_shaped_assets("qwen2-0.5b")

PIPE_MICRO_BATCH_NUM = 4
PROMPT_BATCH_SIZE = 128

rollout_config = dict(
    max_new_tokens=1024,
    response_length_range=[64, 1024],
    ignore_eos=True,
    temperature=1.0,
    dtype="bfloat16",
    max_model_len=1152,
    gpu_memory_utilization=0.35,
    enforce_eager=False,
)
repeater_config = dict(kl_coeff=0.01, gamma=1.0, gae_lambda=0.95, norm_rewards="batch")
train_config = dict(
    train_micro_bs=4,
    infer_micro_bs=4,
    max_train_step=3,
    seed=0,
    work_dir="work_dirs/qwen2_0_5b_shape_1gpu",
    stage_timeout_s=600,
    progress_bar=False,
)
_trainer = dict(torch_dtype="bfloat16", lr=1e-6, max_grad_norm=1.0)
model_configs = dict(
    policy=dict(
        model_path=str(_m.policy),
        trainer_config=_trainer,
        generator_config=dict(generator_type="vllm"),
    ),
    critic=dict(model_path=str(_m.critic), trainer_config=_trainer),
    reference=dict(model_path=str(_m.policy), trainer_config=dict(torch_dtype="bfloat16")),
    reward=dict(reward_fn="rlhf_pipe.assets.tiny:digit_reward"),
)
prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE, max_len=64, message_datasets=[f"{_m.prompts}::1.0:digits"]
)
placement_config = dict(device="cuda", gpus_per_node=1)
