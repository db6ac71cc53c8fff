"""scripts/profile_step.py: its per-step kernel table from a profile (on made-up profiler rows without a GPU), its
one-line refusal without a GPU, its one-line refusals of bad input on a faked GPU, and a real profile of the demo
preset (marked `cuda`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.test_kernels_compile import KERNELS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
profile_step = sys.modules["profile_step"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def event(key, count, us, device_type=CUDA):
    return SimpleNamespace(key=key, count=count, self_device_time_total=us, device_type=device_type)


def test_the_project_kernels_are_known_by_the_names_the_profiler_gives_them():
    assert profile_step.triton_kernel_names() == set(KERNELS)


def test_kernel_times_are_per_step_and_split_between_triton_and_pytorch():
    """Over 4 steps: 8 forward-kernel launches of 900 us in all, 12 copies of 300 us; CPU rows (host time) and
    kernels with no device time are left out."""
    averages = [
        event("aten::copy_", 12, 0.0, CPU),
        event("void at::native::elementwise_kernel<copy>", 12, 300.0),
        event("conv_elu_fwd_kernel", 8, 900.0),
        event("Memset (Device)", 4, 0.0),
    ]
    rows = profile_step.kernel_times(averages, 4, {"conv_elu_fwd_kernel"})
    assert rows == [
        profile_step.KernelTime("conv_elu_fwd_kernel", True, 2.0, 225.0),
        profile_step.KernelTime("void at::native::elementwise_kernel<copy>", False, 3.0, 75.0),
    ]
    text = profile_step.report(rows, graph_ms=0.31, eager_ms=0.52, title="t")
    assert "- one step replayed from its CUDA graph: 0.310 ms; run eagerly: 0.520 ms" in text
    assert "- Triton kernels: 2 launches, 0.225 ms of device time per step (75.0% of the kernels' 0.300 ms)" in text
    assert "- PyTorch's kernels, memcpy and memset: 3 launches, 0.075 ms of device time per step (25.0%" in text
    assert "| `conv_elu_fwd_kernel` | Triton | 2 | 225.0 | 75.0% |" in text


def test_the_table_keeps_its_longest_rows_and_sums_the_rest():
    rows = [profile_step.KernelTime(f"k{i}", False, 1.0, 100.0 - i) for i in range(profile_step.TABLE_ROWS + 3)]
    text = profile_step.report(rows, 1.0, 1.0, "t")
    assert f"| `k{profile_step.TABLE_ROWS - 1}` |" in text and f"| `k{profile_step.TABLE_ROWS}` |" not in text
    rest = sum(100.0 - i for i in range(profile_step.TABLE_ROWS, profile_step.TABLE_ROWS + 3))
    assert f"| 3 more kernels | | 3 | {rest:.1f} |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU gets")
def test_without_a_gpu_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == "error: no CUDA GPU: the profile times the fast step's kernels on one\n", result.stderr


@pytest.mark.cuda
def test_profile_of_the_demo_preset(tmp_path):
    args = ["--preset", "demo", "--batch", "4", "--steps", "2", "--repeats", "3", "--out", str(tmp_path)]
    assert profile_step.main(args) == 0
    text = (tmp_path / "profile.md").read_text()
    assert "| `conv_elu_fwd_kernel` | Triton |" in text
    assert (tmp_path / "trace.json").stat().st_size > 0


class FakeProfile:
    """torch.profiler.profile's part that main() uses, with one Triton kernel's row; its trace is `trace` written to
    the path given, or (trace None) nothing, as Kineto does when it cannot write the file: it logs and returns."""

    def __init__(self, trace: str | None):
        self.trace = trace

    def __call__(self, activities):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def key_averages(self):
        return [event("conv_elu_fwd_kernel", 8, 900.0)]

    def export_chrome_trace(self, path):
        if self.trace is not None:
            Path(path).write_text(self.trace)


@pytest.fixture
def fake_gpu(monkeypatch):
    """main() on a CPU as on a GPU: a CUDA device, a step that runs nothing and a profile of one kernel. Returns the
    preset, batch and amp of each step built."""
    built = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(profile_step, "build_step", lambda *args: (built.append(args), (lambda: None, lambda: None))[1])
    monkeypatch.setattr(profile_step, "median_ms", lambda run, repeats: 0.5)
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile('{"traceEvents": []}'))
    return built


def test_the_fake_gpu_profile_writes_the_table_and_the_trace(tmp_path, fake_gpu, capsys):
    """What the tests below refuse is refused by main() itself, not by the fakes."""
    assert profile_step.main(["--out", str(tmp_path / "new" / "out")]) == 0
    assert fake_gpu == [("paper64", 16, "bf16")]
    assert "| `conv_elu_fwd_kernel` | Triton |" in (tmp_path / "new" / "out" / "profile.md").read_text()
    assert (tmp_path / "new" / "out" / "trace.json").read_text() == '{"traceEvents": []}'
    assert "| `conv_elu_fwd_kernel` | Triton |" in capsys.readouterr().out


def test_an_out_that_cannot_be_a_folder_is_refused_before_any_gpu_work(tmp_path, fake_gpu, monkeypatch, capsys):
    """--out naming a file ended, after the whole profile had run, in a FileExistsError traceback; --out '' (an
    unset shell variable) wrote into the working folder. Each is one line, before any step is built."""
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "profile.md"
    existing.write_text("an earlier table\n")
    assert profile_step.main(["--out", str(existing)]) == 2
    assert capsys.readouterr().err == f"error: --out {existing} is a file; expected a folder\n"
    with pytest.raises(SystemExit) as ended:
        profile_step.main(["--out", ""])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: argument --out: is empty (an unset shell variable?)"), err
    assert fake_gpu == [] and existing.read_text() == "an earlier table\n"
    assert list(tmp_path.iterdir()) == [existing]


def test_a_batch_too_big_for_the_gpu_is_one_line(fake_gpu, monkeypatch, capsys):
    """Out of GPU memory ended in torch's traceback: one line that says what to lower, as train.py's and
    evaluate.py's; any other RuntimeError is a bug, and propagates."""
    out_of_memory = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB is "
        "free.\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"
    )
    monkeypatch.setattr(profile_step, "build_step", lambda *args: (_ for _ in ()).throw(out_of_memory))
    assert profile_step.main(["--batch", "100000"]) == 2
    assert capsys.readouterr().err == (
        "error: CUDA out of memory: the step does not fit this GPU's memory; lower --batch\n"
    )
    monkeypatch.setattr(profile_step, "build_step", lambda *args: (_ for _ in ()).throw(RuntimeError("another error")))
    with pytest.raises(RuntimeError, match="another error"):
        profile_step.main([])


def test_a_trace_the_profiler_cannot_write_is_said_and_the_earlier_files_stay(tmp_path, fake_gpu, monkeypatch, capsys):
    """Kineto logs a trace it cannot write and returns: trace.json was left missing or cut short and the script
    exited 0. The trace goes through a temporary file; when none was written, one line, status 2, and the earlier
    trace.json and profile.md stay as they were."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "trace.json").write_text("an earlier trace")
    (out / "profile.md").write_text("an earlier table\n")
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile(None))
    assert profile_step.main(["--out", str(out)]) == 2
    said = f"error: cannot write {out / 'trace.json'}: the profiler wrote no trace (see its error above)\n"
    assert capsys.readouterr().err == said
    assert sorted(path.name for path in out.iterdir()) == ["profile.md", "trace.json"]
    assert (out / "trace.json").read_text() == "an earlier trace"
    assert (out / "profile.md").read_text() == "an earlier table\n"
