#!/usr/bin/env bash
# The quality check of the fast path (GPU): paper64 on the built-in faces, trained twice from the same seed, once
# with the reference step (float32, eager, plain PyTorch layers) and once with the fast step (--amp --cuda-graphs),
# each evaluated by SWD every 2000 steps during training and once more at the end, then compared at equal steps by
# scripts/compare_runs.py. The two runs share the GPU, so their speeds are not benchmarks (see bench/ for those).
# Usage, from the repository root: bash scripts/quality_run.sh [OUT_DIR] [STEPS] [PRESET]
#   (default: runs/quality 10000 paper64). FAST_FLAGS replaces the fast run's flags (e.g. "--amp fp16 --cuda-graphs";
#   "--amp" runs on a CPU), EVAL_NUM the number of images evaluate.py compares at the end (default 4096) and PYTHON
#   the interpreter (default: python).
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) ||
    { echo "quality_run.sh needs bash 5.1 or newer (for wait -n -p), not $BASH_VERSION"; exit 2; }
case ${1:-} in  # --help is not an OUT_DIR (mkdir would take it as an option, and both runs fail on it)
    -h | --help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "usage: bash scripts/quality_run.sh [OUT_DIR] [STEPS] [PRESET] (not the option $1; see --help)"
        exit 2 ;;
esac
out=${1:-runs/quality}
steps=${2:-10000}
preset=${3:-paper64}
read -ra fast_flags <<<"${FAST_FLAGS:---amp --cuda-graphs}"
python=${PYTHON:-python}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
common=(--preset "$preset" --steps "$steps" --eval-every 2000 --eval-images 1024 --sample-every 1000 --quiet)
"$python" scripts/train.py "${common[@]}" --reference-step --impl torch --out "$out/reference" \
    >"$out/reference.log" 2>&1 &
reference=$!
"$python" scripts/train.py "${common[@]}" "${fast_flags[@]}" --out "$out/fast" >"$out/fast.log" 2>&1 &
fast=$!
# One run failing (or this script stopped) ends the other too; after both ended, kill finds none: not a failure. The
# script ends once they have (a stopped run writes its checkpoint first): gpu_checks.sh, stopping it at its call's
# limit, went on to move the checkpoints away and pack the folder while both runs were still writing.
trap 'kill $reference $fast 2>/dev/null || true; wait || true' EXIT
# Whichever run ends first is checked first: a run that fails at its start ends the check then, not after the
# other run's 10k steps.
declare -A run_of=([$reference]=reference [$fast]=fast)
while ((${#run_of[@]})); do
    status=0
    wait -n -p ended "${!run_of[@]}" || status=$?
    run=${run_of[$ended]}
    unset "run_of[$ended]"
    ((status == 0)) || { echo "the $run run failed: $out/$run.log"; tail -3 "$out/$run.log"; exit 1; }
done
for run in reference fast; do
    "$python" scripts/evaluate.py "$out/$run/latest.pt" --num "${EVAL_NUM:-4096}" --json "$out/$run/eval.json"
done
"$python" scripts/compare_runs.py "$out/reference" "$out/fast" --plot "$out/compare.png" | tee "$out/compare.txt"
