#!/usr/bin/env bash
# The checks this project runs where an NVIDIA GPU is present. Phases, all by default, or those named:
#   compile   every kernel a gpu64 / paper64 bf16 step launches, every autotuning tile, compiled at once on all CPU
#             cores (scripts/check_kernels_compile.py): a compile error fails fast, and Triton's cache is then full
#             for the runs below, whose autotuning only benchmarks (compiling one tile after another takes minutes)
#   tests     the whole test suite, compiled: kernel parity at the paper's shapes and every test marked `cuda`
#             (CUDA graphs, bf16 / fp16, resume from graph runs, NCCL capture, DALI's mixed decoder when DALI is
#             installed); in parallel processes when pytest-xdist is installed, each test's result logged as it ends
#   bench     the end-to-end step benchmark (bench/bench_step.py) and the kernel benchmark without its
#             torch.compile cases (run those separately: they compile once per layer), then their markdown reports
#             into bench/results/ and README.md
#   torchrun  a 1-GPU torchrun launch of the fast path (--amp --cuda-graphs), 300 paper64 steps
#   quality   scripts/quality_run.sh: paper64, reference step against fast step, 10k steps each, SWD side by side
# The first compile of the Triton kernels takes minutes (autotuning every layer shape); Triton caches it in
# ~/.triton. Usage, from the repository root: bash scripts/gpu_checks.sh [OUT_DIR] [PHASE...]
set -uo pipefail
out=${1:-gpu-checks}
shift || true
phases=${*:-compile tests bench torchrun quality}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
status=0
run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, remember a failure, go on with the next check
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: these checks need one')" ||
    exit 2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" |
    tee -a "$out/device.txt"
for phase in $phases; do
    case $phase in
    compile)
        run compile python scripts/check_kernels_compile.py --preset gpu64 paper64 --amp bf16 --configs all \
            --jobs "$(nproc)"
        ;;
    tests)
        parallel=()
        python -c "import xdist" 2>/dev/null && parallel=(-n 8)
        run tests python -m pytest -v -rfEs "${parallel[@]}" tests
        ;;
    bench)
        run bench_step python -m pytest -q bench/bench_step.py --benchmark-json "$out/step.json"
        run bench_kernels python -m pytest -q bench/bench_kernels.py -k "not compile" \
            --benchmark-json "$out/kernels.json"
        for suite in step kernels; do
            [ -s "$out/$suite.json" ] &&
                run "report_$suite" python scripts/bench_report.py "$out/$suite.json" --suite "$suite"
        done
        ;;
    torchrun)
        run torchrun python -m torch.distributed.run --standalone --nproc-per-node 1 scripts/train.py --preset paper64 \
            --steps 300 --log-every 100 --amp --cuda-graphs --out "$out/torchrun" --quiet
        ;;
    quality) run quality bash scripts/quality_run.sh "$out/quality" 10000 ;;
    *) echo "unknown phase $phase (compile, tests, bench, torchrun, quality)"; exit 2 ;;
    esac
done
exit $status
