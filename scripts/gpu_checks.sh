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
#             pytest-benchmark writes its JSON only when a session ends: the bench phases send themselves SIGINT once
#             BENCH_BUDGET_S seconds (default 540, under a device call's 600; never past CALL_LIMIT_S's end) have passed
#             since this script started, and one that would start with less than a minute left is skipped; the JSON then
#             holds the cases that finished (bench/conftest.py leaves the interrupted one out), and the stop is not a
#             failure. Narrow the rest with BENCH_SELECT, a pytest -k expression ANDed to the phase's own (e.g.
#             BENCH_SELECT="paper64 and not skip"), and set BENCH_TAG to keep that session's JSON apart
#             (OUT_DIR/<name>_<tag>.json); report merges every JSON of a suite. The bench phases refuse to start without
#             BEGAN_FAST_COMMIT (a quoted result names its commit).
#   profile   where the fast step's time goes (scripts/profile_step.py): each kernel's device time per step, the
#             Triton kernels against PyTorch's, and the graph-replayed against the eager step; paper64, batch 16,
#             bf16, into OUT_DIR/profile/
#   torchrun  a 1-GPU torchrun launch of the fast path (--amp --cuda-graphs), 300 paper64 steps
#   startup   the wall time of a 1-step gpu64 run (--amp --cuda-graphs) with an empty Triton cache and no head start
#             (BEGAN_FAST_PRECOMPILE=0: the first step compiles the kernels one after another), with an empty cache
#             and the head start (all compiled at once first), and again with that cache full; each its own cache,
#             so the order of the phases does not matter; after an untimed process has started CUDA once (loading
#             torch's libraries from disk, which would be in the first case's time alone)
#   startup_pair  two such runs started together with one empty cache, as a sweep's runs or torchrun's ranks of a
#             machine start: one compiles, the other waits its turn and then reads the kernels from the cache
#             (kernels.precompile.CompilerTurn); each one's wall time and `kernels:` line in its log
#   quality   scripts/quality_run.sh: paper64, reference step against fast step, 10k steps each (QUALITY_STEPS),
#             SWD side by side
# The phases that time (bench*, profile, startup*) are skipped, a failure, while other processes compute on the GPU
# (nvidia-smi lists them, a detached quality run say, or, for another container's, shows the GPU in use for 3 s),
# whose work would be in their timings; when nvidia-smi fails, they run and say it could not tell.
# Each phase that ends appends "PHASE STATUS SECONDS" to OUT_DIR/phases.txt (STATUS 124: stopped at the limit below;
# "skipped": not started, too little time left; "busy": the GPU was; both failures), and the script "end STATUS
# SECONDS" when it ends.
# Through the device tool, whose $OUT brings back at most 8 files: write OUT_DIR outside $OUT, set PACK to a .tgz
# under $OUT (OUT_DIR without *.pt is packed there after every phase: a `tar` after the script would never run in a
# call stopped at its limit, and what is under $OUT comes back even then) and CALL_LIMIT_S to the call's limit (600,
# or the device time left when less: every phase is then stopped in time for the last pack), e.g.
#   PACK=$OUT/gc.tgz CALL_LIMIT_S=600 BEGAN_FAST_COMMIT=<sha> bash scripts/gpu_checks.sh /tmp/gc compile tests
# BEGAN_FAST_COMMIT names the tree the benchmarks ran on; the device's copy has no .git and includes edits not
# committed, so set it from the checkout as $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD || echo +dirty).
# The tool brings back no file over 16 MiB, and one paper64 / gpu64 checkpoint is 181 MB: each phase that trains
# (torchrun, startup, startup_pair, quality) moves its runs' checkpoints (*.pt) out of OUT_DIR when it ends, into
# OUT_DIR.checkpoints beside it; a pack made while a phase still runs (quality, detached) must leave them out itself.
# A phase longer than one call (quality: two 10k-step runs) runs detached, collected by later calls while the machine
# stays warm (it goes back about 30 s after a call ends and after 30 minutes held: call again at once). It is
# launched, into a folder not used before (phases.txt is appended to: an old end line would read as its end), by
#   env -u CALL_LIMIT_S -u PACK setsid nohup bash scripts/gpu_checks.sh /tmp/q quality >/tmp/q.log 2>&1 &
# each later call first packs what it has so far (should the machine be lost before the next call),
#   tar czf "$OUT/q.tgz" --exclude='*.pt' --exclude='*.began-fast.tmp' -C /tmp q q.log
# and the call that waits for it to end does so within its own limit, packs it again, and gives the phases after it
# the time left (a CALL_LIMIT_S of the whole call would let them run past the call's end):
#   until grep -qs '^end ' /tmp/q/phases.txt || ((SECONDS > 540)); do sleep 10; done
#   tar czf "$OUT/q.tgz" --exclude='*.pt' --exclude='*.began-fast.tmp' -C /tmp q q.log
#   PACK=$OUT/gc.tgz CALL_LIMIT_S=$((600 - SECONDS)) BEGAN_FAST_COMMIT=<sha> bash scripts/gpu_checks.sh /tmp/gc ...
# One session's device time (30 minutes, idle time included, from the first call), in the order the open issues need
# it (an order not yet tried on a GPU; every call with PACK and CALL_LIMIT_S set):
#   call 1  the quality phase launched detached as above, first (issue 7's 10k-step pair, the longest phase: its
#           reference run launches no Triton kernel, and its fast run compiles its own), then compile torchrun
#           (issue 6's 1-GPU launch, on the cache compile filled)
#   call 2  tests_cuda (or tests), at once, while quality runs: every test marked cuda, on the GPU the pair shares
#           (their small models' kernels are not among compile's: they compile as the tests run, minutes)
#   call 3+ wait for quality and pack it; once it has ended, profile, then bench (BENCH_BUDGET_S under what is left),
#           and bench_step_compile with BENCH_SELECT=paper64 if time is left (the ratio against torch.compile)
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
for setting in "CALL_LIMIT_S=${CALL_LIMIT_S-1}" "PACK_MARGIN_S=${PACK_MARGIN_S-1}"; do  # unset: none; 08 is octal
    [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] ||
        { echo "${setting%%=*} must be a number of seconds >= 1, not '${setting#*=}'"; exit 2; }
