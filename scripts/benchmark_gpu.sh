#!/usr/bin/env bash
# The GPU benchmark on one GPU (an H100: under 8 minutes), one command:
#   bash scripts/benchmark_gpu.sh [OUT.json] [more scripts/benchmark.py flags]
# ImageNet-64 CT training steps at per-GPU batch 64 (fp32, fp16, bf16; channels_last, bf16 also without;
# fp16 and bf16 with torch.compile): images/s, counted FLOPs per step and model FLOP utilisation against
# the matmul ceiling measured in the same dtype, peak memory, whether a step runs without host-device
# synchronisation; one-step sampling at batch 256 (fp32, fp16, fp16 + channels_last, + torch.compile, and
# unfused attention), and the same U-Net through diffusers' ConsistencyModelPipeline. The JSON is
# rewritten after every row; rows not started within BENCH_BUDGET_S seconds are recorded as skipped (the
# compiled rows come last), and BENCH_TIMEOUT_S stops the run outright, printing the rows finished.
# `python scripts/benchmark.py --device cuda` (no --only) runs every row, the demo and CD included.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmark_gpu.json}"
shift || true
rows="train/imagenet64/ct/,sample/imagenet64/cm/onestep/,sample/imagenet64/diffusers/onestep/"
timeout --signal=INT "${BENCH_TIMEOUT_S:-460}" python scripts/benchmark.py --device cuda --only "$rows" \
  --budget_s "${BENCH_BUDGET_S:-330}" --out "$out" "$@"
status=$?
if [ "$status" -eq 124 ] && [ -f "$out" ]; then
  echo "stopped at ${BENCH_TIMEOUT_S:-460} s; the rows finished by then:"
  python scripts/benchmark.py --print_table "$out"
fi
exit "$status"
