# InternLM2-20B PPO with the micro-batch pipeline on 32 GPUs (4 nodes x 8): the reference layout
# of XTuner's internlm2_20b_pipe_32gpu.py. See the plan with `rlhf-pipe plan` and the launch
# with `torchrun --nnodes 4 --nproc-per-node 8`:
#
#   rollout    8 GPUs  1 vLLM engine x TP 8   ranks 0-7    (node 0)
#   actor      8 GPUs  dp 8, ZeRO-3           ranks 8-15   (node 1)
#   critic     8 GPUs  dp 8, ZeRO-3           ranks 16-23  (node 2)
#   reference  4 GPUs  dp 4, ZeRO-3           ranks 24-27  (node 3)
#   reward     4 GPUs  dp 4, ZeRO-3           ranks 28-31  (node 3)
#
# Model folders are the users' own. Data paths are relative to the working directory.
PIPE_MICRO_BATCH_NUM = 4  # 128 prompts -> 4 micro-batches of 32
PROMPT_BATCH_SIZE = 128
PRETRAIN_BATCH_SIZE = 128
MAX_PROMPT_LEN = 1536
MAX_ANSWER_LEN = 512
MAX_PRETRAIN_LEN = 4096

POLICY_DP_SIZE = 8
CRITIC_DP_SIZE = 8
REF_DP_SIZE = 4
REWARD_DP_SIZE = 4
VLLM_NUM_ENGINES = 1
VLLM_TP_SIZE = 8

# Parameter counts for `rlhf-pipe plan` where the model folders are not present (a folder's
# config.json wins when it is). InternLM2-20B: 19.86B; its reward/critic trunk has a scalar head.
POLICY_PARAMS_B = 19.86
REFERENCE_PARAMS_B = 19.86
CRITIC_PARAMS_B = 19.29
REWARD_PARAMS_B = 19.29

POLICY_PATH = "/models/internlm2-chat-20b-sft"
REWARD_PATH = "/models/internlm2-20b-reward"

_zero3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
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
    norm_rewards="running",  # the reference's per-micro-batch normalisation; 'batch' is exact
)

train_config = dict(
    train_micro_bs=1,
    infer_micro_bs=2,
    ppo_loss_weight=1.0,
    pretrain_loss_weight=0.5,
    critic_warmup_step=40,
    save_interval=200,
    max_train_step=800,
    work_dir="work_dirs/internlm2_20b_pipe_32gpu",
)

model_configs = dict(
    policy=dict(
        model_path=POLICY_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            lr=5e-7,
            gradient_checkpointing=True,
            parallel=dict(data=dict(size=POLICY_DP_SIZE), tensor=dict(size=1)),
            deepspeed_config=_zero3,
        ),
        generator_config=dict(
            generator_type="vllm",
            num_engines=VLLM_NUM_ENGINES,
            parallel=dict(data=dict(size=1), tensor=dict(size=VLLM_TP_SIZE)),
        ),
    ),
    critic=dict(
        model_path=REWARD_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            lr=9e-6,
            gradient_checkpointing=True,
            parallel=dict(data=dict(size=CRITIC_DP_SIZE), tensor=dict(size=1)),
            deepspeed_config=_zero3,
        ),
    ),
    reference=dict(
        model_path=POLICY_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            parallel=dict(data=dict(size=REF_DP_SIZE), tensor=dict(size=1)),
            deepspeed_config=_zero3,
        ),
    ),
    reward=dict(
        model_path=REWARD_PATH,
        trust_remote_code=True,
        trainer_config=dict(
            torch_dtype="bfloat16",
            parallel=dict(data=dict(size=REWARD_DP_SIZE), tensor=dict(size=1)),
            deepspeed_config=_zero3,
        ),
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
