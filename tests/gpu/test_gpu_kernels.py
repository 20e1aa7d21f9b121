"""On a lent NVIDIA GPU: the fused kernels of rlhf_pipe.kernels on the Qwen2-0.5B shape (the
GRPO bench's actor, random weights, bf16; RLHF_PIPE_KERNELS_SHAPE=internlm2-1.8b for the
Llama-architecture one). 'liger' and 'compile' give the plain path's
log-probs within bf16 rounding, and the actor's train call completes with finite gradients.
'liger' needs the liger-kernel wheel in /tmp/site (tools/gpu/session.sh install, with
.gpu/peers carried). Skipped where no GPU is visible.

bf16 rounding is measured, not assumed: the plain bf16 model's distance to an fp32 copy of
the same weights. A fused path is within it when its own distance to fp32 is at most 1.5 x
that (its mean over the response tokens; 2 x for the max)."""

import importlib
import os
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

SHAPE = os.environ.get("RLHF_PIPE_KERNELS_SHAPE", "qwen2-0.5b")
ANSWER = 512  # the GRPO bench's answers: 8 a chunk, ~24 prompt tokens each
CHUNK_TOKENS = 4096  # train_config.logit_chunk_tokens' default: the fused head


def _samples(n: int, answer: int, seed: int):
    from rlhf_pipe.pipeline.batch import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = 20 + i % 8
        s = Sample(
            i,
            i,
            0,
            torch.randint(4, 512, (p,), generator=g),
            torch.randint(4, 512, (answer,), generator=g),
        )
        s.advantages = torch.randn(answer, generator=g)
        out.append(s)
    return out


def _role(model):
    from rlhf_pipe.roles import PolicyRole

    return PolicyRole(
        model,
        0,
        lr=1e-6,
        betas=[0.9, 0.95],
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=8,
        train_micro_bs=8,
        logit_chunk_tokens=CHUNK_TOKENS,
    )


def _logp(role, samples):
    """(b, R) log-probs of the Forward stage (no grad), float32, on the host."""
    return torch.nn.utils.rnn.pad_sequence(role.logprobs(samples), batch_first=True)


def _train_s(role, samples, repeat: int = 3) -> float:
    """Median seconds of one train call (8 samples), grads dropped after each."""
    from rlhf_pipe.roles import LossSettings

    loss = LossSettings(0.2, None, 1.0, 1.0, "token_mean")
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        role.train(samples, loss, len(samples))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        role.drop_grads()
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="module")
def plain():
    """The shaped policy's folder, the samples, the plain bf16 log-probs, the fp32 ones and the
    plain train call's seconds (measured before any kernel is applied: liger's rotary is
    process-wide)."""
    from rlhf_pipe.assets.shaped import build_shaped_assets
    from rlhf_pipe.models import load_causal_lm

    path = str(build_shaped_assets(SHAPE).policy)
    samples = _samples(8, ANSWER, 0)
    fp32 = _logp(_role(load_causal_lm(path, "float32").cuda()), samples)
    role = _role(load_causal_lm(path, "bfloat16").cuda())
    logp, seconds = _logp(role, samples), _train_s(role, samples)
    del role
    torch.cuda.empty_cache()
    return path, samples, logp, fp32, seconds


@pytest.mark.parametrize("kernels", ["liger", "compile"])
def test_kernels_give_plain_logprobs_within_bf16_rounding_and_train(plain, kernels, monkeypatch):
    from torch._dynamo.utils import counters

    from rlhf_pipe.assets.shaped import SHAPES
    from rlhf_pipe.kernels import apply_kernels, liger_modules
    from rlhf_pipe.models import load_causal_lm
    from rlhf_pipe.roles import LossSettings

    if kernels == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel not installed in /tmp/site")
    # liger's rotary replaces the module's function for the process: back after the test.
    arch = SHAPES[SHAPE][0]
    modeling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    path, samples, plain_logp, fp32, plain_s = plain
    loss = LossSettings(0.2, None, 1.0, 1.0, "token_mean")
    model = apply_kernels(load_causal_lm(path, "bfloat16"), kernels, "cuda", "policy").cuda()
    if kernels == "liger":
        layers = model.config.num_hidden_layers
        assert liger_modules(model) == {"LigerRMSNorm": 2 * layers + 1, "LigerSwiGLUMLP": layers}
    role = _role(model)
    graphs = counters["stats"]["unique_graphs"]
    logp = _logp(role, samples)

    rounding = (plain_logp - fp32).abs()  # (b, R): every answer has R tokens
    mine = (logp - fp32).abs()
    versus_plain = (logp - plain_logp).abs()
    print(
        f"{SHAPE} {kernels}: |plain - fp32| mean {rounding.mean():.3g} max {rounding.max():.3g}; "
        f"|{kernels} - fp32| mean {mine.mean():.3g} max {mine.max():.3g}; "
        f"|{kernels} - plain| mean {versus_plain.mean():.3g} max {versus_plain.max():.3g}"
    )
    assert mine.mean() <= 1.5 * rounding.mean()
    assert mine.max() <= 2 * rounding.max()

    # The train call completes: finite loss sums and gradients, one optimizer step.
    sums = role.train(samples, loss, len(samples))
    assert all(torch.isfinite(v).all() for v in sums.values())
    norm = role.prepare_step(float(sums["tokens"]))
    assert torch.isfinite(norm)
    role.apply_step(norm)
    trained = counters["stats"]["unique_graphs"]
    # Other answer lengths, either side of the size thresholds of inductor's mix-order
    # reduction (rlhf_pipe.kernels.COMPILE_OPTIONS): no new graph for 'compile'.
    graphs_after = []
    for answer in (ANSWER - 128, ANSWER - 256):
        role.train(_samples(8, answer, answer), loss, 8)
        role.drop_grads()
        graphs_after.append(counters["stats"]["unique_graphs"])
    assert graphs_after == [trained, trained]
    print(
        f"{SHAPE} {kernels}: train call of 8 x (20..27 + {ANSWER}) tokens: plain {plain_s:.3f} s, "
        f"{kernels} {_train_s(role, samples):.3f} s; graphs compiled {trained - graphs}, "
        f"then {graphs_after[0] - trained} for a chunk of {8 * (27 + ANSWER - 128)} tokens, "
        f"{graphs_after[1] - graphs_after[0]} for one of {8 * (27 + ANSWER - 256)}"
    )
