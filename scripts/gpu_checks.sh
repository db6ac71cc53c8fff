#!/usr/bin/env bash
# The checks this project runs where an NVIDIA GPU is present. Phases, all by default, or those named:
#   compile   every kernel a gpu64 / paper64 / paper128 step launches (with and without skips; float32, bf16 and
#             fp16, as the fast step, evaluate.py, the tests and the benchmarks run them), every autotuning tile,
#             compiled at once on all CPU cores (scripts/check_kernels_compile.py): a compile error fails fast, and
#             Triton's cache is then full for the runs below, whose autotuning only benchmarks (compiling one tile
#             after another takes minutes)
#   tests     the whole test suite, compiled: kernel parity at the paper's shapes and every test marked `cuda`
#             (CUDA graphs, bf16 / fp16, resume from graph runs, NCCL capture, DALI's mixed decoder when DALI is
#             installed); in 8 processes through pytest-xdist (installed from .whl/xdist/ when the machine lacks it:
#             carry that folder; serially the suite takes longer than one device call), each result logged as it ends
#   tests_cuda  the tests marked `cuda` alone, where the whole suite cannot run in parallel
#   bench_step, bench_kernels
#             the end-to-end step benchmark (bench/bench_step.py) and the kernel benchmark (bench/bench_kernels.py)
#             without their torch.compile cases, each into OUT_DIR/<suite>.json
#   bench_step_compile, bench_kernels_compile
#             the torch.compile cases alone (one compilation per case), into OUT_DIR/<suite>_compile.json
#   bench_data  the data loaders' throughput and the fast step fed by each (bench/bench_data.py; its DALI cases
#             skip themselves where DALI is not installed), into OUT_DIR/data.json
#   report    the markdown reports of the JSON files there, merged per suite, into OUT_DIR/results/ and a copy of
#             README.md in OUT_DIR (bring the JSON back and rerun scripts/bench_report.py in the repository)
#   bench     bench_step, bench_kernels and report
#             pytest-benchmark writes its JSON only when a session ends: the bench phases send themselves SIGINT
#             once BENCH_BUDGET_S seconds (default 540, under a device call's 600) have passed since this script
#             started, and one that would start with less than a minute left is skipped; the JSON then holds the
#             cases that finished (bench/conftest.py leaves the interrupted one out), and the stop is not a failure.
#             Narrow the rest with BENCH_SELECT, a pytest -k expression ANDed to the phase's own (e.g.
#             BENCH_SELECT="paper64 and not skip"), and set BENCH_TAG to keep that session's
#             JSON apart (OUT_DIR/<name>_<tag>.json); report merges every JSON of a suite. The bench phases refuse
#             to start without BEGAN_FAST_COMMIT (a quoted result names its commit).
#   profile   where the fast step's time goes (scripts/profile_step.py): each kernel's device time per step, the
#             Triton kernels against PyTorch's, and the graph-replayed against the eager step; paper64, batch 16,
#             bf16, into OUT_DIR/profile/
#   torchrun  a 1-GPU torchrun launch of the fast path (--amp --cuda-graphs), 300 paper64 steps
#   startup   the wall time of a 1-step gpu64 run (--amp --cuda-graphs) with an empty Triton cache and no head start
#             (BEGAN_FAST_PRECOMPILE=0: the first step compiles the kernels one after another), with an empty cache
#             and the head start (all compiled at once first), and again with that cache full; each its own cache,
#             so the order of the phases does not matter
#   startup_pair  two such runs started together with one empty cache, as a sweep's runs or torchrun's ranks of a
#             machine start: one compiles, the other waits its turn and then reads the kernels from the cache
#             (kernels.precompile.CompilerTurn); each one's wall time and `kernels:` line in its log
#   quality   scripts/quality_run.sh: paper64, reference step against fast step, 10k steps each, SWD side by side
# Through the device tool, whose $OUT brings back at most 8 files: write OUT_DIR outside $OUT and pack it, e.g.
#   bash scripts/gpu_checks.sh /tmp/gc compile tests; tar czf "$OUT/gc.tgz" --exclude='*.pt' -C /tmp gc
# The tool brings back no file over 16 MiB, and one paper64 / gpu64 checkpoint is 181 MB: each phase that trains
# (torchrun, startup, startup_pair, quality) moves its runs' checkpoints (*.pt) out of OUT_DIR when it ends, into
# OUT_DIR.checkpoints beside it; a pack made while a phase still runs (quality, detached) must leave them out itself.
# A phase longer than one call (quality: two 10k-step runs) runs detached, collected by later calls while the machine
# stays warm (it goes back after a short idle time and after 30 minutes held: call again at once, and poll):
#   setsid nohup bash scripts/gpu_checks.sh /tmp/q quality >/tmp/q.log 2>&1 &
# One session's device time (30 minutes, idle time included, from the first call), in the order the open issues need
# it (an order not yet tried on a GPU: pack OUT_DIR at the end of every call, whatever has finished):
#   call 1  compile torchrun (issue 6's 1-GPU launch, on the cache compile filled), then the quality phase detached as
#           above (issue 7's 10k-step pair: the longest phase, so it starts as early as the cache allows)
#   call 2  tests_cuda (or tests), at once, while quality runs: every test marked cuda, on the GPU the pair shares
#   call 3+ poll quality; when it has ended, bench (BENCH_BUDGET_S under what is left), then profile
# startup (near 600 s alone) and bench_data come after these, in a session of their own if need be.
# The first compile of the Triton kernels takes minutes (autotuning every layer shape); Triton caches it in
# ~/.triton, which is lost with the machine: where the machine goes back after a short idle time, run `compile` in the
# same call as the phases after it, or call again at once. Usage, from the repository root:
#   bash scripts/gpu_checks.sh OUT_DIR [PHASE...]
set -uo pipefail
case ${1:-} in  # before the GPU's checks start: --help is not an OUT_DIR (mkdir and tee would take it as an option)
    -h | --help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "usage: bash scripts/gpu_checks.sh OUT_DIR [PHASE...] (not the option $1; --help lists the phases)"
        exit 2 ;;
