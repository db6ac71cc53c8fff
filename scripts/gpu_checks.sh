#!/usr/bin/env bash
# The checks this project runs where an NVIDIA GPU is present, in one go (about 20 minutes on an H100):
#   1. the whole test suite, compiled: kernel parity at the paper's shapes and every test marked `cuda`
#      (CUDA graphs, bf16 / fp16, resume from graph runs, DALI's mixed decoder when DALI is installed);
#   2. the end-to-end step benchmark (bench/bench_step.py) and the kernel benchmark without its torch.compile
#      cases (bench/bench_kernels.py; run the compile cases separately, they compile once per layer);
#   3. the markdown reports of both into bench/results/ and README.md.
# Usage, from the repository root: bash scripts/gpu_checks.sh [OUT_DIR]   (logs and JSON go to OUT_DIR)
set -uo pipefail
out=${1:-gpu-checks}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
status=0
run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, remember a failure, go on with the next check
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: these checks need one')" || exit 2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
run tests python -m pytest -q -rs tests
run bench_step python -m pytest -q bench/bench_step.py --benchmark-json "$out/step.json"
run bench_kernels python -m pytest -q bench/bench_kernels.py -k "not compile" --benchmark-json "$out/kernels.json"
for suite in step kernels; do
    [ -s "$out/$suite.json" ] && run "report_$suite" python scripts/bench_report.py "$out/$suite.json" --suite "$suite"
done
exit $status
