# InternLM2-1.8B-class PPO with the micro-batch pipeline on one 8-GPU node:
#
#   rollout    2 GPUs  2 vLLM engines x TP 1  ranks 0-1
#   actor      2 GPUs  dp 2, ZeRO-2           ranks 2-3
#   critic     2 GPUs  dp 2, ZeRO-2           ranks 4-5
#   reference  1 GPU   dp 1                   rank 6
#   reward     1 GPU   dp 1                   rank 7
#
# torchrun --nproc-per-node 8 ...; check first with `rlhf-pipe plan` (no GPU needed).
PIPE_MICRO_BATCH_NUM = 4  # 128 prompts -> 4 micro-batches of 32 (16 per actor rank)
PROMPT_BATCH_SIZE = 128
PRETRAIN_BATCH_SIZE = 32
MAX_PROMPT_LEN = 1024
MAX_ANSWER_LEN = 1024
MAX_PRETRAIN_LEN = 2048

# For `rlhf-pipe plan` where the model folders are absent (a folder's config.json wins).
POLICY_PARAMS_B = 1.89
REFERENCE_PARAMS_B = 1.89
CRITIC_PARAMS_B = 1.70
REWARD_PARAMS_B = 1.70

POLICY_PATH = "/models/internlm2-chat-1_8b-sft"
REWARD_PATH = "/models/internlm2-1_8b-reward"

_zero2 = {
    "zero_optimization": {"stage": 2, "overlap_comm": True},
    "bf16": {"enabled": True},
    "gradient_clipping": 1.0,
}

tokenizer_config = dict(tokenizer_path=POLICY_PATH, trust_remote_code=True)

rollout_config = dict(
    max_new_tokens=MAX_ANSWER_LEN,
    max_model_len=MAX_PROMPT_LEN + MAX_ANSWER_LEN,
    temperature=1.0,
    top_p=0.9,
    dtype="bfloat16",
    gpu_memory_utilization=0.85,
    enforce_eager=False,
)

repeater_config = dict(
    kl_coeff=0.01,
    gamma=1.0,
    gae_lambda=0.99,
    clip_reward_min=-5.0,
    clip_reward_max=5.0,
    norm_rewards="batch",
)

train_config = dict(
    train_micro_bs=2,
    infer_micro_bs=8,
    ppo_loss_weight=1.0,
    pretrain_loss_weight=0.5,
    critic_warmup_step=20,
    save_interval=40,
    max_train_step=400,
    work_dir="work_dirs/internlm2_1_8b_pipe_8gpu",
)

model_configs = dict(
    policy=dict(
        model_path=POLICY_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            lr=1e-6,
            parallel=dict(data=dict(size=2)),
            deepspeed_config=_zero2,
        ),
        generator_config=dict(
            generator_type="vllm",
            num_engines=2,
            parallel=dict(tensor=dict(size=1)),
        ),
    ),
    critic=dict(
        model_path=REWARD_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            lr=5e-6,
            parallel=dict(data=dict(size=2)),
            deepspeed_config=_zero2,
        ),
    ),
    reference=dict(
        model_path=POLICY_PATH,
        trust_remote_code=True,
        trainer_config=dict(torch_dtype="bfloat16", parallel=dict(data=dict(size=1))),
    ),
    reward=dict(
        model_path=REWARD_PATH,
        trust_remote_code=True,
        trainer_config=dict(torch_dtype="bfloat16", parallel=dict(data=dict(size=1))),
    ),
)

placement_config = dict(gpus_per_node=8)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=["data/prompts.jsonl::1.0"],
)

pretrain_dataset_config = dict(
    samples_each_epoch=PRETRAIN_BATCH_SIZE,
    max_len=MAX_PRETRAIN_LEN,
    message_datasets=["data/pretrain.jsonl::1.0"],
)
