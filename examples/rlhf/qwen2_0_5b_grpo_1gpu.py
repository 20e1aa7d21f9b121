# Qwen2-0.5B-class GRPO on one GPU: no critic, n=8 answers per prompt, every role colocated.
# vLLM takes gpu_memory_utilization of the GPU; the actor trains beside it; the reference and
# reward weights wait in CPU memory between their forwards (ref_reward_offload).
#
#   rank 0, GPU 0: rollout (1 vLLM engine x TP 1) + actor + reference + reward
#
#   rlhf-pipe plan examples/rlhf/qwen2_0_5b_grpo_1gpu.py     # the map and memory, no GPU needed
#   rlhf-pipe train examples/rlhf/qwen2_0_5b_grpo_1gpu.py     # after setting POLICY_PATH,
#                                                            # REWARD_PATH and the dataset
PIPE_MICRO_BATCH_NUM = 4  # 32 prompts x n=8 = 256 answers -> 4 micro-batches of 64
PROMPT_BATCH_SIZE = 32
MAX_PROMPT_LEN = 1024
MAX_ANSWER_LEN = 512

# For `rlhf-pipe plan` where the model folders are absent (a folder's config.json wins).
POLICY_PARAMS_B = 0.494
REFERENCE_PARAMS_B = 0.494
REWARD_PARAMS_B = 0.494

POLICY_PATH = "/models/qwen2-0_5b-instruct"
REWARD_PATH = "/models/qwen2-0_5b-reward"

tokenizer_config = dict(tokenizer_path=POLICY_PATH)

rollout_config = dict(
    n=8,
    max_new_tokens=MAX_ANSWER_LEN,
    max_model_len=MAX_PROMPT_LEN + MAX_ANSWER_LEN,
    temperature=1.0,
    top_p=1.0,
    dtype="bfloat16",
    gpu_memory_utilization=0.35,  # the rest of the GPU is for the actor, reference, reward
)

repeater_config = dict(
    algorithm="grpo",
    kl_mode="loss",  # GRPO's k3 KL term in the loss, not in the reward
    kl_coeff=0.001,
    clip_reward_min=-5.0,
    clip_reward_max=5.0,
    norm_rewards=False,  # the group mean and std already normalise
)

train_config = dict(
    train_micro_bs=4,
    infer_micro_bs=8,
    pretrain_loss_weight=0.0,
    max_train_step=200,
    save_interval=50,
    work_dir="work_dirs/qwen2_0_5b_grpo_1gpu",
)

model_configs = dict(
    policy=dict(
        model_path=POLICY_PATH,
        trainer_config=dict(torch_dtype="bfloat16", lr=1e-6, gradient_checkpointing=True),
        generator_config=dict(generator_type="vllm", num_engines=1),
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
