"""What the scripts share (began_fast/cli.py): the --device flag and one-line error messages."""

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import weakref
from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image
from tqdm import tqdm

from began_fast.cli import (
    Interrupted,
    OneLineParser,
    check_one_process,
    check_seed,
    check_stop,
    check_writable,
    data_path,
    one_line,
    output_path,
    resolve_device,
    say_line,
    say_line_in_a_handler,
    stop_signals,
    stop_signals_held,
)
from began_fast.config import ConfigError
from began_fast.data import DataError
from began_fast.data.builtin import draw_faces
from began_fast.train import RunOptions
from tests.scripts import ROOT, load_script


def test_a_signal_handlers_line_never_raises_into_the_code_it_interrupted(monkeypatch, tmp_path):
    """A handler runs between two bytecodes of the code it interrupts, which may hold stderr's buffer (a progress bar
    blocked on a full pipe): a write there raises "reentrant call" (a review helper reproduced it), and that error
    would end the training loop at a random point. The line goes straight to the descriptor, or is left out."""

    class HeldStream:
        def fileno(self):
            raise io.UnsupportedOperation("fileno")

        def write(self, text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    monkeypatch.setattr(sys, "stderr", HeldStream())
    say_line_in_a_handler("stopping", below_a_bar=False)  # no error
    with open(tmp_path / "err", "wb") as file:

        class Descriptor(HeldStream):
            def fileno(self):
                return file.fileno()

        monkeypatch.setattr(sys, "stderr", Descriptor())
        say_line_in_a_handler("stopping", below_a_bar=True)  # past the held stream, to its descriptor
    assert (tmp_path / "err").read_bytes() == b"\nstopping\n"
    monkeypatch.setattr(sys, "stderr", type("Closed", (HeldStream,), {"fileno": lambda self: 10**6})())
    say_line_in_a_handler("stopping", below_a_bar=False)  # EBADF: left out


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("mps", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match=f"--device must be cpu, cuda or cuda:N, got '{bad}'"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="PyTorch sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device cpu:1: the CPU is one device; give --device cpu"):
        resolve_device("cpu:1")
    # cpu:0 names the CPU, with no GPU (it was checked against the number of GPUs) and with one.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("cpu:0") == "cpu"
    # A GPU index past the last (on a machine with one GPU, as PyTorch sees it).
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device(None) == "cuda"
    with pytest.raises(ConfigError, match=r"^--device cuda:1: this machine has 1 GPU\(s\)$"):
        resolve_device("cuda:1")
    # On a machine with two, cuda:1 is made the current device (Triton's kernels and CUDA graphs run on the current
    # device, not the tensors'); plain cuda leaves the current one (GPU 0, or torchrun's LOCAL_RANK) as it is.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    assert made_current == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_one_line_unwraps_an_error_from_a_dataloader_worker():
    """The message of an error raised in a worker, as torch.utils.data re-raises it in the main process."""
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "worker.py", line 349, in _worker_loop\n    data = fetcher.fetch(index)\n'
        "began_fast.data.errors.DataError: all 3 images under x could not be decoded\n"
    )
    assert one_line(wrapped) == "all 3 images under x could not be decoded"
    wrapped = DataError("Caught DataError in DataLoader worker process 1.\nTraceback ...\nDataError: gone\n")
    assert one_line(wrapped) == "gone"
    # Re-raised as another type (PyTorch could not rebuild the worker's): the original type stays in the line.
    wrapped = RuntimeError("Caught OSError in DataLoader worker process 0.\nTraceback ...\nOSError: [Errno 5] I/O")
    assert one_line(wrapped) == "OSError: [Errno 5] I/O"
    assert one_line(OSError(17, "File exists", "runs/x")) == "[Errno 17] File exists: 'runs/x'"
    assert one_line(ValueError("two\nlines")) == "two lines"
    assert one_line(KeyError()) == "KeyError"