done
mkdir -p "$out"
select=${BENCH_SELECT:+ and ($BENCH_SELECT)}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
status=0
# The phases end by this time (SECONDS), leaving PACK_MARGIN_S for the last pack; without CALL_LIMIT_S, never.
deadline=$((SECONDS + ${CALL_LIMIT_S:-1000000000} - ${PACK_MARGIN_S:-40}))
left() { echo $((deadline - SECONDS)); }
ended() {  # ended NAME STATUS START: the phase's line in OUT_DIR/phases.txt (START: its SECONDS when it began)
    echo "$1 $2 $((SECONDS - $3))" >>"$out/phases.txt"
}
too_late() {  # too_late NAME: true, and NAME recorded as skipped (a failure), when under 30 s of CALL_LIMIT_S are left
    (($(left) >= 30)) && return 1
    echo "$1: skipped, less than 30 s of CALL_LIMIT_S left"
    ended "$1" skipped "$SECONDS"
    status=1
}
busy() {  # busy NAME: true, and NAME recorded as skipped (a failure), while other processes compute on the GPU
    local others sample utilization
    if ! others=$(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>&1); then
        echo "$1: cannot tell whether other processes compute on the GPU (nvidia-smi failed: ${others//$'\n'/ });" \
            "timing it anyway"
        return 1
    fi
    others=$(paste -sd ';' - <<<"$others")
    if [ -z "$others" ]; then
        # nvidia-smi names no process of another container; the GPU's utilization counts them. Busy in 3 samples a
        # second apart: the phase that has just ended may still show in the first.
        for sample in 1 2 3; do
            ((sample == 1)) || sleep 1
            utilization=$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null | head -n 1)
            [[ $utilization =~ ^[1-9][0-9]*$ ]] || return 1
        done
    fi
    [ -n "$others" ] || others="none that nvidia-smi names, at $utilization% utilization"
    echo "$1: skipped, the GPU is computing for other processes ($others): its timings would share the GPU with them;" \
        "run it once they end (a detached quality run has ended when its phases.txt has an end line)"
    ended "$1" busy "$SECONDS"
    status=1
}
pack() {  # OUT_DIR without checkpoints into PACK, replaced whole (a pack stopped half-way leaves the last one)
    [ -n "${PACK:-}" ] || return 0
    local part=$PACK.$$.part  # this process's own: a detached run packing elsewhere never writes it
    # Without the checkpoint a run is writing too (its temporary file, .latest.pt.XXXX.began-fast.tmp: 181 MB).
    tar czf "$part" --exclude='*.pt' --exclude='*.began-fast.tmp' -C "$(dirname "$out")" "$(basename "$out")" &&
        mv -f "$part" "$PACK"
}
limited() {  # limited COMMAND...: COMMAND, stopped at the deadline when there is one (CALL_LIMIT_S), by SIGTERM or
    # by stop_signal when set (pytest: SIGINT, on which it still prints its failures; killed by SIGTERM it printed
    # only their names). Under timeout only then: timeout runs the command in a process group of its own, which a
    # terminal's Ctrl-C does not reach.
    if [ -n "${CALL_LIMIT_S:-}" ]; then timeout -s "${stop_signal:-TERM}" -k 10 "$(left)" "$@"; else "$@"; fi
}
run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, stopped at the deadline, remember a failure, go on
    local name=$1 rc start=$SECONDS
    shift
    too_late "$name" && return
    echo "== $name: $*"
    limited "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "$name: stopped at CALL_LIMIT_S; its log holds what it did"
    ((rc == 0)) || status=1
    ended "$name" "$rc" "$start"
}
# start_once OUT: the wall time of a 1-step gpu64 run (--amp --cuda-graphs) into the run folder OUT (a command, not a
# function, so that timeout can run it)
# shellcheck disable=SC2016  # $1 is the inner bash's argument
start_once=(bash -c 'TIMEFORMAT="wall %R s"; time python scripts/train.py --preset gpu64 --steps 1 --amp --cuda-graphs \
    --quiet --out "$1"' start_once)
