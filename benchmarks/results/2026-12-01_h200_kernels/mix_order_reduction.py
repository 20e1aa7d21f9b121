"""The actor's train call (8 x 539 tokens) plain, compiled with and without inductor's mix-order
reduction, and with liger; the graphs compiled for chunks of other sizes (rlhf_pipe/kernels.py).

    python3 mix_order_reduction.py qwen2-0.5b,internlm2-1.8b   (from the checkout's root)
"""

import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, ".")
from rlhf_pipe.assets.shaped import build_shaped_assets  # noqa: E402
from rlhf_pipe.kernels import apply_kernels, decoder_layers  # noqa: E402
from rlhf_pipe.models import load_causal_lm  # noqa: E402
from rlhf_pipe.roles import LossSettings  # noqa: E402
from tests.gpu.test_gpu_kernels import _role, _samples, _train_s  # noqa: E402

loss = LossSettings(0.2, None, 1.0, 1.0, "token_mean")
print("mix_order_reduction default:", torch._inductor.config.triton.mix_order_reduction)
for shape in sys.argv[1].split(","):
    path = str(build_shaped_assets(shape).policy)
    samples = _samples(8, 512, 0)
    for variant in ("plain", "compile", "compile-nomix", "liger"):
        model = load_causal_lm(path, "bfloat16")
        if variant == "compile-nomix":
            for layer in decoder_layers(model, "k"):
                layer.compile(dynamic=True, options={"triton.mix_order_reduction": False})
        elif variant == "compile":  # as it was before rlhf_pipe.kernels.COMPILE_OPTIONS
            for layer in decoder_layers(model, "k"):
                layer.compile(dynamic=True)
        elif variant == "liger":
            apply_kernels(model, variant, "cuda", "policy")
        role = _role(model.cuda())
        g0 = counters["stats"]["unique_graphs"]
        t = time.time()
        role.train(samples, loss, 8)
        role.drop_grads()
        first = time.time() - t
        g = [counters["stats"]["unique_graphs"] - g0]
        for ans in (384, 256, 448, 128):
            role.train(_samples(8, ans, ans), loss, 8)
            role.drop_grads()
            g.append(counters["stats"]["unique_graphs"] - g0)
        s = _train_s(role, samples, repeat=7)
        print(
            f"{shape} {variant}: first call {first:.1f} s, train 8x539 tok median "
            f"{s * 1000:.1f} ms; graphs after chunks of 4312,3288,2264,3800,1240 tokens: {g}",
            flush=True,
        )
        del role, model
        torch.cuda.empty_cache()
