"""The fast step's Triton kernels are compiled ahead, all at once, before its first step (kernels/precompile.py,
FastStep.precompile), and the autotuners keep their picks in Triton's disk cache.

Each probe runs in a subprocess without TRITON_INTERPRET (this process's kernels are interpreted where there is no
GPU) and, where it says so, with a Triton cache of its own, so that nothing an earlier test compiled is found.
Without a GPU the probe compiles for sm_90 and checks what it can without launching: every compile the dry run
asks for lands in the kernels' caches, and the step is left as it was. On a GPU the probes check what matters:
the first step then compiles nothing, follows the trajectory it would have without the head start, and a second
process reads the autotuners' picks instead of benchmarking again. What the training loop does with the head start
(how many threads, what it says, that a failed one only costs the time) is checked on the CPU with a stand-in.
"""

import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import began_fast.train as train_module
import kernels
from began_fast import ops
from began_fast.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from began_fast.fast_step import FastStep
from began_fast.model import Discriminator, Generator
from began_fast.step import ReferenceStep
from began_fast.train import RunOptions, compile_kernels, setup_run, train
from kernels.precompile import CompilerTurn, Precompiled

ROOT = Path(__file__).resolve().parent.parent

# The probes build the `demo` preset's fast step on the Triton layers as the compile check does: build_step returns
# it and its batch shape.
BUILD_STEP = """
import json
import sys
import torch
sys.path.insert(0, "scripts")
from check_kernels_compile import preset_step

def build_step(device, amp):
    return preset_step("demo", True, amp, device)
"""

# The compiles the step's dry run asks for, recorded rather than run; BEGAN's balance readied on its own (three
# kernels, quick to compile); and each kernel Triton compiles (or reads from its disk cache): the thread it compiles
# on, and whether a warm-up or a launch asked.
COUNT_COMPILES = """
import threading
from triton import knobs
from kernels import precompile

def launches_of(step, shape):
    asked, warm_up = [], precompile._warm_up
    precompile._warm_up = lambda *launch: asked.append(launch)  # launch: (device, jit, args, kwargs, grid, tile)
    try:
        step.precompile(shape, 1)
    finally:
        precompile._warm_up = warm_up
    return asked

def ready_balance():
    from began_fast.balance_function import triton_began_balance

    images = [torch.rand(4, 3, 16, 16, requires_grad=True) for _ in range(4)]
    return precompile.precompile(lambda: triton_began_balance(*images, 0.0, 0.5, 0.001).l_d.backward(), 2)

compiles = []
knobs.runtime.jit_cache_hook = lambda **hook: compiles.append(
    (threading.current_thread().name, hook["is_manual_warmup"])
)

def counted(compiled):
    on_pool = sum(thread.startswith("triton-compile") for thread, _ in compiled)
    return {"on_pool": on_pool, "elsewhere": len(compiled) - on_pool}
"""

# Without a GPU: the dry run compiles for sm_90, all on its pool; a second one compiles nothing, as its compiles are
# all in the kernels' in-memory caches, the ones a launch reads; the step's state is as it was, and the optimizer
# state the dry run's updates created is zero (what a first update starts from).
PROBE_COMPILE_FOR_HOPPER = """
with precompile.compiling_for(90):
    step, shape = build_step("cpu", None)
    before = step.snapshot()
    first = step.precompile(shape, 2)
    first_compiles, compiles[:] = counted(compiles), []
    step.precompile(shape, 2)  # again
unchanged = all(torch.equal(t, copy) for t, copy in before["tensors"])
unchanged = unchanged and torch.equal(step.z_gen.get_state(), before["z_gen"])
adam = [v for opt in (step.opt_g, step.opt_d) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
print(json.dumps({"asked": first.compiles, "failed": first.failed, "compiled": first_compiles,
                  "compiled_again": len(compiles), "unchanged": unchanged, "adam_state": len(adam),
                  "adam_state_zero": all(not v.any() for v in adam)}))
"""

