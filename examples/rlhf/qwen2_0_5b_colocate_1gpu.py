# Qwen2-0.5B-class PPO on one GPU: every role colocated (colocate_all). vLLM takes
# gpu_memory_utilization of the GPU; actor and critic train beside it; the reference and reward
# weights wait in CPU memory between their forwards (ref_reward_offload).
#
#   rank 0, GPU 0: rollout (1 vLLM engine x TP 1) + actor + critic + reference + reward
#
# `rlhf-pipe train` runs it in one process; check it with `rlhf-pipe plan`.
PIPE_MICRO_BATCH_NUM = 4  # 32 prompts -> 4 micro-batches of 8
PROMPT_BATCH_SIZE = 32
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
    gpu_memory_utilization=0.35,  # the rest of the GPU is for actor, critic, reference, reward
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
    infer_micro_bs=4,
    pretrain_loss_weight=0.0,
    max_train_step=200,
    save_interval=50,
    work_dir="work_dirs/qwen2_0_5b_colocate_1gpu",
)

model_configs = dict(
    policy=dict(
        model_path=POLICY_PATH,
        trainer_config=dict(torch_dtype="bfloat16", lr=1e-6, gradient_checkpointing=True),
        generator_config=dict(generator_type="vllm", num_engines=1),
    ),
    critic=dict(
        model_path=REWARD_PATH,
        trainer_config=dict(torch_dtype="bfloat16", lr=5e-6, gradient_checkpointing=True),
    ),
    reference=dict(model_path=POLICY_PATH, trainer_config=dict(torch_dtype="bfloat16")),
    reward=dict(model_path=REWARD_PATH, trainer_config=dict(torch_dtype="bfloat16")),
)

placement_config = dict(colocate_all=True, ref_reward_offload=True, gpus_per_node=1)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=["data/prompts.jsonl::1.0"],
)