esac
if [[ -z ${1:-} ]]; then  # none or empty (an unset variable); ${1:?...} said "...: line 60: 1: usage: ...", status 1
    echo "usage: bash scripts/gpu_checks.sh OUT_DIR [PHASE...] (--help lists the phases)"
    exit 2
fi
out=$1
shift
phases=${*:-compile tests bench profile torchrun startup startup_pair quality}
known=" compile tests tests_cuda bench_step bench_step_compile bench_kernels bench_kernels_compile bench_data report"
known+=" bench profile torchrun startup startup_pair quality "
for phase in $phases; do  # all named checked before the first starts: a typo in the last would end the script hours in
    [[ $known == *" $phase "* ]] || { echo "unknown phase $phase (one of:${known% })"; exit 2; }
done
mkdir -p "$out"
select=${BENCH_SELECT:+ and ($BENCH_SELECT)}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
status=0
run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, remember a failure, go on with the next check
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || status=1
}
start_once() {  # start_once OUT: the wall time of a 1-step gpu64 run (--amp --cuda-graphs) into the run folder OUT
    local TIMEFORMAT="wall %R s"
    time python scripts/train.py --preset gpu64 --steps 1 --amp --cuda-graphs --quiet --out "$1"
}
checkpoints=${out%/}.checkpoints
put_checkpoints_away() {  # the *.pt under OUT_DIR (runs' checkpoints) moved to OUT_DIR.checkpoints, same subpaths
    local pt dest
    while IFS= read -r -d '' pt; do
        dest=$checkpoints/${pt#"${out%/}"/}
        mkdir -p "$(dirname "$dest")" && mv -f "$pt" "$dest" || status=1
    done < <(find "${out%/}" -name '*.pt' -type f -print0)
}
bench_deadline=$((SECONDS + ${BENCH_BUDGET_S:-540}))
bench() {  # bench SUITE FILTER NAME: bench/bench_SUITE.py's cases matching FILTER (and BENCH_SELECT) -> NAME.json
    local name=$3${BENCH_TAG:+_$BENCH_TAG} left=$((bench_deadline - SECONDS)) rc
    if [ -z "${BEGAN_FAST_COMMIT:-}" ]; then
        echo "bench_$name: set BEGAN_FAST_COMMIT to the commit this tree is (its JSON must name it)"
        status=1
        return
    fi
    if ((left < 60)); then
        echo "bench_$name: skipped, less than a minute of BENCH_BUDGET_S left"
        return
    fi
    echo "== bench_$name: bench/bench_$1.py -k '$2$select', at most $left s"
    timeout -s INT -k 30 "$left" python -m pytest -q "bench/bench_$1.py" -k "$2$select" \
        --benchmark-json "$out/$name.json" 2>&1 | tee "$out/bench_$name.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 124)); then
        echo "bench_$name: stopped at BENCH_BUDGET_S; $out/$name.json holds the cases that finished"
    elif ((rc != 0)); then
        status=1
    fi
}
report() {  # each suite's JSON files in OUT_DIR, merged, as markdown into OUT_DIR/results and a README copy
    cp README.md "$out/README.md"
    local suite f files
    for suite in step kernels data; do
        files=()
        for f in "$out/$suite.json" "$out/${suite}"_*.json; do [ -s "$f" ] && files+=("$f"); done
        [ ${#files[@]} -eq 0 ] || run "report_$suite" python scripts/bench_report.py "${files[@]}" --suite "$suite" \
            --out-dir "$out/results" --readme "$out/README.md"
    done
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: these checks need one')" ||
    exit 2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" |
    tee -a "$out/device.txt"
# The tree copied to a GPU machine has no .git: the benchmarks' JSON takes the commit from BEGAN_FAST_COMMIT.
echo "commit ${BEGAN_FAST_COMMIT:-unknown (set BEGAN_FAST_COMMIT)}" | tee -a "$out/device.txt"
for phase in $phases; do
    case $phase in
    compile)
        run compile python scripts/check_kernels_compile.py --preset gpu64 paper64 paper128 --skip \
            --amp none bf16 fp16 --configs all --jobs "$(nproc)"
        ;;
    tests)
        python -c "import xdist" 2>/dev/null || ! compgen -G ".whl/xdist/*.whl" >/dev/null ||
            python -m pip install -q --no-index --no-deps .whl/xdist/*.whl
        parallel=()
        python -c "import xdist" 2>/dev/null && parallel=(-n 8)
        run tests python -m pytest -v -rfEs "${parallel[@]}" tests
        ;;
    tests_cuda) run tests_cuda python -m pytest -v -rfEs -m cuda tests ;;
    bench_step) bench step "not compile" step ;;
    bench_step_compile) bench step compile step_compile ;;
    bench_kernels) bench kernels "not compile" kernels ;;
    bench_kernels_compile) bench kernels compile kernels_compile ;;
    bench_data) bench data loader data ;;  # "loader": every case (each name holds it)
    report) report ;;
    bench)
        bench step "not compile" step
        bench kernels "not compile" kernels
        report
        ;;
    profile) run profile python scripts/profile_step.py --preset paper64 --batch 16 --amp bf16 --out "$out/profile" ;;
    torchrun)
        run torchrun python -m torch.distributed.run --standalone --nproc-per-node 1 scripts/train.py --preset paper64 \
            --steps 300 --log-every 100 --amp --cuda-graphs --out "$out/torchrun" --quiet
        ;;
    startup)
        empty=$(mktemp -d) filled=$(mktemp -d)
        for case in "cold_one_by_one 0 $empty" "cold_head_start 1 $filled" "warm 1 $filled"; do
            read -r name head_start cache <<<"$case"
            BEGAN_FAST_PRECOMPILE="$head_start" TRITON_CACHE_DIR="$cache" run "startup_$name" start_once \
                "$out/startup_$name"
        done
        ;;
    startup_pair)
        shared=$(mktemp -d) pids=()
        for n in 1 2; do
            echo "== startup_pair_$n (in the background)"
            TRITON_CACHE_DIR="$shared" start_once "$out/startup_pair_$n" >"$out/startup_pair_$n.log" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        cat "$out"/startup_pair_[12].log
        ;;
    quality) run quality bash scripts/quality_run.sh "$out/quality" 10000 ;;
    esac
    put_checkpoints_away
done
exit $status