# Without a GPU, in bf16 with an empty cache, one compile at a time: a dry run stopped at its end (as by Ctrl-C)
# while its compiles are queued.
PROBE_STOPPED = """
import os

with precompile.compiling_for(90):
    step, shape = build_step("cpu", "bf16")
    asked = len(launches_of(step, shape))

    def stopped():
        step.body(torch.zeros(shape))
        raise KeyboardInterrupt

    try:
        precompile.precompile(stopped, 1)
    except KeyboardInterrupt:
        pass
cache = os.environ["TRITON_CACHE_DIR"]
compiled = [name for _, _, names in os.walk(cache) for name in names if name.endswith(".cubin")]
print(json.dumps({"asked": asked, "compiled": len(compiled)}))
"""

# Without a GPU, in bf16, with the compiles recorded rather than run: the tiles the head start asks for per kernel.
PROBE_TILES = """
from kernels.conv_elu import GPU_CONFIGS

with precompile.compiling_for(90):
    step, shape = build_step("cpu", "bf16")
    launches = launches_of(step, shape)
tiles = {}
for _, jit, _, _, _, tile in launches:
    tiles.setdefault(jit.__name__, set()).add(json.dumps(tile, sort_keys=True))
every = {name: {json.dumps(c.all_kwargs(), sort_keys=True) for c in configs} for name, configs in GPU_CONFIGS.items()}
print(json.dumps({name: sorted(tiles.get(name, ())) == sorted(every[name]) for name in every}))
"""

# Without a GPU, for sm_90, with Triton's default set to no floating-point fusion: the FP fusion each kernel launch
# of the step in bf16 asks for (recorded rather than compiled), and the one BEGAN's balance kernels compile with.
PROBE_FP_FUSION = """
with precompile.compiling_for(90):
    step, shape = build_step("cpu", "bf16")
    asked = {(jit.__name__, kwargs.get("enable_fp_fusion")) for _, jit, _, kwargs, _, _ in launches_of(step, shape)}
compiled = []
knobs.compilation.listener = lambda metadata, **kwargs: compiled.append(metadata["enable_fp_fusion"])
with precompile.compiling_for(90):
    ready_balance()
print(json.dumps({"asked": sorted(asked), "compiled": compiled}))
"""

# On a GPU: where the head start's compiles ran (on CUDA autograd runs backward on threads of its own), and the
# compiles that launches (autotuning's included) still ask for after it, through the whole CUDA graph path (three
# eager warm-up steps, the capture, a replay); the output holds the autotuners' reports.
PROBE_FIRST_STEP_ON_GPU = """
from began_fast.fast_step import CudaGraphStep

step, shape = build_step("cuda", "bf16")
done = step.precompile(shape, 8)
head_start, compiles[:] = counted(compiles), []
graph = CudaGraphStep(step, shape)
graph(torch.rand(shape, device="cuda") * 2 - 1)
torch.cuda.synchronize()
print(json.dumps({"asked": done.compiles, "failed": done.failed, "head_start": head_start,
                  "launch_compiles": len(compiles)}))
"""


# Without a GPU, for sm_90: two processes of one machine ready BEGAN's balance as compile_kernels readies the step,
# taking turns. Each says whether it had the turn; the one that had it waits for a line on stdin before it compiles
# (so that the other has started waiting). Each counts what Triton compiled and what it read from its disk cache.
PROBE_TAKING_TURNS = """
compiled, read = [], []
knobs.compilation.listener = lambda cache_hit, **kwargs: (read if cache_hit else compiled).append(1)
with precompile.compiling_for(90), precompile.CompilerTurn() as turn:
    print(json.dumps({"first": turn.first}), flush=True)
    if turn.first:
        sys.stdin.readline()
    let_go = turn.wait(600) if turn.first is False else None
    done = ready_balance()
print(json.dumps({"first": turn.first, "let_go": let_go, "asked": done.compiles, "failed": done.failed,
                  "compiled": len(compiled), "read": len(read)}))
"""


