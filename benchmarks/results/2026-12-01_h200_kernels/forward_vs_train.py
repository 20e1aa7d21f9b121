"""Forward-stage (no grad) against Train (grad) log-probs, plain vs compile vs liger, bf16 0.5B.

python3 forward_vs_train.py   (from the checkout's root, PYTHONPATH=/tmp/site:$PWD)
"""

import sys

import torch

sys.path.insert(0, ".")
from rlhf_pipe.assets.shaped import build_shaped_assets
from rlhf_pipe.kernels import apply_kernels
from rlhf_pipe.models import load_causal_lm, response_logprobs
from rlhf_pipe.pipeline.batch import collate
from tests.gpu.test_gpu_kernels import _samples

path = str(build_shaped_assets("qwen2-0.5b").policy)
samples = _samples(8, 512, 0)
b = collate(samples, 0).to("cuda")
mask = b.response_mask.bool()
for k in (None, "compile", "liger"):
    m = apply_kernels(load_causal_lm(path, "bfloat16"), k, "cuda", "policy").cuda()
    with torch.no_grad():
        fwd = response_logprobs(m, b, 4096)[0]
    train = response_logprobs(m, b, 4096, with_entropy=True)[0]
    d = (fwd - train.detach()).abs()[mask]
    print(
        f"{k}: |forward(no grad) - train(grad)| log-probs: max {d.max().item():.3g} "
        f"mean {d.mean().item():.3g}; ratio exp(diff) max {torch.exp(d.max()).item():.4f}",
        flush=True,
    )
    del m
    torch.cuda.empty_cache()
