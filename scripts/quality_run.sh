#!/usr/bin/env bash
# The quality check of the fast path (GPU): paper64 on the built-in faces, trained twice from the same seed, once
# with the reference step (float32, eager, plain PyTorch layers) and once with the fast step (--amp --cuda-graphs),
# each evaluated by SWD every 2000 steps during training and once more at the end, then compared at equal steps by
# scripts/compare_runs.py. The two runs share the GPU, so their speeds are not benchmarks (see bench/ for those).
# Usage, from the repository root: bash scripts/quality_run.sh [OUT_DIR] [STEPS]   (default: runs/quality 10000)
set -euo pipefail
out=${1:-runs/quality}
steps=${2:-10000}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
common=(--preset paper64 --steps "$steps" --eval-every 2000 --eval-images 1024 --sample-every 1000 --quiet)
python scripts/train.py "${common[@]}" --reference-step --impl torch --out "$out/reference" >"$out/reference.log" 2>&1 &
reference=$!
python scripts/train.py "${common[@]}" --amp --cuda-graphs --out "$out/fast" >"$out/fast.log" 2>&1 &
fast=$!
# One run failing (or this script stopped) ends the other too; after both ended, kill finds none: not a failure.
trap 'kill $reference $fast 2>/dev/null || true' EXIT
wait $reference || { echo "the reference run failed: $out/reference.log"; tail -3 "$out/reference.log"; exit 1; }
wait $fast || { echo "the fast run failed: $out/fast.log"; tail -3 "$out/fast.log"; exit 1; }
for run in reference fast; do
    python scripts/evaluate.py "$out/$run/latest.pt" --num 4096 --json "$out/$run/eval.json"
done
python scripts/compare_runs.py "$out/reference" "$out/fast" --plot "$out/compare.png" | tee "$out/compare.txt"
