#!/usr/bin/env bash
# Phases of one GPU session on a lent machine (../shared/gpu/README.md), each one `run` call:
#   tools/gpu/session.sh install|tests|kernels|bench2|bench1|decode|peers
# `install` expects /tmp/stage to hold the three parts. Logs and results go to $OUT.
# trainer_config.kernels='liger' needs liger-kernel: carry .gpu/peers (its wheel is there) in
# `install` (or in `kernels`, `bench1`, `bench2`, which install it too when it is missing).
# Tests knob: TORCHRUN_K (pytest -k for the 2-GPU file). Kernels knob: SHAPE (qwen2-0.5b).
# Bench knobs (environment): PIPES (1,2,4,8), STEPS (3), TAG (suffix of the output names),
# CFG (the config: bench2 qwen2_0_5b_shape_2gpu.py, bench1 qwen2_0_5b_shape_1gpu.py), EXTRA (more arguments, e.g. "--set train_config.pack_sequences=False" or "--set model_configs.policy.trainer_config.kernels=liger"), NPROC (bench2: 4),
# LIMIT (seconds the bench may run: 560; keep it under the `run` call's own limit, or
# nothing comes back). A bench writes into /tmp/bench_out and ends by packing that folder
# into $OUT/bench<TAG>.tgz, one file, because `run` brings back only a few files per call.
set -uo pipefail
phase=$1
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 RLHF_PIPE_CACHE=/tmp/cache
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
liger() {
    python3 -c "import liger_kernel" 2>/dev/null && return
    if ls .gpu/peers/liger_kernel-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            .gpu/peers/liger_kernel-*.whl
    else
        echo "# no .gpu/peers/liger_kernel-*.whl here: kernels='liger' will not import"
    fi
}
header() {
    echo "# device: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
    echo "# date: $(date -u +%FT%TZ); torch $(python3 -c 'import torch;print(torch.__version__)')"
    echo "# command: $*"
}
case $phase in
install)
    mkdir -p /tmp/site
    cat /tmp/stage/vllm.tar.xz.part* | xz -d -T8 | tar x -C /tmp/site &&
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/p3/*.whl
    liger
    python3 -c "import vllm, deepspeed; print('vllm', vllm.__version__)"
    ;;
tests)
    # TORCHRUN_K: a pytest -k expression for the 2-GPU file (e.g. one_process), to save time.
    liger
    for f in tests/gpu/test_gpu_torchrun.py tests/gpu/test_gpu_single.py tests/gpu/test_gpu_kernels.py; do
        name=$(basename "$f" .py); k=()
        [[ $name == test_gpu_torchrun && -n ${TORCHRUN_K:-} ]] && k=(-k "$TORCHRUN_K")
        { header "python3 -m pytest -s -q $f ${k[*]}"
          timeout 400 python3 -m pytest -s -q -p no:cacheprovider "$f" "${k[@]}"; } \
            > "$out/$name.log" 2>&1
        tail -5 "$out/$name.log"
    done
    ;;
kernels)
    # tests/gpu/test_gpu_kernels.py alone: liger and compile against the plain path on one
    # shape (needs no vLLM, so no `install` before it; carry .gpu/peers).
    liger
    name=test_gpu_kernels_${SHAPE:-qwen2-0.5b}
    { header "python3 -m pytest -s -q tests/gpu/test_gpu_kernels.py (SHAPE ${SHAPE:-qwen2-0.5b})"
      python3 -c "import torch, triton, transformers, liger_kernel; from importlib.metadata import version; print('# torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'liger-kernel', version('liger-kernel'))"
      RLHF_PIPE_KERNELS_SHAPE=${SHAPE:-qwen2-0.5b} timeout "${LIMIT:-560}" \
          python3 -m pytest -s -q -p no:cacheprovider tests/gpu/test_gpu_kernels.py; } \
        > "$out/$name.log" 2>&1
    grep -E "plain|passed|failed|skipped|Error" "$out/$name.log" | tail -12
    ;;
bench2)
    liger
    name=bench_2gpu${TAG:-}; work=/tmp/bench_out
    mkdir -p "$work"
    cfg=${CFG:-benchmarks/configs/qwen2_0_5b_shape_2gpu.py}
    cmd="python3 -m torch.distributed.run --nproc-per-node ${NPROC:-4} -m rlhf_pipe.train $cfg --bench ${PIPES:-1,2,4,8} --steps ${STEPS:-3} --warmup 1 --out $work/$name ${EXTRA:-}"
    { header "$cmd"; timeout "${LIMIT:-560}" $cmd; } > "$work/$name.log" 2>&1
    grep -E "^pipe |bench: pipe|weight sync|error|Error" "$work/$name.log" | tail -30
    tar czf "$out/$name.tgz" -C "$work" "$name.log" $(cd "$work" && ls -d "$name" 2>/dev/null)  # also after a timeout
    ;;
bench1)
    liger
    name=bench_1gpu${TAG:-}; work=/tmp/bench_out
    mkdir -p "$work"
    cfg=${CFG:-benchmarks/configs/qwen2_0_5b_shape_1gpu.py}
    cmd="python3 -m rlhf_pipe bench $cfg --pipe ${PIPES:-1,2,4,8} --steps ${STEPS:-3} --warmup 1 --out $work/$name ${EXTRA:-}"
    { header "$cmd"; CUDA_VISIBLE_DEVICES=0 timeout "${LIMIT:-560}" $cmd; } > "$work/$name.log" 2>&1
    grep -E "^pipe |bench: pipe|streaming|error|Error" "$work/$name.log" | tail -30
    tar czf "$out/$name.tgz" -C "$work" "$name.log" $(cd "$work" && ls -d "$name" 2>/dev/null)
    ;;
decode)
    # Where a vLLM decode step goes (benchmarks/decode_cost.py). Knobs: SHAPE (internlm2-1.8b),
    # VARIANTS (comma-separated, see the script), LIMIT (500 s in all).
    name=decode_cost_${SHAPE:-internlm2-1.8b}${TAG:-}
    cmd="python3 benchmarks/decode_cost.py --shape ${SHAPE:-internlm2-1.8b} --variants ${VARIANTS:-inproc_seeded,process_seeded} --out $out/$name.json"
    { header "$cmd"; CUDA_VISIBLE_DEVICES=0 timeout "${LIMIT:-500}" $cmd; } > "$out/$name.log" 2>&1
    grep -vE "Warning|warn" "$out/$name.log" | tail -12
    ;;
peers)
    # TRL's GRPOTrainer on the GRPO timing workload (benchmarks/peers/trl_grpo.py). Knobs:
    # SHAPE (qwen2-0.5b), IS ("off" or "off on"), STEPS (7), WARMUP (2), LIMIT (280 s each).
    # Its wheels travel in .gpu/peers (carry it): trl, datasets, multiprocess, xxhash.
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/peers/*.whl
    for is in ${IS:-off}; do
        name=trl_${SHAPE:-qwen2-0.5b}_is_${is}
        cmd="python3 benchmarks/peers/trl_grpo.py --shape ${SHAPE:-qwen2-0.5b} --is-correction $is --steps ${STEPS:-7} --warmup ${WARMUP:-2} --out $out/$name.json"
        { header "$cmd"; CUDA_VISIBLE_DEVICES=0 timeout "${LIMIT:-280}" $cmd; } > "$out/$name.log" 2>&1
        grep -E "^trl |Error|error" "$out/$name.log" | tail -5
    done
    ;;
esac
