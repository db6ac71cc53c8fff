"""The kernels compile for Hopper (sm_90), checked without a GPU by scripts/check_kernels_compile.py.

The interpreter lane checks what the kernels compute; these tests check that Triton's compiler accepts every
specialization a training step launches and that each fits the GPU's shared memory. Each runs the script in a
subprocess without TRITON_INTERPRET (the test process's kernels are interpreted), except the last three, which call
its outcome lines, its step builder and its main in-process and compile nothing. Where a GPU is present, the
compiled test suite covers this, so they are skipped there.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_kernels_compile.py"
KERNELS = (
    "conv_elu_fwd_kernel",
    "conv_elu_dgrad_kernel",
    "conv_elu_wgrad_kernel",
    "_l1_partial_sums_kernel",
    "_balance_finalize_kernel",
    "_l1_grad_kernel",
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled tests on this GPU cover it")


def run(args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )


def test_every_kernel_a_paper64_step_launches_compiles_for_hopper():
    """paper64 with and without the skip connections, in float32 and bf16: each kernel, the up-sampling, strided and
    skip variants, the weight gradient with and without the per-sample scale. fp16 is left to gpu_checks.sh's
    compile phase (a third of this check's minutes): its step launches bf16's specializations in float16 (below)."""
    result = run([SCRIPT, "--preset", "paper64", "--skip", "--amp", "none", "bf16", "--jobs", "2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1].endswith(": 0 failed"), lines[-1]
    compiled = [line for line in lines if line.startswith("ok ")]
    for kernel in KERNELS:
        # The balance's finalize reads only the float32 partial sums; every other kernel reads the activations.
        for dtype in ("float32",) if kernel == "_balance_finalize_kernel" else ("float32", "bfloat16"):
            assert any(f" {kernel} [{dtype}" in line for line in compiled), (kernel, dtype)
    for variant in ("STRIDE=2", "UP=2", "PRECISION=ieee", "HAS_SCALE=True", "HAS_SCALE=False"):
        assert any(variant in line for line in compiled), variant


def test_an_fp16_step_launches_the_bf16_steps_specializations_in_float16(tmp_path):
    """What lets the check above leave fp16 out: with and without skips, the fp16 step of paper64 launches the same
    kernels, with the same constexprs, tiles and specializations (alignment, integers that are 1 or multiples of 16),
    as the bf16 step, but for float16 in place of bfloat16. Recorded by the check's own stand-in, compiling nothing."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            f"""
            import sys
            import torch
            sys.path.insert(0, {str(SCRIPT.parent)!r})
            import check_kernels_compile as check
            from kernels import precompile

            def launched(skip, amp):
                keys = set()
                def record(jit, args, kwargs, grid, tile):
                    constexprs = {{param.name for param in jit.params if param.is_constexpr}}
                    named = {{**dict(zip(jit.arg_names, args)), **kwargs}}
                    spec = sorted(
                        (name, repr(value if name in constexprs else precompile._specialization(value)))
                        for name, value in named.items()
                    )
                    keys.add(repr((jit.__name__, spec, sorted(tile.items()))))
                with precompile.compiling_for(90), precompile.compile_only(record, "smallest"):
                    check.run_one_step("paper64", skip, amp)
                return keys

            for skip in (False, True):
                bf16, fp16 = launched(skip, "bf16"), launched(skip, "fp16")
                as_bf16 = {{key.replace("torch.float16", "torch.bfloat16") for key in fp16}}
                print(skip, len(bf16), sum("torch.float16" in key for key in fp16), len(as_bf16 ^ bf16))
            """
        )
    )
    result = run([probe])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for line in result.stdout.splitlines():
        skip, launched, in_float16, differing = line.split()
        assert int(launched) >= 30 and int(in_float16) >= 20, line  # the conv kernels' three passes, in float16
        assert differing == "0", f"skip={skip}: {differing} fp16 specializations are not bf16's in float16"
    assert len(result.stdout.splitlines()) == 2, result.stdout


def test_a_compile_error_and_a_tile_too_big_for_shared_memory_fail_the_check(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            f"""
            import sys
            import torch
            import triton
            import triton.language as tl
            sys.path.insert(0, {str(SCRIPT.parent)!r})
            import check_kernels_compile as check
            from kernels.precompile import CompileOnly

            @triton.jit
            def tiny_dot_kernel(x_ptr, BLOCK: tl.constexpr):
                # Compiled, tl.dot needs K >= 16; the interpreter takes any size.
                offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
                a = tl.load(x_ptr + offs)
                tl.store(x_ptr + offs, tl.dot(a, a))

            @triton.jit
            def huge_tile_kernel(x_ptr, BLOCK: tl.constexpr):
                # Two 256 x 256 bf16 operands staged in shared memory: 256 KiB, more than a Hopper block has.
                offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
                a = tl.load(x_ptr + offs)
                b = tl.load(x_ptr + BLOCK * BLOCK + offs)
                tl.store(x_ptr + offs, tl.dot(a, b).to(tl.bfloat16))

            compiles, ended = [], []
            x = torch.empty(2 * 256 * 256, dtype=torch.bfloat16)
            with check.compile_only(90, "smallest", 2, compiles, ended=ended.append) as submit:
                CompileOnly(tiny_dot_kernel, "smallest", submit)[(1,)](x, BLOCK=8)
                CompileOnly(huge_tile_kernel, "smallest", submit)[(1,)](x, BLOCK=256)
            print("ended", sorted(c.kernel for c in ended))  # each passed on as it ended, the failed one too
            outcomes = [check.outcome(c, 90) for c in ended]  # the lines main prints as each compile ends
            print("\\n".join(line for _, line in outcomes))
            sys.exit(sum(failed for failed, _ in outcomes))
            """
        )
    )
    result = run([probe])
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "FAILED  tiny_dot_kernel [bfloat16 BLOCK=8]: CompilationError: " in result.stdout
    assert "K >= 16" in result.stdout
    assert "FAILED  huge_tile_kernel [bfloat16 BLOCK=256]: needs 262144 B of shared memory per block" in result.stdout
    assert "ended ['huge_tile_kernel', 'tiny_dot_kernel']" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    result = run([SCRIPT, "--preset", "demo"], interpret=True)
    assert result.returncode == 2
    assert "TRITON_INTERPRET=1 is set: unset it" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_refuses_fewer_than_one_job_in_one_line(jobs):
    """--jobs 0 ended in ThreadPoolExecutor's ValueError traceback ("max_workers must be greater than 0")."""
    result = run([SCRIPT, "--preset", "demo", "--jobs", jobs])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (
        f"error: --jobs must be >= 1 (compiling threads), got {jobs} (see check_kernels_compile.py --help)\n"
    ), result.stderr


def test_a_kernel_using_exactly_the_shared_memory_an_architecture_allows_passes():
    """The architecture's maximum is one block's opt-in limit, which a kernel may use whole: one byte more fails."""
    check = load_script("check_kernels_compile")
    compiles = []
    for arch, limit in check.MAX_SHARED_BYTES.items():
        for shared in (limit, limit + 1):
            done = Future()
            done.set_result((SimpleNamespace(metadata=SimpleNamespace(shared=shared)), 0.1))
            compiles.append((arch, check.Compile(f"k{shared}_kernel", "float32", "", done)))
    for arch in check.MAX_SHARED_BYTES:
        assert [check.outcome(c, arch)[0] for a, c in compiles if a == arch] == [False, True]


def test_the_skip_variant_builds_the_networks_with_skip_connections():
    """--skip compiles the kernels of the paper's skip connections: its step's G and D have them, the plain one's
    none."""
    check = load_script("check_kernels_compile")
    for skip in (False, True):
        step, shape = check.preset_step("demo", skip, None)
        assert step.G.decoder.skip is skip and step.D.decoder.skip is skip
        assert shape[1:] == (3, step.G.cfg.image_size, step.G.cfg.image_size)


@pytest.mark.parametrize("failing", [False, True], ids=["all-ok", "one-failed"])
def test_main_steps_through_every_preset_skip_and_amp_and_fails_with_a_compile(monkeypatch, capsys, failing):
    """main runs one step per preset, skip variant (--skip: without, then with) and precision, and ends with
    status 1 when a compile failed, 0 when none did (compile_only and the step stubbed: nothing is compiled)."""
    check = load_script("check_kernels_compile")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    steps = []
    monkeypatch.setattr(check, "run_one_step", lambda preset, skip, amp: steps.append((preset, skip, amp)))
    result = Future()
    if failing:
        result.set_exception(RuntimeError("ptxas died"))
    else:
        result.set_result((SimpleNamespace(metadata=SimpleNamespace(shared=0)), 0.1))

    @contextlib.contextmanager
    def one_compile(arch, configs, jobs, compiles, ended):
        compiles.append(check.Compile("some_kernel", "float32", "", result))
        ended(compiles[-1])
        yield None

    monkeypatch.setattr(check, "compile_only", one_compile)
    rc = check.main(["--preset", "demo", "--skip", "--amp", "none", "bf16", "--jobs", "1"])
    assert steps == [("demo", False, None), ("demo", False, "bf16"), ("demo", True, None), ("demo", True, "bf16")]
    assert rc == (1 if failing else 0)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("FAILED  some_kernel [float32]" if failing else "ok      some_kernel [float32]"), said
    assert len(said) == 2 and said[-1].endswith(f": {int(failing)} failed"), said  # each compile's line once
