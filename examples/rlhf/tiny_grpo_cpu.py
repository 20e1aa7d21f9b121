# GRPO on the tiny CPU setup (see tiny_pipe_cpu.py): no critic; each prompt gets n=4 answers
# and an answer's advantage is its reward against its group's mean and std. The KL to the
# reference is a loss term (k3), as GRPO does it. Group advantages wait for the whole group,
# even when it straddles micro-batches (`advantage_waits` in the metrics).
#
#   rlhf-pipe train examples/rlhf/tiny_grpo_cpu.py
from rlhf_pipe.assets.tiny import build_tiny_assets

_tiny = build_tiny_assets()

PIPE_MICRO_BATCH_NUM = 4  # 8 prompts x n=4 = 32 answers -> 4 micro-batches of 8
PROMPT_BATCH_SIZE = 8
MAX_PROMPT_LEN = 48
MAX_ANSWER_LEN = 12

tokenizer_config = dict(tokenizer_path=str(_tiny.policy))

rollout_config = dict(
    n=4,
    max_new_tokens=MAX_ANSWER_LEN,
    temperature=1.0,
    top_p=1.0,
    max_model_len=MAX_PROMPT_LEN + MAX_ANSWER_LEN + 4,
    dtype="float32",
    gpu_memory_utilization=0.3,
    engine_kwargs=dict(kv_cache_memory_bytes=256 * 2**20),  # fixed KV cache (tiny_pipe_cpu.py)
    seed=0,
)

repeater_config = dict(
    algorithm="grpo",
    kl_mode="loss",
    kl_coeff=0.01,
    clip_reward_min=-5.0,
    clip_reward_max=5.0,
    # The group statistics are GRPO's normalisation; no batch normalisation on top.
    norm_rewards=False,
)

train_config = dict(
    train_micro_bs=8,
    infer_micro_bs=8,
    policy_clip=0.2,
    max_train_step=30,
    save_interval=0,
    seed=0,
    work_dir="work_dirs/tiny_grpo_cpu",
)

model_configs = dict(
    policy=dict(
        model_path=str(_tiny.policy),
        trainer_config=dict(torch_dtype="float32", lr=3e-3, lr_warmup_steps=0, max_grad_norm=1.0),
        generator_config=dict(generator_type="vllm"),
    ),
    reference=dict(model_path=str(_tiny.policy)),
    reward=dict(reward_fn="rlhf_pipe.assets.tiny:digit_reward"),
)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=[f"{_tiny.prompts}::1.0:digits"],
)