def test_check_writable_tries_a_write_before_any_work(tmp_path):
    """A folder that exists but takes no files (read-only; /proc even for root) is refused up front, naming the flag,
    not after the hour of work that would write into it."""
    with pytest.raises(ConfigError, match=r"^--out /proc: cannot write into /proc \("):
        check_writable(Path("/proc"), "--out", folder=True)
    with pytest.raises(ConfigError, match=r"^--json /proc/results.json: cannot write into /proc \("):
        check_writable(Path("/proc/results.json"), "--json")
    check_writable(tmp_path / "new" / "results.json", "--json")
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # the probe leaves nothing


def test_check_writable_takes_a_file_to_replace_and_refuses_a_file_where_a_folder_is_needed(tmp_path):
    """An existing output file is one to replace (an earlier --json); a file given as a folder, or standing where a
    folder of the path should be, is refused naming the flag."""
    earlier = tmp_path / "results.json"
    earlier.write_bytes(os.urandom(16))
    check_writable(earlier, "--json")
    with pytest.raises(ConfigError, match=f"^--out {earlier} is a file; expected a folder$"):
        check_writable(earlier, "--out", folder=True)
    with pytest.raises(ConfigError, match=f"^--json {earlier}/x.json: {earlier} is a file, not a folder$"):
        check_writable(earlier / "x.json", "--json")
    with pytest.raises(ConfigError, match=f"^--json {tmp_path} is a folder; expected a file name$"):
        check_writable(tmp_path, "--json")


def test_output_path_and_seed_checks_refuse_what_would_misfire():
    """An --out of spaces (an unset variable between quotes) names no folder; a seed must be in [0, 2**63 - 1)."""
    for empty in ("", "  ", "\t"):
        with pytest.raises(argparse.ArgumentTypeError, match="is empty"):
            output_path(empty)
    assert output_path(" runs/x") == Path(" runs/x")
    for seed in (0, 2**63 - 2):
        check_seed(seed)
    for seed in (-1, 2**63 - 1):
        with pytest.raises(ConfigError, match=rf"^--seed must be in \[0, 2\*\*63 - 1\), got {seed}$"):
            check_seed(seed)


def test_say_line_comes_after_what_was_printed_before_it(tmp_path, monkeypatch):
    """say_line writes its line to stderr's file descriptor in one write, after what print() left in stderr's buffer
    (a line said in part, as rank 0's "kernels: compiling ..." is until it is done): never before it."""
    words = [f"{n:x}" for n in torch.randint(0, 2**31, (2,)).tolist()]
    stderr = open(tmp_path / "stderr.txt", "w")  # buffered, with a file descriptor, as a redirected stderr
    with stderr, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", stderr)
        print(f"  kernels: {words[0]} ...", end="", file=sys.stderr)
        say_line(f"error: {words[1]}")
    assert (tmp_path / "stderr.txt").read_text() == f"  kernels: {words[0]} ...error: {words[1]}\n"


def test_say_line_clears_a_progress_bar_on_stderr_and_draws_it_again(tmp_path, monkeypatch):
    """A warning or a stop line said while the training's progress bar is on stderr starts a line of its own, as a
    terminal shows it (after the line's last carriage return), and the bar is drawn again after it; before, it
    followed the bar's text on the bar's line."""
    stderr = open(tmp_path / "stderr.txt", "w")
    with stderr, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", stderr)
        bar = tqdm(total=10, file=sys.stderr, mininterval=0, ncols=60)
        bar.update(3)
        say_line("warning: skipped 1 image file")
        bar.close()
    shown = [line.rsplit("\r", 1)[-1] for line in (tmp_path / "stderr.txt").read_text().split("\n")]
    assert "warning: skipped 1 image file" in shown, shown
    after = [line for line in shown[shown.index("warning: skipped 1 image file") + 1 :] if line.strip()]
    assert after and "3/10" in after[0], shown  # drawn again where it was


def test_data_path_is_absolute_so_a_run_resumes_from_any_folder(tmp_path, monkeypatch):
    """--data is saved in the run's config: a relative path would name another folder when the resume runs elsewhere."""
    (tmp_path / "faces").mkdir()
    monkeypatch.chdir(tmp_path)
    assert data_path("faces/../faces") == str(tmp_path.resolve() / "faces") and data_path(None) is None
    with pytest.raises(ConfigError, match="--data is empty"):
        data_path("  ")


