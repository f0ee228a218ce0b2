#!/usr/bin/env bash
# Issue 14's GPU measurements in one call of the lent device machine (about 6-8 minutes there).
#
# That machine has no internet and none of our asset packages; its python3 holds jax (CUDA), flax,
# optax, torch, peft and transformers, so this runs the benchmarks that need no asset, from the
# working tree (PYTHONPATH), no install:
#   1. bench_weight_grad.py: sampled product vs dense weight gradient by density -> the GPU value of
#      `train.sampled_grad_max_density` (the crossover; 0.03 on the 2-core CPU, BENCHMARKS.md 2b; on
#      GPU/TPU `auto` is 0 until this measures it: factored.ACCELERATOR_SAMPLED_MAX_DENSITY, 2g);
#   2. bench_merge_kernels.py at SHiRA r=8 and r=2: merge / switch formulations against the
#      scatter-add floor on SmolLM2-135M's 210 weight shapes (BENCHMARKS.md 1d);
#   3. bench_train_step.py --random-init: MiniLM-L6's architecture with random weights and tokens,
#      16x128, jaxsparse SHiRA / LoRA / full vs PEFT SHiRA / LoRA / torch full, torch on the GPU.
#
# With the device tool (files come back from $OUT):
#   run(command="bash benchmarks/device_check.sh", timeout_s=600)
# Anywhere else (CPU smoke run): OUT=/tmp/dc TORCH_DEVICE=cpu STEPS=1 SEQ=32 bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/device}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
steps=${STEPS:-10}
seq=${SEQ:-128}
torch_device=${TORCH_DEVICE:-cuda}
log="$out/device_check.log"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$py" -c 'import jax, jaxlib, flax, optax, torch, transformers; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__, "transformers", transformers.__version__); print("jax devices", jax.devices())'
} 2>&1 | tee "$log"
"$py" benchmarks/bench_weight_grad.py --repeats 10 \
    --out "$out/weight_grad_device.json" --plot "$out/weight_grad_device.png" 2>&1 | tee -a "$log"
for r in 8 2; do
    "$py" benchmarks/bench_merge_kernels.py --rank "$r" --repeats 11 --out "$out/merge_kernels_device_r$r.json" 2>&1 | tee -a "$log"
done
"$py" benchmarks/bench_train_step.py --random-init --torch-device "$torch_device" --seq-lens "$seq" \
    --steps "$steps" --warmup 2 \
    --methods jax-shira jax-lora jax-full peft-shira peft-lora torch-full \
    --out "$out/train_step_device.json" --plot "$out/train_step_device.png" 2>&1 | tee -a "$log"
