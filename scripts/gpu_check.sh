#!/usr/bin/env bash
# One-GPU benchmark check (one H100 / H200, under 8 minutes): the measured matmul peak, then DINO
# and MAE training-step throughput at the ImageNet setting (ViT-B/16, 224 px; DINO 2 x 224 + 10 x 96
# crops, batch 64; MAE mask 0.75, batch 256), bf16 autocast, eager and then with torch.compile.
# MFU is printed against the measured peak and the datasheet peak (989 TFLOP/s bf16 on H100 SXM / H200).
# Also: the DINO multi-crop on the GPU vs in one CPU process, and the batch copy from pinned vs
# pageable memory (`scripts/bench augment`).
#
#   bash scripts/gpu_check.sh
#   PYTHONPATH=src:.gpu/pylib PYTHON=python3 OUT=/tmp/bench bash scripts/gpu_check.sh   # vfm not installed
#   QUICK=1 bash scripts/gpu_check.sh        # a one-minute smoke test of the CUDA paths (tiny models)
#
# Writes $OUT/bench-cuda.{json,md}, $OUT/bench-cuda-augment.{json,md} and $OUT/bench-cuda-compile.{json,md}
# (OUT defaults to outputs/bench).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-outputs/bench}
# vfm from the source tree when it is not installed (hydra/omegaconf may come from PYTHONPATH too)
export PYTHONPATH="src${PYTHONPATH:+:${PYTHONPATH}}"
mkdir -p "$OUT"
rm -f "$OUT"/bench-cuda.{json,md} "$OUT"/bench-cuda-compile.{json,md} "$OUT"/bench-cuda-augment.{json,md}  # never show an earlier run's tables

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

if [[ "${QUICK:-0}" == 1 ]]; then
    args=(peak throughput --device cuda --precision bf16 --methods dino,mae --quick --out "$OUT")
    "$PYTHON" scripts/bench "${args[@]}" --tag quick
    "$PYTHON" scripts/bench "${args[@]}" --tag quick-compile --compile
    "$PYTHON" scripts/bench augment --device cuda --quick --out "$OUT" --tag quick-augment
    exit 0
fi

args=(peak throughput --device cuda --precision bf16 --methods dino,mae --backbone vit_base --img 224
      --n-local 10 --batch dino=64,mae=256 --steps 20 --warmup 5 --out "$OUT")

# eager (~2 min), then torch.compile (compile time is reported separately; ~3-5 min)
timeout "${EAGER_TIMEOUT_S:-200}" "$PYTHON" scripts/bench "${args[@]}"
# the DINO multi-crop of a batch of 64 at 224 px in one CPU process vs on this GPU (trainer.augment_on_device),
# and its copy to the GPU from pageable vs pinned memory (trainer.pin_memory)
timeout 120 "$PYTHON" scripts/bench augment --device cuda --out "$OUT" --tag augment || true
status=0
timeout "${COMPILE_TIMEOUT_S:-260}" "$PYTHON" scripts/bench "${args[@]}" --compile || status=$?
if [[ $status -ne 0 ]]; then
    echo "gpu_check: the torch.compile run failed or timed out (exit $status); the eager results stand" >&2
fi

echo
cat "$OUT/bench-cuda.md"
[[ -f "$OUT/bench-cuda-augment.md" ]] && cat "$OUT/bench-cuda-augment.md"
[[ -f "$OUT/bench-cuda-compile.md" ]] && cat "$OUT/bench-cuda-compile.md"
exit "$status"