def test_a_stop_signal_that_a_finalizer_dropped_is_raised_again_by_check_stop(monkeypatch, sigterm_recorded):
    """Python drops an exception raised in a finalizer (h5py's and PIL's objects free themselves in them), so a
    Ctrl-C or SIGTERM that landed there was lost and the script went on to exit 0: stop_signals remembers it for
    check_stop, without printing the dropped exception's traceback."""

    class Held:
        pass

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    with stop_signals():
        check_stop()  # none yet
        held = Held()
        weakref.finalize(held, signal.raise_signal, signal.SIGTERM)
        del held  # the finalizer runs here, and the handler's Interrupted is dropped
        held = Held()
        weakref.finalize(held, signal.raise_signal, signal.SIGINT)
        del held  # a second one, dropped too: the first is the one to stop on
        with pytest.raises(Interrupted) as stopped:
            check_stop()
    assert (stopped.value.status, stopped.value.what) == (143, "stopped by SIGTERM")
    assert dropped == [] and sigterm_recorded == []
    assert sys.unraisablehook == dropped.append  # the hook before stop_signals is back
    check_stop()  # outside stop_signals: nothing to raise


def test_a_stop_signal_held_through_a_block_is_raised_after_it_and_the_next_stops_at_once(sigterm_recorded):
    """stop_signals_held (an earlier output going out and the new one in, a pool ending) raises a signal that came
    during its block once the block is done, and puts stop_signals' handlers back: a signal after it (prepare_celeba's
    rename of the finished file, with its fsync of gigabytes) stops the script at once, not added to a list no one
    reads any more, where the script finished and exited 0."""
    done = []
    with stop_signals():
        with pytest.raises(Interrupted) as stopped:
            with stop_signals_held():
                signal.raise_signal(signal.SIGTERM)
                done.append("the whole block")
        assert done == ["the whole block"] and stopped.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as again:  # remembered, should the first be dropped (a finalizer's block)
            check_stop()
        assert again.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as stopped:
            signal.raise_signal(signal.SIGINT)
        assert stopped.value.signum == signal.SIGINT
    assert sigterm_recorded == []


@pytest.mark.parametrize(
    "script", ["train", "evaluate", "sample", "compare_runs", "prepare_celeba", "profile_step", "bench_report"]
)
def test_a_ctrl_c_while_a_script_imports_torch_is_one_line(tmp_path, script):
    """torch takes seconds to import, the moment a user sees a wrong flag and presses Ctrl-C: that ended in a
    traceback through the import machinery. A stand-in torch, first on the path, gets the Ctrl-C mid-import."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "error: interrupted while starting\n")


@pytest.mark.parametrize(
    "script, argv, said",
    [
        ("profile_step", ["--batch", "0"], "--batch must be at least 1, got 0"),
        ("profile_step", ["--preset", "paper32"], "argument --preset: invalid choice: 'paper32'"),
        ("check_kernels_compile", ["--jobs", "0"], "--jobs must be >= 1 (compiling threads), got 0"),
        ("check_kernels_compile", ["--arch", "70"], "argument --arch: invalid choice: 70"),
    ],
)
def test_the_gpu_scripts_refuse_a_bad_flag_in_one_line(capsys, script, argv, said):
    """profile_step.py and check_kernels_compile.py printed argparse's whole usage text (three to five lines) before
    their error, as no other script does: one `error:` line and status 2, as the others."""
    with pytest.raises(SystemExit) as ended:
        load_script(script).main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith(f"error: {said}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "script, argv, argument",
    [
        ("evaluate", [""], "checkpoint"),
        ("sample", [" "], "checkpoint"),
        ("compare_runs", ["runs/a", ""], "run_b"),
        ("prepare_celeba", ["", "out.h5"], "src"),
    ],
)
def test_an_empty_path_to_read_is_refused_as_empty(tmp_path, monkeypatch, capsys, script, argv, argument):
    """An unset shell variable as the path to read was taken for the working directory: '. is a folder without a
    latest.pt', '. is not a run folder', 'data path  does not exist'. Refused as empty, as the outputs are."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        load_script(script).main(argv)
    err = capsys.readouterr().err
    said = f"error: argument {argument}: is empty (an unset shell variable?); give a path (see "
    assert ended.value.code == 2 and err.startswith(said) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1e-4", "-1.5E+2", "-.5e1", "-3.e0"])
