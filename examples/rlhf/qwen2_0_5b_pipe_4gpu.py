# Qwen2-0.5B-class PPO with the micro-batch pipeline on 4 GPUs of one node:
#
#   rollout    1 GPU  1 vLLM engine x TP 1   rank 0
#   actor      1 GPU  dp 1, no DeepSpeed     rank 1
#   critic     1 GPU  dp 1, no DeepSpeed     rank 2   reward shares it (colocate_critic_reward)
#   reference  1 GPU  dp 1                   rank 3
#
# torchrun --nproc-per-node 4 ...; check first with `rlhf-pipe plan --nnodes 1 --gpus-per-node 4`.
PIPE_MICRO_BATCH_NUM = 4  # 64 prompts -> 4 micro-batches of 16
PROMPT_BATCH_SIZE = 64
MAX_PROMPT_LEN = 1024
MAX_ANSWER_LEN = 512

# For `rlhf-pipe plan` where the model folders are absent (a folder's config.json wins).
POLICY_PARAMS_B = 0.494
REFERENCE_PARAMS_B = 0.494
CRITIC_PARAMS_B = 0.494
REWARD_PARAMS_B = 0.494

POLICY_PATH = "/models/qwen2-0_5b-instruct"
REWARD_PATH = "/models/qwen2-0_5b-reward"

tokenizer_config = dict(tokenizer_path=POLICY_PATH)

rollout_config = dict(
    max_new_tokens=MAX_ANSWER_LEN,
    max_model_len=MAX_PROMPT_LEN + MAX_ANSWER_LEN,
    temperature=1.0,
    top_p=1.0,
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
    train_micro_bs=4,
    infer_micro_bs=8,
    pretrain_loss_weight=0.0,
    max_train_step=200,
    save_interval=50,
    work_dir="work_dirs/qwen2_0_5b_pipe_4gpu",
)

model_configs = dict(
    policy=dict(
        model_path=POLICY_PATH,
        trainer_config=dict(torch_dtype="bfloat16", lr=1e-6, gradient_checkpointing=True),
        generator_config=dict(
            generator_type="vllm", num_engines=1, parallel=dict(tensor=dict(size=1))
        ),
    ),
    critic=dict(
        model_path=REWARD_PATH,
        trainer_config=dict(torch_dtype="bfloat16", lr=5e-6, gradient_checkpointing=True),
    ),
    reference=dict(model_path=POLICY_PATH, trainer_config=dict(torch_dtype="bfloat16")),
    reward=dict(model_path=REWARD_PATH, trainer_config=dict(torch_dtype="bfloat16")),
)

placement_config = dict(gpus_per_node=4, colocate_critic_reward=True)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=["data/prompts.jsonl::1.0"],
)
