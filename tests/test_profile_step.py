"""scripts/profile_step.py: its per-step kernel table from a profile (on made-up profiler rows without a GPU), its
one-line refusal without a GPU, and a real profile of the demo preset (marked `cuda`)."""

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