def test_a_negative_number_in_scientific_notation_is_a_flags_value(capsys, value):
    """argparse reads `-1e-4` as a flag and says that --lr's argument is missing; the parser reads it as --lr's
    value, which train.py then refuses for what it is. A negative number after `--` stays a positional argument."""
    parser = OneLineParser(prog="train.py")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("rest", nargs="*")
    assert parser.parse_args(["--lr", value]).lr == float(value)
    assert parser.parse_args(["--quiet", "--", value]).rest == [value]
    # A flag that takes no value, and an abbreviation, keep argparse's messages: no "=" the user did not type.
    kept = [(["--quiet", value], f"unrecognized arguments: {value} "), (["--l", value], "--lr: expected one argument")]
    for argv, said in kept:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert said in capsys.readouterr().err


def test_train_refuses_a_negative_lr_in_scientific_notation_for_what_it_is():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--lr", "-1e-4", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr == "error: --lr must be a finite number > 0, got -0.0001\n"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("evaluate", ["{tmp}/run"]),
        ("sample", ["{tmp}/run", "--out", "{tmp}/drawn"]),
        ("prepare_celeba", ["{tmp}/faces", "{tmp}/faces.h5"]),
        ("profile_step", ["--out", "{tmp}/profile"]),
    ],
)
def test_the_one_process_scripts_refuse_to_run_as_several_under_torchrun(tmp_path, monkeypatch, capsys, script, argv):
    """Launched by torchrun as 2 processes, evaluate.py printed its table twice and both wrote the --json, and one
    of two sample.py calls failed on the other's folder (torchrun then exited 1, the pictures written): each refuses
    in one line before it does anything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert load_script(script).main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert capsys.readouterr().err == (
        f"error: {script}.py runs in one process, and torchrun started 2 (WORLD_SIZE): start it with python; only "
        "train.py trains across processes\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_torchrun_of_one_process_runs_the_one_process_scripts():
    """`torchrun --nproc-per-node 1` (WORLD_SIZE 1) is one process: the check lets it through; an environment that
    is not a number is said as train.py says it."""
    for text in ("1", "01", None):
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("WORLD_SIZE", raising=False) if text is None else patch.setenv("WORLD_SIZE", text)
            check_one_process("evaluate.py")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ConfigError) as refused:
        patch.setenv("WORLD_SIZE", "")
        check_one_process("evaluate.py")
    assert str(refused.value) == "environment variable WORLD_SIZE must be a non-negative integer, got ''"


@pytest.mark.parametrize("script", ["gpu_checks", "quality_run"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_the_shell_scripts_help_prints_their_usage_and_runs_nothing(tmp_path, script, flag):
    """`bash scripts/gpu_checks.sh --help` took --help for OUT_DIR: mkdir printed its own help, tee refused every
    log name as an option, and on a GPU machine every phase ran (hours); quality_run.sh started both training runs.
    A stand-in python, first on the path (and PYTHON for quality_run.sh), records any run."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "ran"}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(stub)}
    work = tmp_path / "work"
    work.mkdir()
    command = ["bash", str(ROOT / "scripts" / f"{script}.sh")]
    done = subprocess.run([*command, flag], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"bash scripts/{script}.sh" in done.stdout and not done.stderr, done
    assert not (tmp_path / "ran").exists() and not list(work.iterdir())
    done = subprocess.run([*command, "--out", "x"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout.startswith(f"usage: bash scripts/{script}.sh"), done
    assert not (tmp_path / "ran").exists() and not list(work.iterdir())


@pytest.mark.parametrize("argv", [[], [""]], ids=["none", "empty"])
def test_gpu_checks_without_an_out_dir_prints_its_usage_and_status_2(tmp_path, argv):
    """`bash scripts/gpu_checks.sh` with no OUT_DIR (or an empty one, an unset variable) said "scripts/gpu_checks.sh:
    line 60: 1: usage: ..." and exited 1, the status of a failed check: its usage line and 2, as for a bad option."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    usage = "usage: bash scripts/gpu_checks.sh OUT_DIR [PHASE...] (--help lists the phases)\n"
    assert (done.returncode, done.stdout, done.stderr) == (2, usage, ""), done
    assert not list(tmp_path.iterdir())


def test_gpu_checks_refuses_an_unknown_phase_before_running_any(tmp_path):
    """Every phase named is checked before the first runs: a typo in the last one ended the script only when it came
    to it, hours in on a GPU machine. Valid names, the default list included, go on to the checks (a stand-in python,
    first on the path, records that they started)."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "ran"}\nexit 1\n')  # "no GPU": the script stops there
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(tmp_path / "out")]
    mistyped = [*command, "compile", "quality", "qualty"]
    done = subprocess.run(mistyped, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout.startswith("unknown phase qualty (one of: compile tests "), done
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
    for phases in (["bench", "startup_pair", "tests_cuda"], []):
        done = subprocess.run([*command, *phases], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "unknown phase" not in done.stdout, done
        assert "torch.cuda.is_available()" in (tmp_path / "ran").read_text()
        (tmp_path / "ran").unlink()


def stand_in_gpu(tmp_path, on_out: str, before: str = "") -> dict:
    """The environment of a gpu_checks.sh run on a stand-in GPU: a python and an nvidia-smi first on the path; the
    python runs `before` (sh) on its arguments, then `on_out` with "$2" the folder after each --out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = f'#!/bin/sh\n{before}while [ $# -gt 0 ]; do\n    if [ "$1" = --out ]; then {on_out}; fi\n    shift\ndone\n'
    (bin_dir / "python").write_text(python)
    # Its compute processes are STAND_IN_APPS's, none when unset (and when STAND_IN_APPS_FAIL is set, it fails to list
    # them); its utilization is STAND_IN_UTILIZATION, 0 when unset, or, when that names a file, the file's first
    # line, taken from it.
    smi = '#!/bin/sh\ncase "$*" in\n*query-compute-apps*)\n'
    smi += '    [ -z "$STAND_IN_APPS_FAIL" ] || { echo "$STAND_IN_APPS_FAIL"; exit 9; }\n'
    smi += '    [ -z "$STAND_IN_APPS" ] || echo "$STAND_IN_APPS" ;;\n'
    smi += '*utilization.gpu*) if [ -f "$STAND_IN_UTILIZATION" ]; then\n'
    smi += '    head -n 1 "$STAND_IN_UTILIZATION"; sed -i 1d "$STAND_IN_UTILIZATION"\n'
    smi += 'else echo "${STAND_IN_UTILIZATION:-0}"; fi ;;\n'
    (bin_dir / "nvidia-smi").write_text(smi + "*) echo 'Stand-in GPU, 1.0' ;;\nesac\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    return env


def test_gpu_checks_moves_the_runs_checkpoints_out_of_the_folder_it_packs(tmp_path):
    """The device tool brings back no file over 16 MiB, and a paper64 / gpu64 checkpoint is 181 MB: packed with the
    torchrun, startup, startup_pair and quality runs' latest.pt, OUT_DIR came back as nothing. Each phase moves its
    checkpoints to OUT_DIR.checkpoints when it ends; the logs and the runs' other files stay. A stand-in python
    (and nvidia-smi), first on the path, says there is a GPU and writes a checkpoint into each --out."""
    env = stand_in_gpu(tmp_path, 'mkdir -p "$2" && echo weights >"$2/latest.pt" && echo {} >"$2/stats.jsonl"')
    out = tmp_path / "gc"
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), f"{out}/", "torchrun", "startup", "startup_pair"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = ["torchrun", "startup_cold_one_by_one", "startup_cold_head_start", "startup_warm"]
    runs += ["startup_pair_1", "startup_pair_2"]
    assert not list(out.rglob("*.pt"))
    assert sorted(p.relative_to(tmp_path / "gc.checkpoints") for p in (tmp_path / "gc.checkpoints").rglob("*.pt")) == [
        Path(run) / "latest.pt" for run in sorted(runs)
    ]
    assert all((out / run / "stats.jsonl").is_file() for run in runs)
    assert (out / "torchrun.log").is_file() and (out / "startup_pair_2.log").is_file()


def test_gpu_checks_times_nothing_while_other_processes_compute_on_the_gpu(tmp_path):
    """The session's plan runs the quality pair detached; a bench, profile or startup phase started before it ended
    would have timed the GPU shared with its training, and said nothing. Each phase that times is now skipped, a
    failure, while nvidia-smi lists compute processes; a phase that does not time (torchrun) runs."""
    calls = tmp_path / "calls"
    env = stand_in_gpu(tmp_path, 'mkdir -p "$2" && touch "$2/ran"', before=f'echo "$*" >>{calls}\n')
    env |= {"BEGAN_FAST_COMMIT": "abc"}
    out = tmp_path / "gc"
    timing = ["profile", "startup", "startup_pair", "bench_step", "bench_data"]
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(out), "torchrun", *timing]
    busy = {**env, "STAND_IN_APPS": "4242, python\n4343, python"}
    done = subprocess.run(command, cwd=ROOT, env=busy, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "profile: skipped, the GPU is computing for other processes (4242, python;4343, python)" in done.stdout
    ended = [line.split()[:2] for line in (out / "phases.txt").read_text().splitlines()]
    assert ended == [["torchrun", "0"], *([name, "busy"] for name in timing[:3]), ["bench_step", "busy"]] + [
        ["bench_data", "busy"],
        ["end", "1"],
    ]
    assert [p.parent.name for p in out.rglob("ran")] == ["torchrun"]
    # With the GPU idle, the same phases run.
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "busy" not in (out / "phases.txt").read_text().split("end 1")[1], done.stdout + done.stderr
    assert {"profile", "startup_cold_one_by_one", "startup_pair_2"} <= {p.parent.name for p in out.rglob("ran")}
    # startup's first case is timed after an untimed process has started CUDA (and read torch's libraries from disk).
    called = calls.read_text()
    assert called.index("x = torch.ones(1, 1, 8, 8, device='cuda')") < called.index("startup_cold_one_by_one")


def test_gpu_checks_tells_a_gpu_busy_for_processes_nvidia_smi_cannot_name(tmp_path):
    """nvidia-smi names no process of another container, and a busy() that read its empty list alone timed a shared
    GPU. The GPU in use in 3 samples a second apart is busy too; one idle sample (a phase that has just ended may
    show in the first) is not. An nvidia-smi that fails to list processes no longer reads as an idle GPU unsaid: the
    phase runs and says it could not tell."""
    env = stand_in_gpu(tmp_path, 'mkdir -p "$2" && touch "$2/ran"') | {"BEGAN_FAST_COMMIT": "abc"}
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(tmp_path / "gc"), "profile"]

    def phases(**settings) -> tuple[list[str], str]:
        shutil.rmtree(tmp_path / "gc", ignore_errors=True)
        done = subprocess.run(command, cwd=ROOT, env=env | settings, capture_output=True, text=True, timeout=120)
        return (tmp_path / "gc" / "phases.txt").read_text().split()[:2], done.stdout

    ended, said = phases(STAND_IN_UTILIZATION="37")
    assert ended == ["profile", "busy"], said
    assert "profile: skipped, the GPU is computing for other processes (none that nvidia-smi names, at 37% " in said
    assert phases(STAND_IN_UTILIZATION="0")[0] == ["profile", "0"]
    # Busy in the first two samples, idle in the third.
    samples = tmp_path / "samples"
    samples.write_text("55\n60\n0\n")
    ended, said = phases(STAND_IN_UTILIZATION=str(samples))
    assert ended == ["profile", "0"] and samples.read_text() == "", said
    ended, said = phases(STAND_IN_APPS_FAIL="Failed to initialize NVML: Driver/library version mismatch")
    assert ended == ["profile", "0"], said
    assert "profile: cannot tell whether other processes compute on the GPU (nvidia-smi failed: Failed to " in said


def test_gpu_checks_ends_its_phases_by_call_limit_s(tmp_path):
    """With CALL_LIMIT_S each phase is stopped in time for the last pack (here a stand-in torchrun that would run for
    ever), and a phase with too little time left is skipped, a failure, rather than run under `timeout 0` (no limit
    at all). phases.txt says how each ended, then that the script did."""
    forever = 'case "$*" in *torch.distributed.run*) echo started; exec sleep 1000 ;; esac\n'
    env = stand_in_gpu(tmp_path, 'mkdir -p "$2" && echo weights >"$2/latest.pt"', before=forever)
    env |= {"CALL_LIMIT_S": "36", "PACK_MARGIN_S": "4", "PACK": str(tmp_path / "gc.tgz")}
    out = tmp_path / "gc"
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(out), "compile", "torchrun", "profile"]
    began = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - began < 36, done.stdout
    assert done.returncode == 1 and "torchrun: stopped at CALL_LIMIT_S" in done.stdout, done.stdout + done.stderr
    ended = [line.split()[:2] for line in (out / "phases.txt").read_text().splitlines()]
    assert ended == [["compile", "0"], ["torchrun", "124"], ["profile", "skipped"], ["end", "1"]]
    assert (out / "torchrun.log").read_text() == "started\n"
    with tarfile.open(tmp_path / "gc.tgz") as packed:  # the last pack, after the end line
        assert packed.extractfile("gc/phases.txt").read() == (out / "phases.txt").read_bytes()


def test_gpu_checks_stops_the_tests_at_call_limit_s_as_ctrl_c_would(tmp_path):
    """pytest stopped by SIGTERM printed the failing tests' names only, not why they failed: the test phases are
    stopped by SIGINT, on which pytest still prints its failures (a stand-in pytest prints them on SIGINT alone)."""
    said = "trap 'echo \"2 failed: their reasons\"; exit 2' INT; while :; do sleep 0.2; done"
    forever = f'case "$*" in *"-m cuda"*) {said} ;; esac\n'
    env = stand_in_gpu(tmp_path, "true", before=forever) | {"CALL_LIMIT_S": "33", "PACK_MARGIN_S": "1"}
    out = tmp_path / "gc"
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(out), "tests_cuda"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (out / "phases.txt").read_text().split()[:2] == ["tests_cuda", "124"]
    assert (out / "tests_cuda.log").read_text() == "2 failed: their reasons\n"


def test_gpu_checks_packs_no_checkpoint_being_written(tmp_path):
    """A run writes its checkpoint to a temporary file first (.latest.pt.XXXX.began-fast.tmp, 181 MB for paper64):
    a pack made meanwhile took it, and a pack over 16 MiB does not come back."""
    writing = 'mkdir -p "$2" && echo weights >"$2/.latest.pt.x1y2.began-fast.tmp" && echo {} >"$2/stats.jsonl"'
    env = stand_in_gpu(tmp_path, writing) | {"PACK": str(tmp_path / "gc.tgz")}
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(tmp_path / "gc"), "torchrun"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tmp_path / "gc.tgz") as packed:
        names = packed.getnames()
    assert "gc/torchrun/stats.jsonl" in names and not [name for name in names if name.endswith(".began-fast.tmp")]


def test_gpu_checks_counts_a_bench_skipped_for_want_of_time_as_a_failure(tmp_path):
    """As the header says of a skipped phase: a bench that could not start (less than a minute of BENCH_BUDGET_S
    left) ended the script with status 0, as if it had run."""
    env = stand_in_gpu(tmp_path, "true") | {"BENCH_BUDGET_S": "30", "BEGAN_FAST_COMMIT": "abc"}
    out = tmp_path / "gc"
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(out), "bench_step"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "bench_step: skipped, less than a minute of BENCH_BUDGET_S left" in done.stdout
    assert [line.split()[:2] for line in (out / "phases.txt").read_text().splitlines()] == [
        ["bench_step", "skipped"],
        ["end", "1"],
    ]


def test_gpu_checks_packs_after_each_phase_what_a_killed_call_brings_back(tmp_path):
    """A device call stopped at its limit is killed, and a `tar` after the script never runs; what is under $OUT comes
    back even then. With PACK, OUT_DIR is packed after every phase: the script killed in its second phase has packed
    the first one's log and line. Without CALL_LIMIT_S no phase runs under timeout (whose process group of its own a
    terminal's Ctrl-C does not reach)."""
    forever = 'case "$*" in *torch.distributed.run*) echo "$PPID" >started; exec sleep 1000 ;; esac\n'
    env = stand_in_gpu(tmp_path, "true", before=forever) | {"PACK": str(tmp_path / "gc.tgz")}
    out = tmp_path / "gc"
    command = ["bash", str(ROOT / "scripts" / "gpu_checks.sh"), str(out), "compile", "torchrun"]
    script = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        started, deadline = tmp_path / "started", time.monotonic() + 60
        # Until its line is whole: the shell creates the file before echo writes into it.
        while not (started.exists() and started.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.1)
        # The stand-in's parent is the script's own subshell of the pipeline, not timeout.
        assert started.exists() and started.read_text().endswith("\n")
        assert Path(f"/proc/{started.read_text().strip()}/comm").read_text().strip() == "bash"
    finally:
        os.killpg(script.pid, signal.SIGKILL)
        script.wait(timeout=60)
    with tarfile.open(tmp_path / "gc.tgz") as packed:
        assert "gc/compile.log" in packed.getnames()
        assert packed.extractfile("gc/phases.txt").read().decode().startswith("compile 0 ")


NOT_UTF8 = os.fsdecode(b"lat\xe9")  # a name in Latin-1: its byte 0xe9 decoded as the lone surrogate '\udce9'


def test_a_path_that_is_not_utf8_is_said_not_a_traceback(tmp_path, capfd):
    """A message naming such a path (a --data that does not exist) raised UnicodeEncodeError as it was said, and the
    traceback took its place. Both ways of saying a line write it as Python's stderr would: '\\udce9'."""
    say_line(f"error: data path {NOT_UTF8} does not exist")
    say_line_in_a_handler(f"Ctrl-C: stopping {NOT_UTF8}", below_a_bar=False)
    assert capfd.readouterr().err == "error: data path lat\\udce9 does not exist\nCtrl-C: stopping lat\\udce9\n"


def test_a_run_folder_that_is_not_utf8_is_refused_before_any_write(tmp_path):
    """TensorBoard's log writer stopped such a run in a traceback at its start, once config.json was written."""
    out = tmp_path / NOT_UTF8
    with pytest.raises(ConfigError, match=r"^--out .*lat\\udce9 is not a UTF-8 path, as the run's logs need: give one"):
        RunOptions(out=out)
    assert not out.exists()


def test_prepare_celeba_packs_a_folder_whose_name_is_not_utf8(tmp_path):
    """h5py stores the source folder's name as UTF-8 text: the pack ended in a traceback as it began writing."""
    folder = tmp_path / NOT_UTF8
    folder.mkdir()
    for i, face in enumerate(draw_faces(4, 16, seed=0)):
        Image.fromarray(face).save(folder / f"{i}.png")
    prepare_celeba = load_script("prepare_celeba")
    args = prepare_celeba.parse_args([str(folder), str(tmp_path / "faces.h5"), "--size", "16", "--workers", "1"])
    prepare_celeba.prepare(args)
    with h5py.File(tmp_path / "faces.h5") as f:
        assert f["images"].shape == (4, 16, 16, 3) and f.attrs["source"].endswith("lat\\udce9")
