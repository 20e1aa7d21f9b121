# Timing workload: a random-weight model of Qwen2-0.5B's shape (rlhf_pipe.assets.shaped), answer
# lengths drawn in 64..1024 tokens per request (ignore_eos), roles on their own torchrun ranks:
#
#   torchrun --nproc-per-node 4 -m rlhf_pipe.train benchmarks/configs/qwen2_0_5b_shape_2gpu.py \
#       --bench 1,2,4,8 --steps 3 --warmup 1 --out DIR
#
# Two GPUs: vLLM alone on GPU 0 (rank 0), actor, critic and reference on GPU 1 (ranks 1-3,
# placement_config.local_rank_gpus). Generation overlaps Forward and Train; Forward and Train
# share GPU 1. The reward is a rule (no model).
#
# Kept as first measured (chunks of 4, a process per role). The fastest settings measured since
# (BENCHMARKS.md, "making the 0.5B step faster") are overrides of this file:
#   --set train_config.train_micro_bs=8 --set train_config.infer_micro_bs=8
#   --set placement_config.colocate_actor_critic=True --set placement_config.colocate_actor_ref=True
#   --set 'placement_config.local_rank_gpus=[0,1]'   (with --nproc-per-node 2)
# The fastest measured (6.86 s at M=4, third session): the reference beside vLLM on GPU 0, actor
# and critic in one process on GPU 1, per-micro-batch reward normalisation (not exact to serial):
#   --nproc-per-node 3 --set placement_config.colocate_actor_critic=True
#   --set 'placement_config.local_rank_gpus=[0,1,0]' --set rollout_config.gpu_memory_utilization=0.4
#   --set repeater_config.norm_rewards=running   (+ the two micro-batch sizes above)
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
    gpu_memory_utilization=0.85,
    enforce_eager=False,
)
repeater_config = dict(kl_coeff=0.01, gamma=1.0, gae_lambda=0.95, norm_rewards="batch")
train_config = dict(
    train_micro_bs=4,
    infer_micro_bs=4,
    max_train_step=3,
    seed=0,
    work_dir="work_dirs/qwen2_0_5b_shape_2gpu",
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
placement_config = dict(gpus_per_node=4, local_rank_gpus=[0, 1, 1, 1])