startup() {  # the startup phase: three 1-step runs, each with its own Triton cache (the header says which)
    local empty filled case name head_start cache
    empty=$(mktemp -d) filled=$(mktemp -d)
    # Untimed: the first process to start CUDA and load torch's, cuDNN's and cuBLAS's libraries from disk would pay
    # that in the first case's wall time alone.
    limited python -c "import torch, triton; x = torch.ones(1, 1, 8, 8, device='cuda')
torch.nn.functional.conv2d(x, x[..., :3, :3]).sum().item(); (x[0, 0] @ x[0, 0]).sum().item()"
    for case in "cold_one_by_one 0 $empty" "cold_head_start 1 $filled" "warm 1 $filled"; do
        read -r name head_start cache <<<"$case"
        BEGAN_FAST_PRECOMPILE="$head_start" TRITON_CACHE_DIR="$cache" run "startup_$name" "${start_once[@]}" \
            "$out/startup_$name"
    done
}
startup_pair() {  # the startup_pair phase: two 1-step runs started together on one empty Triton cache
    local shared pids=() start=$SECONDS n rc
    shared=$(mktemp -d)
    for n in 1 2; do
        echo "== startup_pair_$n (in the background)"
        TRITON_CACHE_DIR="$shared" limited "${start_once[@]}" "$out/startup_pair_$n" \
            >"$out/startup_pair_$n.log" 2>&1 &
        pids+=($!)
    done
    for n in 1 2; do
        rc=0
        wait "${pids[n - 1]}" || rc=$? status=1
        ended "startup_pair_$n" "$rc" "$start"
    done
    cat "$out"/startup_pair_[12].log
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
((bench_deadline < deadline - 60)) || bench_deadline=$((deadline - 60))  # a minute for the report after it
bench() {  # bench SUITE FILTER NAME: bench/bench_SUITE.py's cases matching FILTER (and BENCH_SELECT) -> NAME.json
    local name=$3${BENCH_TAG:+_$BENCH_TAG} left=$((bench_deadline - SECONDS)) rc start=$SECONDS
    if [ -z "${BEGAN_FAST_COMMIT:-}" ]; then
        echo "bench_$name: set BEGAN_FAST_COMMIT to the commit this tree is (its JSON must name it)"
        ended "bench_$name" "no BEGAN_FAST_COMMIT" "$start"
        status=1
        return
    fi
    if ((left < 60)); then
        echo "bench_$name: skipped, less than a minute of BENCH_BUDGET_S left"
        ended "bench_$name" skipped "$start"
        status=1
        return
    fi
    busy "bench_$name" && return
    echo "== bench_$name: bench/bench_$1.py -k '$2$select', at most $left s"
    # --foreground: the SIGINT reaches pytest alone, once (to its whole process group it came twice, and the second
    # interrupted pytest's handling of the first with some 300 lines of tracebacks).
    timeout --foreground -s INT -k 30 "$left" python -m pytest -q "bench/bench_$1.py" -k "$2$select" \
        --benchmark-json "$out/$name.json" 2>&1 | tee "$out/bench_$name.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 124)); then
        echo "bench_$name: stopped at BENCH_BUDGET_S; $out/$name.json holds the cases that finished"
    elif ((rc != 0)); then
        status=1
    fi
    ended "bench_$name" "$rc" "$start"
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
    too_late "$phase" && continue  # (and not `timeout 0`, which is no limit at all)
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
        stop_signal=INT run tests python -m pytest -v -rfEs "${parallel[@]}" tests
        ;;
    tests_cuda) stop_signal=INT run tests_cuda python -m pytest -v -rfEs -m cuda tests ;;
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
    profile)
        busy profile ||
            run profile python scripts/profile_step.py --preset paper64 --batch 16 --amp bf16 --out "$out/profile"
        ;;
    torchrun)
        run torchrun python -m torch.distributed.run --standalone --nproc-per-node 1 scripts/train.py --preset paper64 \
            --steps 300 --log-every 100 --amp --cuda-graphs --out "$out/torchrun" --quiet
        ;;
    startup) busy startup || startup ;;
    startup_pair) busy startup_pair || startup_pair ;;
    quality) run quality bash scripts/quality_run.sh "$out/quality" "${QUALITY_STEPS:-10000}" ;;
    esac
    put_checkpoints_away
    pack
done
echo "end $status $SECONDS" >>"$out/phases.txt"  # the last line: every phase has ended, its checkpoints moved
pack
exit $status
