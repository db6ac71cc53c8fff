"""The training loop end to end on the built-in faces: outputs, exact resume, divergence, Ctrl-C, and the CLI."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from began_fast.checkpoint import load_checkpoint
from began_fast.config import DataConfig, ModelConfig, TrainConfig
from began_fast.train import RunOptions, TrainingError, setup_run, train

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(image_size=16, n=4, h=4)
DATA = DataConfig(builtin_count=64, num_workers=0)


def train_cfg(steps, **kw):
    base = dict(batch_size=4, steps=steps, log_every=2, sample_every=4, checkpoint_every=4, snapshot_every=8)
    base |= dict(eval_every=8, eval_images=16)
    return TrainConfig(**(base | kw))


def run_steps(out, steps, resume=False, **opts):
    run = setup_run(MODEL, train_cfg(steps), DATA, RunOptions(out=out, resume=resume, quiet=True, **opts))
    train(run)
    return run


def parameters(run):
    return [p.detach().clone() for p in list(run.G.parameters()) + list(run.D.parameters())]


def test_run_writes_its_outputs(tmp_path):
    run = run_steps(tmp_path, 8)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["image_size"] == 16
    assert config["run"]["reference_step"] is False and config["run"]["amp"] is None
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "swd" in r]
    rows = [r for r in rows if "swd" not in r]
    assert [(r["step"], r["swd"] > 0, r["recon_l1"] > 0) for r in evals] == [(8, True, True)]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(math.isfinite(r["m"]) and 0 <= r["k"] <= 1 and r["lr"] == pytest.approx(1e-4) for r in rows)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]
    for picture in ("convergence.png", "progress.png", "progress.gif", "reconstruction.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture
    assert (tmp_path / "step_0000008.pt").exists()
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 8 == run.step.steps_done


@pytest.mark.parametrize("reference_step", [False, True], ids=["fast", "reference"])
def test_resume_is_exact(tmp_path, reference_step):
    whole = run_steps(tmp_path / "whole", 8, reference_step=reference_step)
    run_steps(tmp_path / "split", 4, reference_step=reference_step)
    resumed = run_steps(tmp_path / "split", 8, resume=True, reference_step=reference_step)
    assert resumed.step.steps_done == 8
    for a, b in zip(parameters(whole), parameters(resumed), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(whole.step.k, resumed.step.k)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_steps(tmp_path, 4)
    good = (tmp_path / "latest.pt").read_bytes()
    run = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    with torch.no_grad():
        run.D.decoder.out.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss .* up to step 6"):
        train(run)
    assert (tmp_path / "latest.pt").read_bytes() == good


def test_ctrl_c_checkpoints_after_the_step_in_flight(tmp_path):
    run = setup_run(MODEL, train_cfg(20), DATA, RunOptions(out=tmp_path, quiet=True))
    step = run.step.__class__.__call__

    def interrupting_step(self, x):
        step(self, x)
        if self.steps_done == 3:
            signal.raise_signal(signal.SIGINT)

    run.step.__class__ = type("Interrupting", (run.step.__class__,), {"__call__": interrupting_step})
    train(run)
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/folder"], "does not exist"),
        (["--gamma", "1.5"], "gamma must be in (0, 1]"),
        (["--resume"], "latest.pt does not exist"),
        (["--device", "cpu", "--cuda-graphs"], "needs a CUDA device"),
        (["--reference-step", "--amp"], "--reference-step runs in float32"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    result = cli("--out", str(tmp_path / "run"), "--quiet", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_cli_trains_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    common = ["--out", out, "--quiet", "--image-size", "16", "--batch-size", "4", "--checkpoint-every", "3"]
    assert cli(*common, "--steps", "3").returncode == 0
    result = cli(*common, "--steps", "5", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming at step 3" in result.stderr
    assert load_checkpoint(Path(out) / "latest.pt")["step"] == 5


def test_cli_reference_step_runs_on_plain_pytorch_layers(tmp_path):
    """--reference-step is the specification's step on PyTorch's own layers, unless --impl names another."""
    out = tmp_path / "run"
    common = ["--quiet", "--image-size", "16", "--batch-size", "4", "--steps", "1", "--reference-step"]
    assert cli("--out", str(out), *common).returncode == 0
    assert json.loads((out / "config.json").read_text())["run"]["impl"] == "torch"
    assert cli("--out", str(tmp_path / "auto"), *common, "--impl", "auto").returncode == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["run"]["impl"] == "auto"


@pytest.mark.parametrize("flag, skip", [([], True), (["--no-skip"], False), (["--preset", "paper64", "--skip"], True)])
def test_cli_skip_switch_overrides_the_preset_both_ways(tmp_path, flag, skip):
    """demo has the paper's skips on, paper64 off: --no-skip and --skip set them either way."""
    out = tmp_path / "run"
    common = ["--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2", "--steps", "1"]
    assert cli(*common, *flag).returncode == 0
    assert json.loads((out / "config.json").read_text())["model"]["skip"] is skip


def test_pictures_and_evaluation_run_in_the_steps_precision(tmp_path, monkeypatch):
    """A bf16 run draws its samples, reconstructions and SWD evaluations in bf16 too: compiled, a float32 layer
    would need kernels of its own (minutes of compiling on a GPU) for a run that never trains in float32."""
    from began_fast import ops
    from began_fast.conv_function import TorchConvELU

    seen = set()

    class Recording(TorchConvELU):
        @staticmethod
        def forward(ctx, x, *args):
            seen.add(x.dtype)
            return TorchConvELU.forward(ctx, x, *args)

    monkeypatch.setattr(ops, "TorchConvELU", Recording)
    run = run_steps(tmp_path, 8, amp="bf16", impl="torch")
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "swd" in r] == [8] and (tmp_path / "samples" / "step_0000008.png").exists()
    assert seen == {torch.bfloat16} and run.step.amp == "bf16"