def probe_command(probe: str, env: dict[str, str] | None = None) -> dict:
    """subprocess keyword arguments that run the probe in a process of its own."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    source = textwrap.dedent(BUILD_STEP) + textwrap.dedent(COUNT_COMPILES) + textwrap.dedent(probe)
    return {"args": [sys.executable, "-c", source], "cwd": ROOT, "env": {**environment, **(env or {})}, "text": True}


def run_probe(probe: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """The probe's JSON line (its last line of output) and its whole output."""
    result = subprocess.run(**probe_command(probe, env), capture_output=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_precompiling_for_hopper_fills_the_caches_the_launches_read_and_leaves_the_step_as_it_was():
    result, _ = run_probe(PROBE_COMPILE_FOR_HOPPER)
    assert result["asked"] > 0 and result["failed"] == 0, result
    assert result["compiled"]["on_pool"] > 0 and result["compiled"]["elsewhere"] == 0, result
    assert result["compiled_again"] == 0, result
    assert result["unchanged"], result
    assert result["adam_state"] > 0 and result["adam_state_zero"], result


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_a_kernel_launched_again_alike_is_compiled_once():
    """A dry run launches each kernel once per layer and step; each specialization (dtypes, alignment, sizes' 1 and
    16-divisibility, constexprs) is compiled once, not once per launch: three balance ops on one shape ask for the
    two forward kernels once each."""
    probe = """
        import json
        from kernels.balance import balance_forward
        from kernels.precompile import compile_only, compiling_for

        calls = []
        x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with compiling_for(90), compile_only(lambda jit, args, kwargs, grid, tile: calls.append(jit.__name__)):
            for _ in range(3):
                balance_forward(x, x.flip(0).contiguous(), x.tanh(), x.sin(), torch.full((), 0.3), 0.5, 0.001)
        print(json.dumps(calls))
    """
    calls, _ = run_probe(probe)
    assert calls == ["_l1_partial_sums_kernel", "_balance_finalize_kernel"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_a_kernel_launched_with_other_launch_options_is_compiled_for_each(tmp_path):
    """num_warps, num_stages and the like are launch options, not parameters: Triton compiles per value. Keyed as a
    parameter's integer (its being 1, a multiple of 16), num_warps 4 and 8 were one compile, and the launch with 8
    then compiled inside the first step."""
    (tmp_path / "tiny_kernel.py").write_text("import triton\n\n@triton.jit\ndef tiny(x_ptr, n):\n    pass\n")
    probe = f"""
        sys.path.insert(0, {str(tmp_path)!r})
        from tiny_kernel import tiny
        from kernels.precompile import CompileOnly, compiling_for

        warps = []
        with compiling_for(90):
            kernel = CompileOnly(tiny, "all", lambda jit, args, kwargs, grid, tile: warps.append(kwargs["num_warps"]))
            for num_warps in (4, 4, 8):
                kernel[(1,)](torch.zeros(4), 4, num_warps=num_warps)
        print(json.dumps(warps))
    """
    assert run_probe(probe)[0] == [4, 8]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_a_failed_compile_is_counted_with_its_error():
    """What the run's line says of a failed compile: how many failed, and the first one's error in one line."""
    probe = """
        def warm_up(device, jit, *launch):
            if jit.__name__ == "_balance_finalize_kernel":
                raise RuntimeError("out of resources: shared memory, Required: 262144\\nHardware limit: 232448")

        precompile._warm_up = warm_up
        with precompile.compiling_for(90):
            done = ready_balance()
        print(json.dumps([done.compiles, done.failed, done.first_failure]))
    """
    compiles, failed, first_failure = run_probe(probe)[0]
    assert compiles > failed > 0 and first_failure == "RuntimeError: out of resources: shared memory, Required: 262144"


def test_the_head_start_compiles_every_tile_autotuning_will_try_in_bf16():
    result, _ = run_probe(PROBE_TILES)
    assert result == dict.fromkeys(("conv_elu_fwd_kernel", "conv_elu_dgrad_kernel", "conv_elu_wgrad_kernel"), True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_every_kernel_compiles_with_fp_fusion_whatever_tritons_default(tmp_path):
    env = {"TRITON_DEFAULT_FP_FUSION": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    result, _ = run_probe(PROBE_FP_FUSION, env)
    names = [name for _, name, _ in kernels.launched_kernels()]
    assert sorted(map(tuple, result["asked"])) == sorted((name, True) for name in names), result["asked"]
    assert result["compiled"] == [True] * 3, result["compiled"]  # the balance's forward two and its backward


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_a_head_start_stopped_drops_the_compiles_not_yet_started(tmp_path):
    result, _ = run_probe(PROBE_STOPPED, {"TRITON_CACHE_DIR": str(tmp_path / "triton")})
    assert result["asked"] > 100 and result["compiled"] <= 2, result  # the one compiling when it stopped, at most two


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probes that launch cover it")
def test_a_process_that_waits_its_turn_reads_every_kernel_from_the_cache_the_first_compiled_into(tmp_path):
    env = {"TRITON_CACHE_DIR": str(tmp_path / "triton")}  # empty: the first process compiles
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    first = subprocess.Popen(**probe_command(PROBE_TAKING_TURNS, env), **pipes)
    second = None
    try:
        assert json.loads(first.stdout.readline()) == {"first": True}
        second = subprocess.Popen(**probe_command(PROBE_TAKING_TURNS, env), **pipes)
        assert json.loads(second.stdout.readline()) == {"first": False}  # and now waiting
        outputs = [process.communicate("go\n", timeout=1200)[0] for process in (first, second)]
    finally:
        for process in filter(None, (first, second)):
            process.kill()
    assert first.returncode == second.returncode == 0
    first, second = (json.loads(output.strip().splitlines()[-1]) for output in outputs)
    assert first["compiled"] == first["asked"] > 0 and first["failed"] == 0, first
    assert second["let_go"] and second["compiled"] == 0 and second["read"] == first["asked"], second


@pytest.mark.cuda
def test_after_the_head_start_the_first_steps_compile_nothing_and_a_second_process_reuses_the_autotuning(tmp_path):
    env = {"TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_PRINT_AUTOTUNING": "1"}
    first, first_output = run_probe(PROBE_FIRST_STEP_ON_GPU, env)
    assert first["asked"] > 0 and first["failed"] == 0, first
    assert first["head_start"]["on_pool"] > 0 and first["head_start"]["elsewhere"] == 0, first  # backward's too
    assert first["launch_compiles"] == 0, first
    assert "Triton autotuning for function" in first_output
    second, second_output = run_probe(PROBE_FIRST_STEP_ON_GPU, env)
    assert second["launch_compiles"] == 0, second
    assert "Triton autotuning for function" not in second_output  # each pick read from the disk cache


@pytest.mark.cuda
def test_a_step_given_the_head_start_follows_the_same_trajectory_bit_for_bit():
    model, cfg = ModelConfig(image_size=32, n=32, h=32, skip=True), TrainConfig(batch_size=8)
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        G, D = Generator(model, impl="triton").cuda(), Discriminator(model, impl="triton").cuda()
        steps.append(FastStep(G, D, cfg, "cuda", amp="bf16", impl="triton"))
    head_started, plain = steps
    head_started.precompile((8, 3, 32, 32), 4)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.rand(8, 3, 32, 32, device="cuda", generator=g) * 2 - 1
        head_started(x)
        plain(x)
    torch.cuda.synchronize()
    for a, b in zip(head_started.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(head_started.k, plain.k)


def train_on_gpu(out):
    model = ModelConfig(image_size=16, n=8, h=8)
    train_cfg = TrainConfig(batch_size=4, steps=2, log_every=1, sample_every=2, checkpoint_every=2)
    data = DataConfig(builtin_count=64, num_workers=0, loader="torch")
    options = RunOptions(out=out, device="cuda", amp="bf16", cuda_graphs=True, quiet=True)
    return train(setup_run(model, train_cfg, data, options))


@pytest.mark.cuda
def test_a_gpu_run_says_how_long_compiling_its_kernels_took(tmp_path, capsys):
    train_on_gpu(tmp_path / "run")
    err = capsys.readouterr().err
    # Or, where another test's process (pytest-xdist) holds the turn, it waited for it.
    said = (
        r"kernels: (compiling the step's Triton kernels|waiting for .+; readying the step) on \d+ CPU threads \.\.\. "
    )
    assert re.search(said + r"\d+ ready in", err), err


class HeadStart:
    """Stands in for FastStep.precompile: records the threads it was given, then returns `result` or raises it."""

    def __init__(self, result):
        self.result, self.threads = result, []

    def __call__(self, batch_shape, threads):
        self.threads.append(threads)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def cpu_run(tmp_path, monkeypatch, head_start, rank=0, reference_step=False):
    """A run's compile_kernels as on a GPU (a CPU step that says it is on one) of a machine with 8 cores, with
    `head_start` for its dry run and a Triton cache folder of its own (where the processes take turns)."""
    model = ModelConfig(image_size=16, n=8, h=8)
    options = RunOptions(out=tmp_path / "run", impl="torch", reference_step=reference_step)
    run = setup_run(model, TrainConfig(batch_size=4), DataConfig(), options)
    monkeypatch.setattr(run.step, "precompile", head_start)
    monkeypatch.setattr(ops, "resolve_impl", lambda impl, device: "triton")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    run.step.device = torch.device("cuda")
    run.step.rank = rank
    return run


@pytest.mark.parametrize(
    "result, said",
    [
        (Precompiled(135, 0, 21.04), " 135 ready in 21.0 s\n"),
        (
            Precompiled(135, 2, 3.0, "CompilationError: at 12:4: out of resources"),
            " 133 of 135 ready in 3.0 s; 2 failed, left to the first step (the first: CompilationError: at 12:4: out "
            "of resources)\n",
        ),
        (
            AttributeError("module 'triton' has no attribute 'AsyncCompileMode'\nsecond line"),
            " stopped (AttributeError: module 'triton' has no attribute 'AsyncCompileMode'); the first step compiles "
            "them instead\n",
        ),
    ],
    ids=["compiled", "some-failed", "stopped"],
)
def test_the_first_process_of_a_machine_compiles_ahead_on_all_its_cores_and_says_how_it_went(
    tmp_path, monkeypatch, capsys, result, said
):
    head_start = HeadStart(result)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this machine, the other not yet compiling
    compile_kernels(cpu_run(tmp_path, monkeypatch, head_start))
    assert head_start.threads == [8]
    assert capsys.readouterr().err == "  kernels: compiling the step's Triton kernels on 8 CPU threads ..." + said
    with CompilerTurn(tmp_path / "triton") as turn:
        assert turn.first  # let go, however the head start went


@pytest.mark.parametrize("case", ["let-go", "still-compiling", "no-shared-lock"])
def test_a_process_whose_machine_compiles_elsewhere_waits_for_it_then_readies_on_its_share(
    tmp_path, monkeypatch, capsys, case
):
    head_start = HeadStart(Precompiled(135, 0, 1.04))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 4 of the 8 cores each
    monkeypatch.setattr(train_module, "COMPILER_WAIT_S", 0.5 if case == "still-compiling" else 60.0)
    run = cpu_run(tmp_path, monkeypatch, head_start)
    with CompilerTurn(tmp_path / "triton") as other:  # another rank of the machine, compiling
        assert other.first
        if case == "let-go":
            threading.Timer(1.0, other.__exit__).start()
        if case == "no-shared-lock":  # NFS refuses a shared lock on a file not open for reading (EBADF)
            monkeypatch.setattr(fcntl, "flock", refusing_shared_locks(fcntl.flock))
        compile_kernels(run)
    assert head_start.threads == [4]
    err = capsys.readouterr().err
    said = re.fullmatch(
        r"  kernels: waiting for another process to compile Triton kernels into the cache \.\.\. (.+) s; readying "
        r"the step on 4 CPU threads \.\.\. 135 ready in 1\.0 s\n",
        err,
    )
    assert said, err
    if case == "let-go":
        assert 0.5 <= float(said[1]) < 60.0, said[1]  # timed from after the Timer started: up to its start early
    else:  # the limit, or at once where the lock stops answering
        least = 0.5 if case == "still-compiling" else 0.0
        assert said[1].startswith("went on after ") and least <= float(said[1].split()[-1]) < 60.0, said[1]


def refusing_shared_locks(flock):
    def flock_or_refuse(file, operation):
        if operation & fcntl.LOCK_SH:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(file, operation)

    return flock_or_refuse


def test_only_rank_0_says_it_and_a_cpu_run_or_one_told_not_to_takes_no_head_start(tmp_path, monkeypatch, capsys):
    head_start = HeadStart(Precompiled(135, 0, 1.0))
    compile_kernels(cpu_run(tmp_path / "rank1", monkeypatch, head_start, rank=1))
    assert head_start.threads == [8] and capsys.readouterr().err == ""
    run = cpu_run(tmp_path / "cpu", monkeypatch, head_start)
    run.step.device = torch.device("cpu")
    compile_kernels(run)
    monkeypatch.setenv("BEGAN_FAST_PRECOMPILE", "0")
    compile_kernels(cpu_run(tmp_path / "told", monkeypatch, head_start))
    assert head_start.threads == [8] and capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["false", "no", "off", "00", " 0"])
def test_a_precompile_setting_other_than_0_or_1_is_refused_before_any_work(tmp_path, monkeypatch, value):
    """Only 0 turns the head start off: "false" or "no" would have been taken as on, without a word."""
    monkeypatch.setenv("BEGAN_FAST_PRECOMPILE", value)
    message = "BEGAN_FAST_PRECOMPILE must be 0 (no head start: the first step compiles the kernels) or 1 (the default)"
    message += f", got {value!r}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RunOptions(out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for accepted in ("0", "1", ""):
        monkeypatch.setenv("BEGAN_FAST_PRECOMPILE", accepted)
        RunOptions(out=tmp_path / "run")


def test_a_reference_step_on_the_triton_layers_takes_the_head_start_too(tmp_path, monkeypatch, capsys):
    head_start = HeadStart(Precompiled(40, 0, 2.0))
    compile_kernels(cpu_run(tmp_path, monkeypatch, head_start, reference_step=True))
    assert head_start.threads == [8]
    assert (
        capsys.readouterr().err
        == "  kernels: compiling the step's Triton kernels on 8 CPU threads ... 40 ready in 2.0 s\n"
    )


class RecordingCollectives:
    """Stands in for a torchrun job's collectives: records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append(name)


@pytest.mark.parametrize("kind", [FastStep, ReferenceStep], ids=["fast", "reference"])
def test_the_dry_run_runs_without_the_collectives_and_the_steps_after_it_are_the_steps_without_it(monkeypatch, kind):
    """Each rank's dry run is its own: one that stops on one rank must not leave the ranks' all-reduces out of step.
    (On PyTorch's layers, with the dry run run as it is, so that its effects are real and must be undone: the steps
    after it must be those without it, bit for bit, Adam's first update included.)"""
    import kernels.precompile

    model, steps = ModelConfig(image_size=16, n=8, h=8), []
    for _ in range(2):
        torch.manual_seed(0)
        steps.append(kind(Generator(model, impl="torch"), Discriminator(model, impl="torch"), TrainConfig(4), "cpu"))
        steps[-1].k.fill_(0.05)  # a k_t the dry run's update changes (from 0 it may stay clipped at 0)
    head_started, plain = steps
    collectives = head_started.collectives = RecordingCollectives()
    monkeypatch.setattr(kernels.precompile, "precompile", lambda work, threads: (work(), Precompiled(0, 0, 0.0))[1])
    before = head_started.snapshot()
    head_started.precompile((4, 3, 16, 16), 2)
    assert collectives.calls == [] and head_started.collectives is collectives
    assert all(torch.equal(t, copy) for t, copy in before["tensors"]) and head_started.steps_done == 0
    head_started.collectives = None  # one process from here on
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(4, 3, 16, 16, generator=data) * 2 - 1
        head_started(x)
        plain(x)
    for step in steps:
        step.weights = [*step.D.parameters(), *step.G.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(head_started.weights, plain.weights, strict=True))
    assert torch.equal(head_started.k, plain.k) and head_started.steps_done == plain.steps_done == 3
    # The rest a checkpoint saves (Adam, the lr decay's window, the noise stream) and the running statistics.
    assert same(head_started.state_dict(), plain.state_dict())
    assert torch.equal(head_started.stats.sums, plain.stats.sums) and head_started.stats.count.item() == 3


def same(a, b) -> bool:
    """Whether two state dicts (nested dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def test_the_first_process_takes_the_turn_to_compile_and_the_others_wait_until_it_lets_go(tmp_path):
    with CompilerTurn(tmp_path) as first, CompilerTurn(tmp_path) as second:
        assert first.first is True and second.first is False
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(second.wait(60)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # blocked while the first compiles
        first.__exit__(None, None, None)
        waiter.join(30)
        assert waited == [True]
    with CompilerTurn(tmp_path) as later:
        assert later.first is True  # both let go


def test_a_waiter_gives_up_after_its_limit(tmp_path):
    with CompilerTurn(tmp_path) as first, CompilerTurn(tmp_path) as second:
        assert first.first
        start, waited = time.monotonic(), []
        waiter = threading.Thread(target=lambda: waited.append(second.wait(0.3)), daemon=True)
        waiter.start()
        waiter.join(30)
        assert waited == [False] and time.monotonic() - start >= 0.3


def test_a_turn_held_by_a_process_that_was_killed_is_let_go(tmp_path):
    code = "import sys, time; from kernels.precompile import CompilerTurn\n"
    code += f"with CompilerTurn({str(tmp_path)!r}) as turn:\n    print(turn.first, flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with CompilerTurn(tmp_path) as waiter:
            assert waiter.first is False
            holder.kill()  # SIGKILL: no __exit__ runs
            holder.wait(30)
            assert waiter.wait(30)
        with CompilerTurn(tmp_path) as later:
            assert later.first is True
    finally:
        holder.kill()
        holder.stdout.close()


def no_locks(file, operation):
    raise OSError(errno.ENOLCK, "No locks available")


def test_where_the_cache_cannot_be_locked_no_process_has_the_turn(tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    with CompilerTurn(tmp_path / "a file") as turn:  # the cache folder cannot be made
        assert turn.first is None
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with CompilerTurn(tmp_path / "triton") as turn:
        assert turn.first is None


def test_where_the_cache_cannot_be_locked_each_process_compiles_on_its_share(tmp_path, monkeypatch, capsys):
    head_start = HeadStart(Precompiled(135, 0, 1.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    compile_kernels(cpu_run(tmp_path, monkeypatch, head_start))
    assert head_start.threads == [4]
    assert (
        capsys.readouterr().err
        == "  kernels: compiling the step's Triton kernels on 4 CPU threads ... 135 ready in 1.0 s\n"
    )
