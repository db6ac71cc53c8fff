"""The training loop end to end on the built-in faces: outputs, exact resume, divergence, Ctrl-C, and the CLI."""

import dataclasses
import errno
import fcntl
import importlib.util
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import began_fast.train as train_module
from began_fast import metrics, reports
from began_fast.checkpoint import CheckpointError, load_checkpoint, load_models, save_checkpoint, saved_configs
from began_fast.config import ConfigError, DataConfig, ModelConfig, TrainConfig, get_preset
from began_fast.data import DataError
from began_fast.data.builtin import BuiltinFaces, draw_faces
from began_fast.distributed import CollectiveError, Collectives, World
from began_fast.hang_guard import HangGuard
from began_fast.metrics import MetricError
from began_fast.step import ADAM_IMPLEMENTATION
from began_fast.train import RUN_FILES, RUN_FOLDERS, RUN_LOCK, RunOptions, TrainingError, setup_run, train
from tests.scripts import load_script
from tests.test_data import write_celeba_like, write_h5

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(image_size=16, n=4, h=4)
DATA = DataConfig(builtin_count=64, num_workers=0)


def train_cfg(steps, **kw):
    base = dict(batch_size=4, steps=steps, log_every=2, sample_every=4, checkpoint_every=4, snapshot_every=8)
    base |= dict(eval_every=8, eval_images=16)
    return TrainConfig(**(base | kw))


def run_steps(out, steps, resume=False, **opts):
    run = setup_run(MODEL, train_cfg(steps), DATA, RunOptions(**{"out": out, "resume": resume, "quiet": True} | opts))
    train(run)
    return run


def parameters(run):
    return [p.detach().clone() for p in list(run.G.parameters()) + list(run.D.parameters())]


def test_run_writes_its_outputs(tmp_path, monkeypatch):
    calls = {}

    def record(module, name, what):
        """Record what(*args) at each call of module.name, under `name`."""
        function = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append(what(*args, **kwargs))
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    newest_grid = lambda *args: reports.sample_frames(tmp_path)[-1][0]  # noqa: E731
    record(reports, "update_progress", newest_grid)
    record(reports, "save_reconstruction_grid", newest_grid)
    record(reports, "plot_convergence", lambda stats, path: max(r["step"] for r in stats))
    record(metrics, "evaluate_models", lambda *args, held_out, **kwargs: held_out)
    run = run_steps(tmp_path, 8)
    # Every picture is redrawn at every sample step, not only at the end.
    assert calls["update_progress"] == calls["save_reconstruction_grid"] == calls["plot_convergence"] == [4, 8]
    # D's error is measured on the 16 faces after the 64 the run trains on.
    (held_out,) = calls["evaluate_models"]
    assert torch.equal(held_out, BuiltinFaces(16, 16, 0, first=64).images)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["image_size"] == 16
    assert config["run"]["reference_step"] is False and config["run"]["amp"] is None
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "swd" in r]
    rows = [r for r in rows if "swd" not in r]
    assert [(r["step"], r["swd"] > 0, r["recon_l1"] > 0, r["recon_images"]) for r in evals] == [
        (8, True, True, "held-out")
    ]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(math.isfinite(r["m"]) and 0 <= r["k"] <= 1 and r["lr"] == pytest.approx(1e-4) for r in rows)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]
    for picture in ("convergence.png", "progress.png", "progress.gif", "reconstruction.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture
    assert (tmp_path / "step_0000008.pt").exists()
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 8 == run.step.steps_done
    umask = os.umask(0)
    os.umask(umask)
    for written in ("latest.pt", "reconstruction.png", "stats.jsonl"):  # atomic writes get a new file's mode too
        assert stat.S_IMODE((tmp_path / written).stat().st_mode) == 0o666 & ~umask, written


@pytest.mark.parametrize("reference_step", [False, True])
def test_the_steps_noise_is_not_the_stream_that_drew_the_weights(tmp_path, reference_step):
    """On the CPU a generator seeded with the run's seed is the one that drew the initial weights: each z would be
    a rescaled row of G's first layer (whose sample's h0 then spikes in that row's unit), and a later z the draws
    behind the other weights (the step's noise was seeded so until a review helper found it)."""
    run = setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=tmp_path, quiet=True, reference_step=reference_step))
    z_size, batch = run.G.cfg.z_size, 4 * MODEL.h
    z = run.step.draw_z(batch)
    weights_stream = torch.rand(batch, z_size, generator=torch.Generator().manual_seed(run.train_cfg.seed)) * 2 - 1
    assert not torch.allclose(z, weights_stream, atol=1e-3)
    rows = run.G.decoder.fc.weight.detach() * math.sqrt(z_size)  # U(-1/sqrt(z_size), +) rescaled to U(-1, 1)
    assert torch.cdist(z, rows).min() > 1e-3
    assert torch.cdist(run.fixed_z.cpu(), rows).min() > 1e-3
    assert torch.cdist(run.fixed_z.cpu(), z.cpu()).min() > 1e-3  # nor is it the steps' noise: a stream of its own
    # The sample grids' z is drawn as the steps' is, from U(-1, 1): not from a part of the space G trains on.
    for noise in (z, run.fixed_z):
        assert -1 <= noise.min() < -0.5 and 0.5 < noise.max() <= 1 and abs(noise.mean()) < 0.3


def test_a_new_runs_networks_and_sample_noise_are_its_seeds(tmp_path):
    """--seed draws a new run's initial weights and its fixed z: the same seed gives them bit for bit (every rank of a
    torchrun job builds its own copy from it), another seed others."""
    seed = random.randint(1, 2**31)
    runs = [
        setup_run(MODEL, train_cfg(2, seed=s), DATA, RunOptions(out=tmp_path / str(i), quiet=True))
        for i, s in enumerate((seed, seed, seed + 1))
    ]
    torch.rand(1000)  # the global stream moved on between runs: it draws none of it
    runs.append(setup_run(MODEL, train_cfg(2, seed=seed), DATA, RunOptions(out=tmp_path / "3", quiet=True)))
    same, other, again = runs[1], runs[2], runs[3]
    for run in (same, again):
        assert all(torch.equal(a, b) for a, b in zip(parameters(runs[0]), parameters(run), strict=True))
        assert torch.equal(runs[0].fixed_z, run.fixed_z)
    assert not any(torch.equal(a, b) for a, b in zip(parameters(runs[0]), parameters(other), strict=True) if a.std())
    assert not torch.equal(runs[0].fixed_z, other.fixed_z)


def assert_same_trainer_state(a, b, where="trainer"):
    """Two step states (both Adam states, k_t, the lr decay's, the noise generator's) are equal, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_trainer_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_trainer_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("reference_step", [False, True], ids=["fast", "reference"])
def test_resume_is_exact(tmp_path, reference_step):
    """4 steps, then 4 resumed, end where 8 uninterrupted steps do, bit for bit: weights, Adam's moments, k_t, and
    the lr's decay, which M's 2-step windows make halve during both halves (a high lr, so M stalls)."""
    cfg = lambda steps: train_cfg(steps, lr=1e-2, lr_decay_window=2, lr_floor=1e-4)  # noqa: E731
    options = lambda folder, resume=False: RunOptions(  # noqa: E731
        out=tmp_path / folder, resume=resume, quiet=True, reference_step=reference_step
    )
    whole = setup_run(MODEL, cfg(8), DATA, options("whole"))
    train(whole)
    train(setup_run(MODEL, cfg(4), DATA, options("split")))
    halfway = load_checkpoint(tmp_path / "split" / "latest.pt")["trainer"]["opt_g"]["param_groups"][0]["lr"]
    resumed = setup_run(MODEL, cfg(8), DATA, options("split", resume=True))
    assert resumed.step.steps_done == 4  # it continues; a fresh start would reach the same state by itself
    train(resumed)
    assert resumed.step.steps_done == 8
    assert 1e-2 > halfway > resumed.step.lr.item()  # decayed before the checkpoint, and after it
    for a, b in zip(parameters(whole), parameters(resumed), strict=True):
        assert torch.equal(a, b)
    assert_same_trainer_state(whole.step.state_dict(), resumed.step.state_dict())


def test_tensorboard_shows_a_resumed_run_once_after_its_predecessor_died(tmp_path):
    """A run that died after logging steps its checkpoint does not hold: the resumed run logs those steps anew, and
    TensorBoard must show each step once (as stats.jsonl keeps it), not the dead run's points beside the new ones."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_steps(tmp_path, 4)
    at_step_4 = (tmp_path / "latest.pt").read_bytes()
    run_steps(tmp_path, 8, resume=True)
    (tmp_path / "latest.pt").write_bytes(at_step_4)  # as if it had died before its checkpoint at step 8
    resumed = run_steps(tmp_path, 8, resume=True)
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("began/m")] == [2, 4, 6, 8]
    assert [event.step for event in events.Scalars("eval/swd")] == [4, 8]  # 4: the first run's last step
    assert resumed.step.steps_done == 8
    # Every statistic of stats.jsonl, at its steps and values.
    rows = reports.read_stats(tmp_path / "stats.jsonl")
    logged = {f"began/{key}" for key in ("m", "k", "l_d", "l_g", "l_real", "l_fake", "lr")} | {"eval/recon_l1"}
    assert set(events.Tags()["scalars"]) == logged | {"eval/swd"}
    for tag in logged:
        key = tag.split("/")[1]
        expected = [(row["step"], row[key]) for row in rows if key in row]
        assert [(event.step, event.value) for event in events.Scalars(tag)] == pytest.approx(expected, rel=1e-6)


def test_each_evaluation_is_printed_unless_quiet(tmp_path, capsys):
    """--eval-every's SWD and D's error reached only stats.jsonl and the plot: a user watching the run saw none."""
    run_steps(tmp_path / "loud", 8, quiet=False)
    said = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if ": SWD x1e3 " in line]
    assert len(said) == 1, said  # train_cfg(8) evaluates at step 8
    rows = [row for row in reports.read_stats(tmp_path / "loud" / "stats.jsonl") if "swd" in row]
    swd, recon = f"{rows[0]['swd']:.2f}", f"{rows[0]['recon_l1']:.4f}"
    assert said[0] == f"step 8: SWD x1e3 {swd}, D's reconstruction error {recon} on 16 held-out images"
    run_steps(tmp_path / "quiet", 8)
    assert ": SWD x1e3 " not in capsys.readouterr().err


def test_a_tensorboard_log_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """Its folder deleted under the run (or the run folder, or a full disk): TensorBoard's writer thread printed its
    traceback, and the next window's write raised the error with the event file's name as bytes. Now the window
    whose scalars cannot be written raises one OSError that names the log's folder, and the thread prints nothing."""
    pytest.importorskip("tensorboard")
    run = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path, quiet=True))
    log_window = train_module.log_window

    def losing_the_log_after_the_first_window(run, stats_file, writer, bar, since):
        row = log_window(run, stats_file, writer, bar, since)
        shutil.rmtree(tmp_path / "tensorboard", ignore_errors=True)
        return row

    monkeypatch.setattr(train_module, "log_window", losing_the_log_after_the_first_window)
    reported = []  # what Python's hook for a thread's exception would print (pytest's own hook stands in for it)
    monkeypatch.setattr(threading, "excepthook", reported.append)
    folder = re.escape(str(tmp_path / "tensorboard"))
    with pytest.raises(OSError, match=rf"^\[Errno 2\] cannot write the TensorBoard log in {folder}: No such file or"):
        train(run)
    assert reported == [] and "Traceback" not in capsys.readouterr().err
    assert run.step.steps_done == 4  # the second window's


def test_the_gpu_resident_loader_trains_and_resumes_as_the_torch_loader(tmp_path):
    """--loader gpu (here on the CPU) gathers the torch loader's batches: 4 steps, then 4 resumed, end where 8
    uninterrupted steps on the torch loader do, bit for bit."""
    whole = run_steps(tmp_path / "torch", 8)
    on_gpu_loader = dataclasses.replace(DATA, loader="gpu")
    train(setup_run(MODEL, train_cfg(4), on_gpu_loader, RunOptions(out=tmp_path / "gpu", quiet=True)))
    resumed = setup_run(MODEL, train_cfg(8), on_gpu_loader, RunOptions(out=tmp_path / "gpu", resume=True, quiet=True))
    train(resumed)
    assert resumed.step.steps_done == 8
    for a, b in zip(parameters(whole), parameters(resumed), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(whole.step.k, resumed.step.k)


def test_a_run_folder_another_process_trains_in_is_refused(tmp_path, monkeypatch):
    """Two runs in one folder overwrite each other's checkpoints and interleave their stats: while one process
    holds the folder, a run there is refused with one line before it writes anything; once it let go, it trains,
    holding the folder while it writes, and lets go when it ends."""
    out = tmp_path / "run"
    out.mkdir()
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "; time.sleep(120)", str(out / RUN_LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "1\n"
        with pytest.raises(ConfigError) as refused:
            train(setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=out, quiet=True)))
        assert str(refused.value) == (
            f"another process is training in {out} (it holds {RUN_LOCK}): let it end, or choose another --out"
        )
        assert os.listdir(out) == [RUN_LOCK]
    finally:
        holder.kill()
        holder.wait()

    def lock_state():
        with open(out / RUN_LOCK) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: refused while the run holds one
            except BlockingIOError:
                return "held"
            return "free"

    states, write_checkpoint = [], train_module.write_checkpoint
    monkeypatch.setattr(
        train_module, "write_checkpoint", lambda run: states.append(lock_state()) or write_checkpoint(run)
    )
    train(setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=out, quiet=True)))
    assert load_checkpoint(out / "latest.pt")["step"] == 2
    assert states == ["held"] and lock_state() == "free"


def test_a_look_at_the_run_folder_neither_refuses_another_look_nor_the_run_that_takes_it(tmp_path):
    """Every rank of a torchrun job looks whether another process holds the run folder, at about the same moment, and
    rank 0 then takes it. Looks that tried an exclusive lock refused each other (a 2-rank resume failed with "another
    process is training" once in 17, found by a helper), and a look at the moment a run took the folder refused the
    run. Here another process looks without pause while this one looks and takes the folder, again and again."""
    (tmp_path / RUN_LOCK).touch()
    look = (
        "import sys, pathlib; from began_fast.train import held_by_another; out = pathlib.Path(sys.argv[1]); "
        "print(1, flush=True)\nwhile not (out / 'stop').exists(): held_by_another(out)"
    )
    looker = subprocess.Popen([sys.executable, "-c", look, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert looker.stdout.readline() == "1\n"
        for _ in range(300):
            assert not train_module.held_by_another(tmp_path)
            train_module.lock_run_folder(tmp_path).close()
    finally:
        (tmp_path / "stop").touch()
        assert looker.wait(timeout=60) == 0


def test_a_resume_in_a_folder_whose_run_has_no_checkpoint_yet_says_another_process_trains_there(tmp_path):
    """A run before its first checkpoint holds its folder but has no latest.pt: a resume there is refused because
    another process trains in it, not because the checkpoint "does not exist" (which reads as a lost run)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "; time.sleep(120)", str(out / RUN_LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "1\n"
        for resume in (True, False):
            with pytest.raises(ConfigError) as refused:
                setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=out, resume=resume, quiet=True))
            assert str(refused.value) == (
                f"another process is training in {out} (it holds {RUN_LOCK}): let it end, or choose another --out"
            )
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == sorted([RUN_LOCK, "config.json"])
    resume = lambda: setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=out, resume=True, quiet=True))  # noqa: E731
    with pytest.raises(ConfigError) as refused:  # once it let go: the folder's own state; "{}" is no run's config
        resume()
    assert str(refused.value) == f"--resume: {out} holds no run (no latest.pt): leave out --resume to start one there"
    (out / "config.json").write_text(json.dumps({"model": {}, "train": {}, "run": {}}))  # a run's dead start
    with pytest.raises(ConfigError) as refused:
        resume()
    assert str(refused.value) == (
        f"--resume: the run in {out} ended before its first checkpoint (it has a config.json, no latest.pt): start it "
        "again without --resume"
    )
    for step in (9_999_999, 10_000_000):  # a run's snapshots, whose latest.pt was moved away; the last past 7 digits
        (out / f"step_{step:07d}.pt").write_bytes(b"a snapshot")
    with pytest.raises(ConfigError, match=r"^--resume: .* no latest.pt: copy the last one \(step_10000000.pt\)"):
        resume()


def test_a_run_refuses_a_folder_another_run_wrote_after_it_looked(tmp_path):
    """setup_run looks at the folder before train() holds it: a run that held it meanwhile, and has let go, wrote
    there. A new run set up before that, or a resume that read the checkpoint before it, would overwrite its work:
    both are refused when they come to hold the folder, and its checkpoint stays."""
    new = setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=tmp_path, quiet=True))
    run_steps(tmp_path, 4)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(new)
    resumed_later = setup_run(MODEL, train_cfg(6), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    run_steps(tmp_path, 8, resume=True)
    with pytest.raises(ConfigError) as refused:
        train(resumed_later)
    latest = tmp_path / "latest.pt"
    assert str(refused.value) == f"another process wrote {latest} after this run read it: resume again to go on from it"
    assert load_checkpoint(latest)["step"] == 8


def test_a_run_folder_on_a_file_system_without_locks_trains_as_before_them(tmp_path, monkeypatch):
    """Where flock fails for want of locks (ENOLCK: an NFS mount without its lock service), the run goes on
    unlocked rather than refusing every folder there."""

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(train_module.fcntl, "flock", no_locks)
    run_steps(tmp_path, 2)
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 2


def test_a_checkpoint_rewritten_in_place_or_replaced_by_one_of_its_size_and_time_is_not_the_one_read(tmp_path):
    """file_identity tells the latest.pt a resume read from one written after: overwritten in place (`cp` keeps the
    inode) with a checkpoint of the same size, or replaced by one of the same size and time (`rsync -t`, `cp -p`)."""
    path = tmp_path / "latest.pt"
    path.write_bytes(os.urandom(64))
    read = train_module.file_identity(path)
    stat_then = path.stat()
    with open(path, "r+b") as f:  # in place: the same inode and size, written a second later
        f.write(os.urandom(64))
    os.utime(path, ns=(stat_then.st_atime_ns, stat_then.st_mtime_ns + 10**9))
    assert path.stat().st_ino == stat_then.st_ino and train_module.file_identity(path) != read
    copy = tmp_path / "copy.pt"
    copy.write_bytes(os.urandom(64))
    os.utime(copy, ns=(stat_then.st_atime_ns, stat_then.st_mtime_ns))  # the same size and time, another inode
    os.replace(copy, path)
    assert train_module.file_identity(path) != read
    path.unlink()
    assert train_module.file_identity(path) is None


def test_a_run_on_fewer_images_than_a_reconstruction_grid_draws_them_all(tmp_path):
    """reconstruction.png pairs the first 16 real images with D's reconstructions, or all of them when the data set
    holds fewer."""
    count = random.randint(4, 15)
    write_faces(tmp_path / "faces", range(count))
    data = DataConfig(path=str(tmp_path / "faces"), crop="center", num_workers=0)
    train(setup_run(MODEL, train_cfg(2, eval_every=0), data, RunOptions(out=tmp_path / "run", quiet=True)))
    assert (tmp_path / "run" / "reconstruction.png").exists()
    assert (tmp_path / "run" / "samples" / "step_0000002.png").exists()


def test_a_runs_evaluations_say_whether_d_reconstructed_held_out_or_training_images(tmp_path):
    """stats.jsonl's recon_images: "held-out" where the run holds images out (--holdout, or the built-in faces),
    "training" where D's reconstruction error can only be measured on the images it trains on; recon_num: on how
    many (the 4 held out, fewer than --eval-images 8)."""
    write_faces(tmp_path / "faces", range(20))
    for holdout, images, num in ((0, "training", 8), (4, "held-out", 4)):
        data = DataConfig(path=str(tmp_path / "faces"), crop="center", num_workers=0, holdout=holdout)
        out = tmp_path / f"run{holdout}"
        train(setup_run(MODEL, train_cfg(2, eval_images=8), data, RunOptions(out=out, quiet=True)))
        evaluations = [row for row in reports.read_stats(out / "stats.jsonl") if "swd" in row]
        assert [(row["step"], row["recon_images"], row["recon_num"]) for row in evaluations] == [(2, images, num)]
    run_steps(tmp_path / "builtin", 2)
    evaluations = [row for row in reports.read_stats(tmp_path / "builtin" / "stats.jsonl") if "swd" in row]
    assert [(row["step"], row["recon_images"], row["recon_num"]) for row in evaluations] == [(2, "held-out", 16)]


@pytest.mark.parametrize("first, then", [("reference", "fp16"), ("fp16", "reference")])
def test_a_run_resumes_with_another_kind_of_step(tmp_path, first, then):
    """--reference-step and --amp are not saved: a checkpoint of one kind of step resumes on another (Adam keeps
    the new step's implementation: fused with fp16 loss scaling, or plain), and continues training."""
    kinds = {"reference": dict(reference_step=True), "fp16": dict(amp="fp16", impl="torch")}
    run_steps(tmp_path, 4, **kinds[first])
    resumed = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path, resume=True, quiet=True, **kinds[then]))
    fresh = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path / "new", quiet=True, **kinds[then]))

    def implementation(run):
        groups = run.step.opt_g.param_groups + run.step.opt_d.param_groups
        return [{key: group[key] for key in ADAM_IMPLEMENTATION if key in group} for group in groups]

    assert implementation(resumed) == implementation(fresh)
    before = parameters(resumed)
    train(resumed)
    assert resumed.step.steps_done == 8
    assert all(torch.isfinite(p).all() for p in parameters(resumed))
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(resumed), strict=True))


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    run_steps(tmp_path, 4)
    before = (tmp_path / "latest.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*add --resume"):
        run_steps(tmp_path, 2)
    assert (tmp_path / "latest.pt").read_bytes() == before


def test_a_new_run_refuses_a_folder_whose_latest_pt_links_to_a_checkpoint_not_there_now(tmp_path):
    """latest.pt a symbolic link to a checkpoint on a disk not mounted now: the run's stats and pictures stay."""
    run_steps(tmp_path / "run", 4)
    (tmp_path / "run" / "latest.pt").rename(tmp_path / "elsewhere.pt")
    (tmp_path / "run" / "latest.pt").symlink_to(tmp_path / "unmounted" / "latest.pt")
    stats = (tmp_path / "run" / "stats.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*add --resume"):
        run_steps(tmp_path / "run", 2)
    assert (tmp_path / "run" / "stats.jsonl").read_bytes() == stats
    assert (tmp_path / "run" / "latest.pt").is_symlink()


def test_a_new_run_refuses_a_folder_whose_files_it_would_overwrite_and_restarts_a_dead_start(tmp_path):
    """Snapshots of a run whose latest.pt was moved away, and a config.json that is not a run's (--out . in a
    project folder), stay as they were; a folder that holds only what a run wrote before its first checkpoint (it
    died) is started again."""
    moved = tmp_path / "moved"
    train(setup_run(MODEL, train_cfg(4, snapshot_every=2), DATA, RunOptions(out=moved, quiet=True)))
    (moved / "latest.pt").rename(tmp_path / "latest.pt.bak")
    snapshot = (moved / "step_0000002.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run's checkpoints \(step_0000004.pt and 1 more\) but no latest"):
        run_steps(moved, 2)
    assert (moved / "step_0000002.pt").read_bytes() == snapshot
    project = tmp_path / "project"
    project.mkdir()
    for text in ('{"name": "my project"}', '{"model": {"layers": 12}, "train": {"epochs": 3}}', "not json", "\udcff"):
        (project / "config.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ConfigError, match="config.json is not a began-fast run's: a new run would overwrite it"):
            run_steps(project, 2)
        assert (project / "config.json").read_text(errors="surrogateescape") == text
    run_steps(tmp_path / "dead", 2)
    logged = [row["step"] for row in reports.read_stats(tmp_path / "dead" / "stats.jsonl")]
    for checkpoint in (tmp_path / "dead").glob("*.pt"):  # as if it had died before its first checkpoint
        checkpoint.unlink()
    run_steps(tmp_path / "dead", 2)
    assert load_checkpoint(tmp_path / "dead" / "latest.pt")["step"] == 2
    # Its stats start afresh: the dead start's rows would stand beside the new run's, each step twice.
    assert [row["step"] for row in reports.read_stats(tmp_path / "dead" / "stats.jsonl")] == logged == [2, 2]


def test_a_run_folder_whose_names_are_taken_by_the_other_kind_is_refused_in_one_line(tmp_path):
    """A folder named stats.jsonl, or a file named samples, where a run writes: refused before anything is read or
    written, on a new run and on a resume (it was the OS's bare "[Errno 21] Is a directory" or "[Errno 17] File
    exists" at the first write). The names checked are all those a run writes."""
    run = tmp_path / "run"
    run_steps(run, 8)
    written = {path.name for path in run.iterdir() if not path.name.startswith("step_")}
    optional = set() if importlib.util.find_spec("tensorboard") else {"tensorboard"}  # the tensorboard extra
    assert written | optional == set(RUN_FILES) | set(RUN_FOLDERS)
    for name in RUN_FILES + RUN_FOLDERS:
        folder = tmp_path / f"new_{name}"
        folder.mkdir()
        if name in RUN_FILES:
            (folder / name).mkdir()
            said = f"{folder / name} is a folder, where the run writes its file {name}: move it away, or choose"
        else:
            (folder / name).write_text("not a folder")
            said = f"{folder / name} is a file, where the run writes its folder {name}/: move it away, or choose"
        with pytest.raises(ConfigError, match=re.escape(said)):
            run_steps(folder, 2)
        assert [path.name for path in folder.iterdir()] == [name]
    latest = (run / "latest.pt").read_bytes()
    shutil.rmtree(run / "samples")
    (run / "samples").write_text("not a folder")
    with pytest.raises(ConfigError, match="samples is a file, where the run writes its folder samples/"):
        run_steps(run, 10, resume=True)
    assert (run / "latest.pt").read_bytes() == latest


def test_a_celeba_folder_moved_under_another_name_is_cropped_as_the_run_was(tmp_path):
    """A CelebA folder is told by its name (img_align_celeba): a run resumed on it moved under another name took it
    for a plain folder and cropped the centred square, not the CelebA box, without a word (found by a data-path
    helper). The run saves the crop it takes and the resume keeps it; a resume on an HDF5 file, whose images are
    stored cropped, drops it (the file prepare_celeba made of the run's folder, say)."""
    write_celeba_like(tmp_path / "img_align_celeba", 8, seed=1)
    folder = DataConfig(path=str(tmp_path / "img_align_celeba"), num_workers=0)
    out = tmp_path / "run"
    train(setup_run(MODEL, train_cfg(2, eval_every=0), folder, RunOptions(out=out, quiet=True)))
    assert json.loads((out / "config.json").read_text())["data"]["crop"] == "celeba"
    (tmp_path / "img_align_celeba").rename(tmp_path / "faces")
    resume = lambda steps, data: setup_run(  # noqa: E731
        MODEL,
        train_cfg(steps, eval_every=0),
        data,
        RunOptions(out=out, resume=True, quiet=True),
        explicit={"train": {"steps", "eval_every"}, "data": {"path"}},
    )
    moved = resume(4, DataConfig(path=str(tmp_path / "faces"), num_workers=0))
    assert moved.data_cfg.crop == "celeba"
    train(moved)
    prepared = DataConfig(path=str(write_h5(tmp_path / "faces16.h5", draw_faces(8, 16, seed=1))), num_workers=0)
    on_the_file = resume(6, prepared)
    assert (on_the_file.data_cfg.crop, on_the_file.data_cfg.crop_size) == (None, None)
    train(on_the_file)
    assert load_checkpoint(out / "latest.pt")["step"] == 6


def test_a_resume_says_which_damaged_lines_of_its_stats_it_does_not_keep(tmp_path):
    """The resume rewrites stats.jsonl with the rows up to its checkpoint: a line damaged in the middle is not written
    back, and is said (it was dropped without a word); the rows around it stay."""
    run_steps(tmp_path, 4)
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    (tmp_path / "stats.jsonl").write_text("\n".join([lines[0], "\x00" * 12, *lines[1:]]) + "\n")
    with pytest.warns(UserWarning, match=r"stats.jsonl: skipped line 2, not a stats row$"):
        run_steps(tmp_path, 6, resume=True)
    assert [row["step"] for row in reports.read_stats(tmp_path / "stats.jsonl") if "m" in row] == [2, 4, 6]


def test_resume_drops_what_was_written_after_the_checkpoint(tmp_path):
    """A run that died after logging step 6 and drawing a grid at step 12, mid-way through writing a stats row,
    before it checkpointed: the resume logs step 6 anew, once, and its progress strip ends at its own last grid."""
    run_steps(tmp_path, 4)
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "m": 0.5}) + '\n{"step": 7, "l_re')
    shutil.copy(tmp_path / "samples" / "step_0000004.png", tmp_path / "samples" / "step_0000012.png")
    run_steps(tmp_path, 8, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "swd" not in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8] and logged[2]["m"] != 0.5
    # Evaluated every 8 steps and at a run's last step: the first run's 4th, whose row the resume keeps.
    assert [r["step"] for r in rows if "swd" in r] == [4, 8]
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [4, 8]


@pytest.mark.parametrize("start", [0, 4], ids=["dead-start", "dead-resume"])
def test_a_restart_shows_no_picture_of_the_steps_it_drops(tmp_path, monkeypatch, start):
    """A run that drew its pictures at step 12 and died before checkpointing it (its last checkpoint at step 4, or
    none: a dead start): until the run started again draws its own, its strip, GIF and convergence plot show the
    steps it keeps and no later one, and no reconstruction grid of a dropped step stands."""
    run_steps(tmp_path, 4)
    grids = tmp_path / "samples"
    shutil.copy(grids / "step_0000004.png", grids / "step_0000012.png")
    reports.update_progress(tmp_path)  # the strip and the GIF end at step 12
    for name in ("reconstruction.png", "convergence.png"):
        (tmp_path / name).write_bytes(b"drawn at step 12")
    (tmp_path / train_module.PICTURES_RECORD).write_text('{"step": 12}')
    if start == 0:
        for checkpoint in tmp_path.glob("*.pt"):
            checkpoint.unlink()
    monkeypatch.setattr(train_module, "write_pictures", lambda *args: None)  # the restart draws none of its own
    run_steps(tmp_path, start + 2, resume=start > 0)
    if start == 0:
        assert [name for name in train_module.DRAWN_WITH_THE_GRIDS if (tmp_path / name).exists()] == []
        return
    assert not (tmp_path / "reconstruction.png").exists()
    # The record of pictures comes back to the checkpoint's step: at 12, a kill of the resumed run between step 8's
    # grid and the pictures after it would count step 8's pictures as written (README: as never made).
    assert json.loads((tmp_path / train_module.PICTURES_RECORD).read_text()) == {"step": start}
    (grids / "step_0000008.png").write_bytes(b"a grid")
    assert not train_module.pictures_written(tmp_path, 8)
    (grids / "step_0000008.png").unlink()
    kept = tmp_path / "kept"
    (kept / "samples").mkdir(parents=True)
    shutil.copy(grids / "step_0000004.png", kept / "samples")
    reports.update_progress(kept)
    rows = [row for row in reports.read_stats(tmp_path / "stats.jsonl") if row["step"] <= start]
    reports.plot_convergence(rows, kept / "convergence.png")
    for name in ("progress.png", "progress.gif", "convergence.png"):
        assert (tmp_path / name).read_bytes() == (kept / name).read_bytes(), name


@pytest.mark.parametrize("died", [False, True], ids=["after-its-pictures", "between-checkpoint-and-evaluation"])
def test_a_resume_makes_the_evaluation_and_pictures_its_checkpoints_step_missed(tmp_path, monkeypatch, died):
    """A run killed after the checkpoint of an evaluation step and before its evaluation and pictures (or stopped by
    a failure in them): the resume makes them, as the uninterrupted run did, with the vanishing residual's carry of
    that step's last update (1/8 apart from the next step's here), and a run that made them gets no second ones."""
    model = dataclasses.replace(MODEL, vanishing_residual=True, carry_steps=8)
    run = lambda folder, steps, resume=False: train(  # noqa: E731
        setup_run(model, train_cfg(steps, eval_every=4), DATA, RunOptions(out=folder, resume=resume, quiet=True))
    )
    run(tmp_path / "whole", 8)
    split = tmp_path / "split"
    if died:
        evaluate = train_module.evaluate

        def dying_evaluation(run, *args):
            if run.step.steps_done == 4:
                raise RuntimeError("killed")
            evaluate(run, *args)

        monkeypatch.setattr(train_module, "evaluate", dying_evaluation)
        with pytest.raises(RuntimeError, match="killed"):
            run(split, 8)
        monkeypatch.setattr(train_module, "evaluate", evaluate)
        assert load_checkpoint(split / "latest.pt")["step"] == 4 and reports.sample_frames(split) == []
    else:
        run(split, 4)
    run(split, 8, resume=True)
    assert reports.read_stats(split / "stats.jsonl") == reports.read_stats(tmp_path / "whole" / "stats.jsonl")
    frames = [reports.sample_frames(folder) for folder in (tmp_path / "whole", split)]
    assert [step for step, _ in frames[1]] == [4, 8]
    for (_, whole), (_, resumed) in zip(*frames, strict=True):
        assert whole.read_bytes() == resumed.read_bytes()


@pytest.mark.parametrize("fails_in", ["update_progress", "save_reconstruction_grid", "plot_convergence"])
def test_a_run_whose_last_pictures_failed_after_their_sample_grid_gets_them_all_from_the_same_resume(
    tmp_path, monkeypatch, fails_in
):
    """A step's pictures are its sample grid, the progress strip and GIF, the reconstructions and the convergence
    plot, written one after the other (the GIF takes most of a second at 60 grids): a run killed, or failing on a
    full disk, after its last step's grid and before the rest gets them all from the same --resume command, and ends
    with the pictures of a run never failed. (The grid alone told that the step was drawn: the resume was refused as
    a finished run's, and the strip, reconstructions and plot stayed those of step 4.)"""
    run = lambda folder, resume=False: train(  # noqa: E731
        setup_run(MODEL, train_cfg(6, eval_every=4), DATA, RunOptions(out=folder, resume=resume, quiet=True))
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(whole)
    original, calls = getattr(reports, fails_in), []

    def full_disk_at_step_6(*args, **kwargs):  # its second call: step 4's pictures, then step 6's
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(reports, fails_in, full_disk_at_step_6)
    with pytest.raises(OSError, match="No space left on device"):
        run(split)
    monkeypatch.setattr(reports, fails_in, original)
    run(split, resume=True)
    assert reports.read_stats(split / "stats.jsonl") == reports.read_stats(whole / "stats.jsonl")
    frames = [reports.sample_frames(folder) for folder in (whole, split)]
    assert [step for step, _ in frames[1]] == [4, 6]
    for (_, a), (_, b) in zip(*frames, strict=True):
        assert a.read_bytes() == b.read_bytes()
    for picture in ("progress.png", "progress.gif", "reconstruction.png", "convergence.png"):
        assert (split / picture).read_bytes() == (whole / picture).read_bytes(), picture
    assert [path.name for path in (split / "samples").iterdir() if path.name.startswith(".")] == []


@pytest.mark.parametrize(
    "record, written",
    [(None, True), ('{"step": 6}', True), ('{"step": 8}', True), ('{"step": 4}', False), ("{damaged", False)],
    ids=["a-run-from-before-the-record", "at-the-step", "at-a-later-step", "at-an-earlier-step", "damaged"],
)
def test_a_steps_pictures_are_written_when_its_grid_is_and_the_record_reached_it(tmp_path, record, written):
    """Step 6's pictures are all written when its sample grid is and the record of the last finished pictures is at
    6 or later; a folder without a record (a run from before it) goes by the grid alone; a damaged record means
    drawing them again. Without the grid they are never written."""
    (tmp_path / "samples").mkdir()
    if record is not None:
        (tmp_path / train_module.PICTURES_RECORD).write_text(record)
    assert not train_module.pictures_written(tmp_path, 6)
    (tmp_path / "samples" / "step_0000006.png").write_bytes(b"a grid")
    assert train_module.pictures_written(tmp_path, 6) == written


def test_a_new_run_drops_the_record_of_a_dead_starts_pictures(tmp_path, monkeypatch):
    """A run that died before its first checkpoint is started again in its folder: its record of pictures (of a
    step the new run has not drawn yet) is not the new run's, and would hide pictures a kill of the new run left
    unfinished."""
    (tmp_path / train_module.PICTURES_RECORD).write_text('{"step": 8}')
    monkeypatch.setattr(train_module, "write_pictures", lambda *args: None)
    train(setup_run(MODEL, train_cfg(2), DATA, RunOptions(out=tmp_path, quiet=True)))
    assert not (tmp_path / train_module.PICTURES_RECORD).exists()


def test_a_run_killed_while_it_writes_a_snapshot_writes_it_when_resumed(tmp_path, monkeypatch):
    """Killed in the write of step 8's snapshot, a run resumed ends with the snapshots and latest.pt of one never
    killed (a checkpoint helper: latest.pt was written first, so the resume went on from step 8 without it)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_steps(whole, 12)

    class Killed(BaseException):
        pass

    def killed_in_the_snapshot(path, state):
        if Path(path).name == "step_0000008.pt":
            raise Killed
        save_checkpoint(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_in_the_snapshot)
    with pytest.raises(Killed):
        run_steps(split, 12)
    monkeypatch.undo()
    run_steps(split, 12, resume=True)
    snapshots = sorted(path.name for path in split.glob("step_*.pt"))
    assert snapshots == sorted(path.name for path in whole.glob("step_*.pt")) == ["step_0000008.pt"]
    for name in ("step_0000008.pt", "latest.pt"):
        got, want = (load_checkpoint(folder / name) for folder in (split, whole))
        assert got["step"] == want["step"] and all(torch.equal(got["G"][k], v) for k, v in want["G"].items())


@pytest.mark.parametrize("steps_again", [6, 10], ids=["same-steps", "more-steps"])
@pytest.mark.parametrize("dies_in", ["evaluate", "write_pictures"])
def test_a_run_killed_after_its_last_checkpoint_gets_its_last_steps_evaluation_and_pictures(
    tmp_path, monkeypatch, capsys, dies_in, steps_again
):
    """A run of 6 steps killed after its last checkpoint, in the evaluation or the pictures of its last step (off
    their schedules of 4, made because it is the last): --resume with the same --steps makes what it lacks, and
    nothing else, then refuses to run again; with more steps it makes them before training on. Either way the
    record is a run's never killed (the carry of that step: vanishing residual)."""
    model = dataclasses.replace(MODEL, vanishing_residual=True, carry_steps=8)
    run = lambda folder, steps, resume=False: train(  # noqa: E731
        setup_run(model, train_cfg(steps, eval_every=4), DATA, RunOptions(out=folder, resume=resume, quiet=True))
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(whole, 6)
    if steps_again > 6:
        run(whole, steps_again, resume=True)
    original = getattr(train_module, dies_in)

    def dying(run, *args):
        if run.step.steps_done == 6:
            raise RuntimeError("killed")
        original(run, *args)

    monkeypatch.setattr(train_module, dies_in, dying)
    with pytest.raises(RuntimeError, match="killed"):
        run(split, 6)
    monkeypatch.setattr(train_module, dies_in, original)
    assert load_checkpoint(split / "latest.pt")["step"] == 6
    assert [step for step, _ in reports.sample_frames(split)] == [4]
    capsys.readouterr()
    run(split, steps_again, resume=True)
    said = "its last step, 6, is done: this writes that step's evaluation or pictures, which the run never wrote"
    assert (said in capsys.readouterr().err) == (steps_again == 6)
    assert reports.read_stats(split / "stats.jsonl") == reports.read_stats(whole / "stats.jsonl")
    frames = [reports.sample_frames(folder) for folder in (whole, split)]
    assert [step for step, _ in frames[1]] == [4, 6, 8, 10][: 2 if steps_again == 6 else 4]
    for (_, a), (_, b) in zip(*frames, strict=True):
        assert a.read_bytes() == b.read_bytes()
    if steps_again == 6:
        with pytest.raises(ConfigError, match="has done its 6 steps: give --steps above 6"):
            run(split, 6, resume=True)


@pytest.mark.parametrize("steps_again", [6, 10], ids=["steps-at-its-checkpoint", "its-own-steps"])
def test_a_resume_from_a_checkpoint_off_the_schedules_ends_as_a_run_of_the_steps_it_is_given(
    tmp_path, monkeypatch, steps_again
):
    """A run of 10 steps killed after its checkpoint of step 6, resumed with --steps 6: step 6 is now its last, and
    gets the evaluation and pictures a 6-step run makes there (off their schedules of 4). Resumed with its 10 steps,
    step 6 is neither its last nor the last of the run that wrote it: no evaluation or pictures there, as in a run
    of 10 steps never killed."""
    run = lambda folder, steps, resume=False: train(  # noqa: E731
        setup_run(
            MODEL,
            train_cfg(steps, eval_every=4, checkpoint_every=2),
            DATA,
            RunOptions(out=folder, resume=resume, quiet=True),
            explicit={"train": {"steps"}},
        )
    )
    run(tmp_path / "whole", steps_again)
    write_checkpoint = train_module.write_checkpoint

    def dying_after_checkpoint(run):
        written = write_checkpoint(run)
        if run.step.steps_done == 6:
            raise RuntimeError("killed")
        return written

    monkeypatch.setattr(train_module, "write_checkpoint", dying_after_checkpoint)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "split", 10)
    monkeypatch.setattr(train_module, "write_checkpoint", write_checkpoint)
    run(tmp_path / "split", steps_again, resume=True)
    made_at = [4, 6] if steps_again == 6 else [4, 8, 10]
    stats = [reports.read_stats(tmp_path / name / "stats.jsonl") for name in ("whole", "split")]
    assert stats[0] == stats[1] and [row["step"] for row in stats[1] if "swd" in row] == made_at
    frames = [reports.sample_frames(tmp_path / name) for name in ("whole", "split")]
    assert [step for step, _ in frames[1]] == made_at
    for (_, a), (_, b) in zip(*frames, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_a_finished_run_that_made_no_evaluations_owes_none_at_its_last_step(tmp_path):
    """A run of 4 steps without evaluations, resumed for 4 more with --eval-every 2: its evaluations start after the
    checkpoint, as they would have on a resume from the middle of a run (step 4 was no evaluation step of the run
    that wrote it), and the same resume with --steps 4 has nothing to make."""
    run = lambda steps, resume=False, **given: train(  # noqa: E731
        setup_run(
            MODEL,
            train_cfg(steps, **given),
            DATA,
            RunOptions(out=tmp_path, resume=resume, quiet=True),
            explicit={"train": {"steps", *given}},
        )
    )
    run(4, eval_every=0)
    with pytest.raises(ConfigError, match="has done its 4 steps: give --steps above 4"):
        run(4, resume=True, eval_every=2)
    run(8, resume=True, eval_every=2)
    assert [row["step"] for row in reports.read_stats(tmp_path / "stats.jsonl") if "swd" in row] == [6, 8]


@pytest.mark.parametrize(
    "killed_at, resumed_with, swd_at, grids_at",
    [
        (4, dict(sample_every=3, eval_every=3), [4, 6, 9, 10], [4, 6, 9, 10]),
        (6, dict(sample_every=3, eval_every=3), [4, 9, 10], [4, 9, 10]),
        (4, dict(eval_every=0), [], [4, 8, 10]),
    ],
    ids=["on-the-old-schedule-only", "on-the-new-schedule-only", "evaluations-turned-off"],
)
def test_a_resume_with_new_schedules_makes_what_the_old_ones_owed_at_its_checkpoint(
    tmp_path, monkeypatch, killed_at, resumed_with, swd_at, grids_at
):
    """A run evaluating and drawing every 4 steps, killed after its checkpoint of step `killed_at` and before that
    step's evaluation and pictures, resumed with other --sample-every/--eval-every: the checkpoint's step owes what
    the killed run's schedule made there (step 4), not what the new one would (step 6: the new schedule's steps come
    after the checkpoint's), and no evaluation where the resume makes none. (Judged by the new schedule, step 4's
    grid was never made, and step 6 got one no schedule asked for.)"""
    write_checkpoint = train_module.write_checkpoint

    def dying_after_checkpoint(run):
        written = write_checkpoint(run)
        if run.step.steps_done == killed_at:
            raise RuntimeError("killed")
        return written

    monkeypatch.setattr(train_module, "write_checkpoint", dying_after_checkpoint)
    with pytest.raises(RuntimeError, match="killed"):
        train(
            setup_run(
                MODEL, train_cfg(10, eval_every=4, checkpoint_every=2), DATA, RunOptions(out=tmp_path, quiet=True)
            )
        )
    monkeypatch.setattr(train_module, "write_checkpoint", write_checkpoint)
    train(
        setup_run(
            MODEL,
            train_cfg(10, checkpoint_every=2, **resumed_with),
            DATA,
            RunOptions(out=tmp_path, resume=True, quiet=True),
            explicit={"train": {"steps", *resumed_with}},
        )
    )
    assert [row["step"] for row in reports.read_stats(tmp_path / "stats.jsonl") if "swd" in row] == swd_at
    assert [step for step, _ in reports.sample_frames(tmp_path)] == grids_at


def test_resume_checks_the_settings_given_again(tmp_path):
    run_steps(tmp_path, 4)
    changed = dataclasses.replace(train_cfg(8), batch_size=2, log_every=4)
    options = RunOptions(out=tmp_path, resume=True, quiet=True)
    with pytest.raises(ConfigError, match="train setting batch_size is 4, not 2"):
        setup_run(MODEL, changed, DATA, options, explicit={"train": {"steps", "batch_size"}})
    run = setup_run(MODEL, changed, DATA, options, explicit={"train": {"steps", "log_every"}})  # these may change
    assert run.train_cfg.log_every == 4 and run.train_cfg.steps == 8 and run.train_cfg.batch_size == 4


def test_a_refused_resume_changes_nothing_in_the_run(tmp_path):
    """--steps at or below the checkpoint's step is refused (it used to do nothing, exit 0 and record the smaller
    count); a resume refused at its data checks leaves config.json as it was."""
    run_steps(tmp_path, 4)
    config = (tmp_path / "config.json").read_bytes()
    options = RunOptions(out=tmp_path, resume=True, quiet=True)
    for steps, where in ((2, "is at step 4, already past --steps 2"), (4, "has done its 4 steps")):
        with pytest.raises(ConfigError, match=f"^the run in {re.escape(str(tmp_path))} {where}: give --steps above 4"):
            setup_run(MODEL, train_cfg(steps), DATA, options, explicit={"train": {"steps"}})
    run = setup_run(MODEL, train_cfg(8, eval_images=65), DATA, options, explicit={"train": {"steps", "eval_images"}})
    with pytest.raises(ConfigError, match="--eval-images 65"):
        train(run)
    assert (tmp_path / "config.json").read_bytes() == config


def test_a_resume_on_a_changed_image_folder_says_so(tmp_path, capsys):
    write_faces(tmp_path / "faces", range(16))
    data = DataConfig(path=str(tmp_path / "faces"), crop="center", num_workers=0)
    run = setup_run(MODEL, train_cfg(2), data, RunOptions(out=tmp_path / "run", quiet=True))
    train(run)
    options = RunOptions(out=tmp_path / "run", resume=True, quiet=True)
    train(setup_run(MODEL, train_cfg(4), data, options, explicit={"train": {"steps"}}))
    assert "warning" not in capsys.readouterr().err  # the same 16 images
    write_faces(tmp_path / "faces", range(16, 18))
    train(setup_run(MODEL, train_cfg(6), data, options, explicit={"train": {"steps"}}))
    assert "warning: the data set now holds 18 training images, the run read 16 before its checkpoint" in (
        capsys.readouterr().err
    )


def test_a_run_killed_between_latest_and_its_snapshot_makes_the_snapshot_when_resumed(tmp_path, monkeypatch, capsys):
    """write_checkpoint wrote a snapshot step's snapshot first: a first checkpoint killed between its two writes left
    a snapshot without latest.pt, which --resume refused until the user copied it. latest.pt now comes first, and the
    resume copies it, the same state, to the snapshot the run was killed before writing."""
    written = []
    save = train_module.save_checkpoint
    monkeypatch.setattr(
        train_module, "save_checkpoint", lambda path, state: [written.append(path.name), save(path, state)]
    )
    run_steps(tmp_path, 8)
    assert written == ["latest.pt", "latest.pt", "step_0000008.pt"]
    (tmp_path / "step_0000008.pt").unlink()  # the run killed between the two writes at step 8
    latest = (tmp_path / "latest.pt").read_bytes()
    run_steps(tmp_path, 10, resume=True, quiet=False)
    assert (tmp_path / "step_0000008.pt").read_bytes() == latest
    said = "  wrote the snapshot step_0000008.pt the run never wrote: a copy of latest.pt, its step's state\n"
    assert said in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_0000008.pt"]  # none for a step off schedule


def test_a_resume_checks_the_runs_saved_workers_on_this_machine(tmp_path, monkeypatch):
    """--workers is checked where it is given; a resume kept the checkpoint's unchecked, so a run saved with --workers
    64 and resumed on a machine (or a number of ranks) allowing fewer started 64 per rank (found by a diff review)."""
    run_steps(tmp_path, 2)
    state = load_checkpoint(tmp_path / "latest.pt")
    state["data_config"]["num_workers"] = 64
    save_checkpoint(tmp_path / "latest.pt", state)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    options = RunOptions(out=tmp_path, resume=True, quiet=True)
    with pytest.raises(ConfigError) as refused:
        setup_run(MODEL, train_cfg(4), DATA, options)
    assert str(refused.value) == (
        "the run's saved --workers must be in [0, 8] (4 per core), got 64: give --workers anew"
    )
    given = {"train": {"steps"}, "data": {"num_workers"}}
    assert setup_run(MODEL, train_cfg(4), DATA, options, explicit=given).data_cfg.num_workers == 0


def test_a_resume_on_other_images_of_the_same_number_says_so(tmp_path, capsys):
    """--data on a resume naming another data set of the same size went on without a word (only a changed count was
    told); a copy of the same images elsewhere is the same data, and says nothing."""
    write_faces(tmp_path / "faces", range(16))
    data = DataConfig(path=str(tmp_path / "faces"), crop="center", num_workers=0)
    train(setup_run(MODEL, train_cfg(2), data, RunOptions(out=tmp_path / "run", quiet=True)))
    shutil.copytree(tmp_path / "faces", tmp_path / "copy")
    options = RunOptions(out=tmp_path / "run", resume=True, quiet=True)
    given = {"train": {"steps"}, "data": {"path"}}
    train(
        setup_run(MODEL, train_cfg(4), dataclasses.replace(data, path=str(tmp_path / "copy")), options, explicit=given)
    )
    assert "warning" not in capsys.readouterr().err
    write_faces(tmp_path / "other", range(16, 32))
    train(
        setup_run(MODEL, train_cfg(6), dataclasses.replace(data, path=str(tmp_path / "other")), options, explicit=given)
    )
    assert (
        "  warning: the data set's training images are not the ones the run read before its checkpoint (their files' "
        "names, or the first, middle or last image, differ): it goes on, training on other data\n"
    ) in capsys.readouterr().err
    # The warning is about the checkpoint's data: the next resume, on the same other data, says nothing.
    train(
        setup_run(MODEL, train_cfg(8), dataclasses.replace(data, path=str(tmp_path / "other")), options, explicit=given)
    )
    assert "warning" not in capsys.readouterr().err


def test_a_resume_whose_data_moved_says_to_give_data_again(tmp_path):
    """The run's image folder moved: the resume said only "data path ... does not exist; expected an image folder or
    an HDF5 file", not that --data may name it where it is now (README: --data may be given anew on --resume)."""
    write_faces(tmp_path / "faces", range(16))
    data = DataConfig(path=str(tmp_path / "faces"), crop="center", num_workers=0)
    train(setup_run(MODEL, train_cfg(2), data, RunOptions(out=tmp_path / "run", quiet=True)))
    (tmp_path / "faces").rename(tmp_path / "moved")
    options = RunOptions(out=tmp_path / "run", resume=True, quiet=True)
    with pytest.raises(ConfigError) as refused:
        setup_run(MODEL, train_cfg(4), DataConfig(), options, explicit={"train": {"steps"}})
    assert str(refused.value) == (
        f"the run's data {tmp_path / 'faces'} is not there any more; if it moved, resume with --data naming where it "
        "is now"
    )
    # --data given anew, naming a path that is not there either (a typo): that path is what is missing.
    typo = tmp_path / "mvoed"
    given = {"train": {"steps"}, "data": {"path"}}
    with pytest.raises(DataError, match=f"^data path {re.escape(str(typo))} does not exist"):
        setup_run(MODEL, train_cfg(4), DataConfig(path=str(typo)), options, explicit=given)
    moved = DataConfig(path=str(tmp_path / "moved"))
    train(setup_run(MODEL, train_cfg(4), moved, options, explicit={"train": {"steps"}, "data": {"path"}}))
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["step"] == 4


def test_a_resume_of_a_run_on_the_built_in_faces_refuses_other_data(tmp_path):
    """--data on resume names the run's data moved; the built-in faces have no files to move: a path there is
    other data, refused with one line before anything changes."""
    run_steps(tmp_path / "run", 2)
    write_faces(tmp_path / "faces", range(8))
    data = DataConfig(path=str(tmp_path / "faces"), num_workers=0)
    options = RunOptions(out=tmp_path / "run", resume=True, quiet=True)
    with pytest.raises(ConfigError) as refused:
        setup_run(MODEL, train_cfg(4), data, options, explicit={"train": {"steps"}, "data": {"path"}})
    assert str(refused.value) == (
        f"--resume continues the saved run, which trained on the built-in faces: --data {tmp_path / 'faces'} may "
        "name the run's data moved, not other data; leave it out, or start a new run in another --out"
    )


def write_faces(folder: Path, numbers) -> None:
    """Built-in faces (16 px PNGs) as numbered files in `folder`."""
    folder.mkdir(exist_ok=True)
    faces = BuiltinFaces(max(numbers) + 1, 16, seed=0).as_uint8().permute(0, 2, 3, 1).numpy()
    for i in numbers:
        Image.fromarray(faces[i]).save(folder / f"{i:03d}.png")


def test_a_run_folder_inside_its_image_folder_is_refused(tmp_path):
    (tmp_path / "faces").mkdir()
    with pytest.raises(ConfigError, match="lies inside the data folder .*: the run's pictures would become training"):
        setup_run(
            MODEL, train_cfg(4), DataConfig(path=str(tmp_path / "faces")), RunOptions(out=tmp_path / "faces" / "run")
        )
    # A CelebA folder given by its parent reads only img_align_celeba: a run folder beside it is outside.
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    celeba = DataConfig(path=str(tmp_path / "celeba"))
    beside = setup_run(MODEL, train_cfg(4), celeba, RunOptions(out=tmp_path / "celeba" / "runs" / "a"))
    assert beside.step.steps_done == 0
    with pytest.raises(ConfigError, match="lies inside the data folder .*img_align_celeba"):
        setup_run(MODEL, train_cfg(4), celeba, RunOptions(out=tmp_path / "celeba" / "img_align_celeba" / "run"))


def test_a_new_run_removes_the_grids_of_a_run_that_died_before_its_first_checkpoint(tmp_path):
    (tmp_path / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "step_0000007.png")
    run_steps(tmp_path, 8)
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [4, 8]


def test_too_many_evaluation_images_fail_before_the_first_step_and_leave_no_run_folder(tmp_path):
    out = tmp_path / "run"
    run = setup_run(MODEL, train_cfg(4, eval_images=65), DATA, RunOptions(out=out, quiet=True))
    with pytest.raises(ConfigError, match="--eval-images 65 needs that many real images, the data set holds 64"):
        train(run)
    assert run.step.steps_done == 0 and not out.exists()


def test_a_full_disk_at_a_checkpoint_is_one_clear_error_and_keeps_the_last_one(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError with the OSError as its context: the run ends with an
    OSError naming the file and the cause (one line in the CLI), the checkpoint before stays whole, no temporary
    file is left, and one left by a killed run is removed by the next start; another program's stays."""
    import began_fast.atomic_files as atomic_files

    run_steps(tmp_path, 4)
    good = (tmp_path / "latest.pt").read_bytes()
    killed = tmp_path / f".latest.pt.killed{atomic_files.TEMPORARY_SUFFIX}"
    killed.write_bytes(b"half a checkpoint")
    killed_grid = tmp_path / "samples" / f".step_0000008.png.killed{atomic_files.TEMPORARY_SUFFIX}"
    killed_grid.write_bytes(b"half a sample grid")
    (tmp_path / ".notes.txt.tmp").write_text("an editor's file in a run folder given as --out .")
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        """A file on a disk that fills up after `room` bytes."""

        def __init__(self, fd):
            self.file, self.room = real_fdopen(fd, "wb"), room

        def writable(self):
            return True

        def fileno(self):
            return self.file.fileno()

        def flush(self):
            self.file.flush()

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def close(self):
            super().close()
            self.file.close()

    monkeypatch.setattr(atomic_files.os, "fdopen", lambda fd, mode: FullDisk(fd))
    room = 10_000  # full in the middle of the checkpoint
    # Said as any file's full disk is (a checkpoint helper: it read "cannot write checkpoint X: [Errno 28] ..."),
    # and about latest.pt, written before step 8's snapshot.
    with pytest.raises(OSError, match=r"^\[Errno 28\] cannot write .*/latest\.pt: No space left on device$"):
        run_steps(tmp_path, 8, resume=True)
    assert (tmp_path / "latest.pt").read_bytes() == good and not (tmp_path / "step_0000008.pt").exists()
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".notes.txt.tmp"]
    assert not killed_grid.exists()


def test_a_checkpoint_reaches_the_disk_before_its_name_and_the_name_before_the_write_returns(tmp_path, monkeypatch):
    """atomic_write syncs the whole temporary file, renames it over the checkpoint, then syncs the folder: a power
    loss leaves the old checkpoint or the whole new one, never the new name on missing data."""
    from began_fast.checkpoint import save_checkpoint

    path = tmp_path / "run" / "latest.pt"
    save_checkpoint(path, {"step": 3, "fixed_z": torch.rand(8, 4)})
    events, fsync, replace = [], os.fsync, os.replace
    synced = lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))  # noqa: E731
    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b)))
    fixed_z = torch.rand(8, 4) * 2 - 1
    save_checkpoint(path, {"step": 7, "fixed_z": fixed_z})
    [(_, temporary), *_] = events
    assert Path(temporary).parent == path.parent and temporary.endswith(".began-fast.tmp")
    assert events == [("fsync", temporary), ("replace", temporary, str(path)), ("fsync", str(path.parent))]
    assert torch.equal(torch.load(path)["fixed_z"], fixed_z)


def test_a_small_files_bytes_reach_the_disk_before_its_name(tmp_path, monkeypatch):
    """A few hundred bytes (config.json, a line of stats) sit in the file object's buffer: they are written out before
    the temporary file is synced, or the sync would leave the new name on an empty file after a power loss."""
    from began_fast.atomic_files import atomic_write

    sizes, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (sizes.append(os.fstat(fd).st_size), fsync(fd)))
    text = os.urandom(300)
    atomic_write(tmp_path / "config.json", lambda f: f.write(text))
    assert sizes[0] == len(text) and (tmp_path / "config.json").read_bytes() == text


@pytest.mark.parametrize(
    "failure, raised",
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"^\[Errno 28\] cannot write .*stats\.jsonl: No space left"),
        (KeyboardInterrupt(), r"^$"),
    ],
    ids=["full-disk", "ctrl-c"],
)
def test_a_write_cut_short_names_its_file_and_leaves_the_old_one_and_no_temporary(tmp_path, failure, raised):
    """A full disk in any atomic write (stats, reports, pictures) is an OSError naming the file, not the temporary
    one or none; a Ctrl-C mid-write ends it as well: the old file whole, its temporary removed at once (a
    checkpoint's can be hundreds of MB), not left for the next start to find."""
    from began_fast.atomic_files import atomic_write

    path = tmp_path / "stats.jsonl"
    old = os.urandom(1000)
    path.write_bytes(old)

    def write(f):
        f.write(os.urandom(5000))
        raise failure

    with pytest.raises(type(failure), match=raised) as stopped:
        atomic_write(path, write)
    assert getattr(stopped.value, "errno", None) == getattr(failure, "errno", None)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["stats.jsonl"]


def test_a_write_into_a_folder_that_is_a_file_says_so(tmp_path):
    """A run folder's samples/ made a file by hand: the write names its file and what is in the way (a checkpoint
    helper: it was mkdir's "[Errno 17] File exists: '.../samples'")."""
    from began_fast.atomic_files import atomic_write

    (tmp_path / "samples").write_text("not a folder")
    path = tmp_path / "samples" / "step_0000004.png"
    said = rf"^\[Errno 20\] cannot write {re.escape(str(path))}: .*samples is a file, not a folder$"
    with pytest.raises(OSError, match=said):
        atomic_write(path, lambda f: f.write(b"grid"))
    (tmp_path / "samples").unlink()
    (tmp_path / "samples").symlink_to(tmp_path / "unmounted" / "samples")  # a link to a disk not mounted now
    with pytest.raises(OSError, match=r"samples is a link to a folder that is not there$"):
        atomic_write(path, lambda f: f.write(b"grid"))


def test_a_write_into_a_read_only_folder_names_its_file_not_the_temporary(tmp_path, monkeypatch):
    """The temporary file is created before the write: in a read-only folder the system's error named it
    ("Permission denied: '.../.config.json.plly9hs9.began-fast.tmp'"), a name the user never gave."""
    from began_fast import atomic_files

    def read_only(dir, prefix, suffix):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(atomic_files.tempfile, "mkstemp", read_only)
    path = tmp_path / "config.json"
    with pytest.raises(OSError, match=rf"^\[Errno 13\] cannot write {re.escape(str(path))}: Permission denied$"):
        atomic_files.atomic_write(path, lambda f: f.write(b"{}"))


def test_a_resume_into_a_read_only_run_folder_is_refused_before_its_first_step(tmp_path, monkeypatch):
    """A samples/ (or run folder) made read-only since: the resume refused the first picture after its steps were
    computed. Refused before the first step now, with the run's files as they were."""
    run_steps(tmp_path, 4)
    before = {name: (tmp_path / name).read_bytes() for name in ("latest.pt", "config.json", "stats.jsonl")}
    temporary_file = train_module.tempfile.TemporaryFile

    def read_only_samples(dir, **kwargs):
        if Path(dir) == tmp_path / "samples":
            raise PermissionError(errno.EACCES, "Permission denied")
        return temporary_file(dir=dir, **kwargs)

    monkeypatch.setattr(train_module.tempfile, "TemporaryFile", read_only_samples)
    said = f"cannot write into the run folder --out {tmp_path}: {tmp_path / 'samples'} (Permission denied)"
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        run_steps(tmp_path, 8, resume=True)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("of", [None, "grid.png"], ids=["folder", "file"])
def test_the_temporary_a_killed_write_leaves_is_one_the_next_start_removes(tmp_path, of):
    """atomic_write's temporary files are named as remove_stale_temporaries looks for them: for the whole folder (a
    new training start) and for the one file (sample.py's grid.png); other programs' files stay."""
    from began_fast.atomic_files import atomic_write, remove_stale_temporaries

    temporaries = []

    def write(f):
        temporaries.append(Path(os.readlink(f"/proc/self/fd/{f.fileno()}")))
        f.write(os.urandom(100))

    atomic_write(tmp_path / "grid.png", write)
    temporaries[0].write_bytes(os.urandom(50))  # what a SIGKILL mid-write would have left
    (tmp_path / ".notes.txt.swp").write_bytes(b"an editor's")
    remove_stale_temporaries(tmp_path, of=of)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.swp", "grid.png"]


def test_a_failing_evaluation_keeps_its_steps_checkpoint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise MetricError("broken evaluation")

    monkeypatch.setattr(metrics, "evaluate_models", broken)
    with pytest.raises(MetricError):
        run_steps(tmp_path, 8)
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 8


def test_pictures_are_written_while_training_goes_on(tmp_path, monkeypatch):
    """The sample step's files are encoded on a background thread (the GIF alone takes most of a second at 60
    grids): here the step-4 pictures cannot finish before step 7 is trained. At the end every picture is there, and
    the plot holds the rows up to its own step, not the step-6 row logged meanwhile. Tensors become pixels on the
    loop's thread: torch ops on the pictures' thread slowed the CPU training after it by a third."""
    steps_done, plotted, threads = threading.Event(), [], []
    real_update, real_plot, real_pixels = reports.update_progress, reports.plot_convergence, reports.to_uint8_hwc
    monkeypatch.setattr(reports, "to_uint8_hwc", lambda x: threads.append(threading.current_thread()) or real_pixels(x))

    def update_after_three_more_steps(run_dir):
        assert steps_done.wait(timeout=60), "the loop waited for the pictures"
        return real_update(run_dir)

    monkeypatch.setattr(reports, "update_progress", update_after_three_more_steps)
    monkeypatch.setattr(
        reports, "plot_convergence", lambda stats, path: plotted.append(stats) or real_plot(stats, path)
    )
    run = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path, quiet=True))
    step = run.step.__class__.__call__

    def signalling_step(self, x):
        step(self, x)
        if self.steps_done == 7:
            steps_done.set()

    run.step.__class__ = type("Signalling", (run.step.__class__,), {"__call__": signalling_step})
    train(run)
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [4, 8]
    assert [[row["step"] for row in stats] for stats in plotted] == [[2, 4], [2, 4, 6, 8, 8]]  # 8: the evaluation
    assert len(threads) == 6 and set(threads) == {threading.main_thread()}
    for picture in ("convergence.png", "progress.png", "progress.gif", "reconstruction.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture


def test_a_failing_picture_is_the_runs_error_and_keeps_its_steps_checkpoint(tmp_path, monkeypatch):
    def full_disk(stats, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reports, "plot_convergence", full_disk)
    for sample_every in (4, 8):  # raised by the next picture's start, or by the run's end for the last one
        run = setup_run(MODEL, train_cfg(8, sample_every=sample_every), DATA, RunOptions(out=tmp_path, quiet=True))
        with pytest.raises(OSError, match="No space left on device"):
            train(run)
        assert load_checkpoint(tmp_path / "latest.pt")["step"] == 8
        shutil.rmtree(tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_steps(tmp_path, 4)
    good = (tmp_path / "latest.pt").read_bytes()
    run = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    with torch.no_grad():
        run.D.decoder.out.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"^non-finite loss in steps 5 to 6 \(L_D=nan"):
        train(run)
    assert (tmp_path / "latest.pt").read_bytes() == good
    # Before the first checkpoint: no checkpoint to name (not a latest.pt that is not there).
    run = setup_run(MODEL, train_cfg(8), DATA, RunOptions(out=tmp_path / "new", quiet=True))
    with torch.no_grad():
        run.D.decoder.out.bias.fill_(float("nan"))
    with pytest.raises(
        TrainingError, match=r"in steps 1 to 2 .*; training stopped, no checkpoint had been written yet$"
    ):
        train(run)
    assert not (tmp_path / "new" / "latest.pt").exists()
    # A window cut short by the run's last step: its own one step, not --log-every's 2 (a checkpoint helper)
    run = setup_run(MODEL, train_cfg(5), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    with torch.no_grad():
        run.D.decoder.out.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"^non-finite loss in step 5 \(L_D=nan"):
        train(run)


def test_weights_that_diverge_on_a_checkpoints_step_never_replace_the_last_good_one(tmp_path):
    """The statistics a checkpoint is checked by are those of the weights before each update: an update that made
    the weights non-finite on the checkpoint's own step shows only in the weights, which are read there too."""
    run_steps(tmp_path, 4)
    good = (tmp_path / "latest.pt").read_bytes()
    run = setup_run(MODEL, train_cfg(12), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    step = run.step.__class__.__call__

    def diverging_step(self, x):
        step(self, x)
        if self.steps_done == 8:  # a checkpoint's step: its losses, read next, are still finite
            with torch.no_grad():
                run.D.decoder.out.bias.fill_(float("inf"))

    run.step.__class__ = type("Diverging", (run.step.__class__,), {"__call__": diverging_step})
    with pytest.raises(TrainingError, match=f"non-finite weights after step 8 .* checkpoint is {tmp_path}/latest.pt"):
        train(run)
    assert (tmp_path / "latest.pt").read_bytes() == good
    assert max(row["step"] for row in reports.read_stats(tmp_path / "stats.jsonl")) == 8  # its losses were finite


def interrupt_after(run, steps_done, signum=signal.SIGINT, times=1):
    """Make `run`'s step send this process `signum` (SIGINT: as Ctrl-C does) `times` times once `steps_done` steps
    are done."""
    step = run.step.__class__.__call__

    def interrupting_step(self, x):
        step(self, x)
        if self.steps_done == steps_done:
            for _ in range(times):
                signal.raise_signal(signum)

    run.step.__class__ = type("Interrupting", (run.step.__class__,), {"__call__": interrupting_step})
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("times", [1, 2], ids=["once", "with-its-echo"])
def test_ctrl_c_or_sigterm_checkpoints_after_the_step_in_flight(tmp_path, capsys, signum, times):
    """SIGTERM is how schedulers (a preemption, a time limit), `timeout` and `docker stop` end a run: it stops as
    Ctrl-C does, with a checkpoint, instead of losing the steps since the last one. The signal's echo (torchrun's
    launcher repeats it to its workers at once) is the same request. The request is said at once, once (a checkpoint
    helper: a Ctrl-C during a minute-long evaluation got no answer)."""
    run = setup_run(MODEL, train_cfg(20), DATA, RunOptions(out=tmp_path, quiet=True))
    train(interrupt_after(run, 3, signum, times))
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 3 and run.stopped_by == signum
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    said = f"{name}: stopping after the step in progress, with a checkpoint (another {name}, 2 s or more from now, "
    assert capsys.readouterr().err.splitlines().count(said + "stops at once)") == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_after_the_echo_window_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "REPEAT_WINDOW_S", 0.0)  # any repeat comes later than the window
    run = setup_run(MODEL, train_cfg(20), DATA, RunOptions(out=tmp_path, quiet=True))
    with pytest.raises(KeyboardInterrupt):
        train(interrupt_after(run, 3, signal.SIGINT, times=2))
    assert not (tmp_path / "latest.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "signum, status, said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_cli_ctrl_c_or_sigterm_exits_with_the_signal_and_says_how_to_resume(
    tmp_path, monkeypatch, capsys, signum, status, said
):
    """An interrupted run is not a finished one: `train && evaluate` must stop, and no "done" line may claim
    samples the run never drew; a scheduler reads the signal from the status (128 + its number). The resume command
    it prints continues the run."""
    script = load_script("train")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(
        script, "setup_run", lambda *args, **kwargs: interrupt_after(setup_run(*args, **kwargs), 3, signum)
    )
    out = tmp_path / "my run"  # a space: the command printed must quote it
    tiny = ["--image-size", "16", "--batch-size", "4", "--checkpoint-every", "100", "--sample-every", "100"]
    assert script.main(["--out", str(out), "--quiet", "--device", "cpu", "--steps", "6", *tiny]) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"began-fast: new run in {out}"
    assert "  train: 6 steps, gamma 0.7, lambda_k 0.001, Adam betas 0.5, 0.999" in lines  # the demo preset's
    assert "  model: 16 px, n 16, h 32, z 32, skips" in lines
    assert lines[-2] == f"{said} at step 3; checkpoint written to {out / 'latest.pt'}"
    assert lines[-1] == f"resume with: python scripts/train.py --out '{out}' --resume --device cpu"
    assert load_checkpoint(out / "latest.pt")["step"] == 3
    # With the progress bar on stderr, the line starts a line of its own (it was written after the bar's text).
    assert script.main(["--out", str(tmp_path / "bar"), "--device", "cpu", "--steps", "6", *tiny]) == status
    shown = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.splitlines()]  # what a terminal shows
    assert f"{said} at step 3; checkpoint written to {tmp_path / 'bar' / 'latest.pt'}" in shown
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the command names the script where it is
    how = SimpleNamespace(out=out, device="cpu", impl=None, amp=None, cuda_graphs=False, reference_step=False)
    assert script.resume_command(how) == f"{ROOT / 'scripts' / 'train.py'} --out '{out}' --resume --device cpu"

    monkeypatch.setattr(script, "setup_run", setup_run)
    assert script.main([*shlex.split(lines[-1])[4:], "--quiet"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("done: 6 steps")
    assert load_checkpoint(out / "latest.pt")["step"] == 6


def test_cli_under_torchrun_a_launchers_sigterm_after_a_signal_stop_does_not_cut_the_ranks_way_out(tmp_path):
    """Under torchrun the ranks stop together on a signal, and the first that leaves makes the launcher send SIGTERM
    to the others, rank 0 among them, while it leaves the process group: it still prints its resume line and exits
    with its stop's status (130 for a Ctrl-C), not killed by that SIGTERM (status -15, no resume line). Here one
    process stands for rank 0 of 2 (no process group), and leaving the group is where the launcher's SIGTERM lands."""
    out = tmp_path / "run"
    code = f"""
import os, signal, sys
from types import SimpleNamespace
from began_fast.distributed import World
from tests.scripts import load_script
from tests.test_train import interrupt_after
script = load_script("train")
script.World = SimpleNamespace(from_env=lambda: World(0, 2, 0))
script.start = lambda *args: None
setup_run = script.setup_run
script.setup_run = lambda *args, **kwargs: interrupt_after(setup_run(*args, **kwargs), 3, signal.SIGINT)
script.stop = lambda: os.kill(os.getpid(), signal.SIGTERM)
tiny = ["--image-size", "16", "--batch-size", "4", "--steps", "6", "--checkpoint-every", "100", "--quiet"]
sys.exit(script.main(["--out", {str(out)!r}, "--device", "cpu", *tiny]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.splitlines()[-1] == f"resume with: python scripts/train.py --out {out} --resume --device cpu"
    assert load_checkpoint(out / "latest.pt")["step"] == 3


def test_a_sigterm_to_every_process_of_the_job_stops_with_a_checkpoint_when_workers_decode(tmp_path):
    """A scheduler's time limit or preemption signals every process of the job, the DataLoader's workers too (here:
    the process group). The run stops as it does alone, with its checkpoint, instead of failing to write it when the
    DataLoader raised about its killed workers in the middle of torch.save."""
    out = tmp_path / "run"
    args = ["--out", str(out), "--device", "cpu", "--quiet", "--workers", "2", "--loader", "torch", "--log-every", "1"]
    tiny = ["--image-size", "16", "--batch-size", "4", "--steps", "100000", "--checkpoint-every", "100000"]
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *args, *tiny]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stats = out / "stats.jsonl"
        while process.poll() is None and (not stats.exists() or len(stats.read_text().splitlines()) < 10):
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert "2 workers" in err and "Traceback" not in err and "error" not in err, err
    stopped_at = load_checkpoint(out / "latest.pt")["step"]
    assert stopped_at >= 10 and process.returncode == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at step {stopped_at}; checkpoint written to {out / 'latest.pt'}" in err


def test_a_sigterm_while_the_last_pictures_are_written_neither_ends_the_run_nor_cuts_them(tmp_path):
    """Under torchrun a rank that stopped on a signal may leave first, and its launcher then sends SIGTERM to the
    others, rank 0 among them, while rank 0 still writes its last pictures: the loop's hold on the stop signals lasts
    until they are written (it ended before, and the SIGTERM killed rank 0 without its stop step's grid)."""
    code = f"""
import os, signal
from pathlib import Path
from began_fast import reports
from tests.test_train import run_steps
wait = reports.BackgroundWriter.wait
def wait_after_a_sigterm(self):
    os.kill(os.getpid(), signal.SIGTERM)
    wait(self)
reports.BackgroundWriter.wait = wait_after_a_sigterm
run_steps(Path({str(tmp_path / "run")!r}), 4)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [step for step, _ in reports.sample_frames(tmp_path / "run")] == [4]


def test_rank_0s_wait_for_its_last_pictures_is_not_taken_for_a_hang(tmp_path, monkeypatch):
    """Under torchrun rank 0 waits for its last pictures after its last step (the progress GIF of a long run takes
    seconds): its own work, as their start is, not a hung loop, so the hang guard must not end it when the wait
    outlasts --dist-timeout. Here one process stands for rank 0 of 2, its collectives changing nothing, its guard's
    exit recorded, and the pictures take three timeouts."""
    timeout_s, ended = 1.0, []
    collectives = Collectives(World(0, 2, 0), timeout_s)
    collectives.check_same = lambda *args, **kwargs: None
    collectives.max_ = lambda number, device: number
    monkeypatch.setattr(train_module, "HangGuard", lambda collectives: HangGuard(collectives, ended.append))
    update_progress = reports.update_progress
    monkeypatch.setattr(reports, "update_progress", lambda out: time.sleep(3 * timeout_s) or update_progress(out))
    run = setup_run(MODEL, train_cfg(1), DATA, RunOptions(out=tmp_path, quiet=True))
    run.collectives = collectives
    train(run)
    assert ended == [] and [step for step, _ in reports.sample_frames(tmp_path)] == [1]
    assert (tmp_path / "progress.gif").exists()


@pytest.mark.slow
def test_a_run_killed_at_random_moments_and_resumed_each_time_ends_as_one_never_killed(tmp_path):
    """kill -9 (a node failure, the OOM killer) at any moment costs a run at most the steps since its last
    checkpoint: killed four times, each time started again with --resume (or anew before its first checkpoint), it
    ends with the checkpoint, statistics and sample grids of a run never killed, bit for bit. Whatever the moment of
    each kill (in a step, a checkpoint's write, an evaluation, the pictures, the start), with image files decoded by
    2 worker processes, the vanishing residual and evaluations."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, face in enumerate(draw_faces(48, 32, seed=5)):
        Image.fromarray(face).save(faces / f"{i:03d}.png")
    steps = 120
    args = ["--data", str(faces), "--workers", "2", "--image-size", "16", "--batch-size", "4", "--steps", str(steps)]
    args += ["--log-every", "5", "--sample-every", "10", "--checkpoint-every", "10", "--snapshot-every", "30"]
    args += ["--eval-every", "20", "--eval-images", "16", "--vanishing-residual", "--carry-steps", "60", "--quiet"]
    assert cli("--out", str(tmp_path / "whole"), *args).returncode == 0

    out, kills, moments = tmp_path / "killed", 0, random.Random(0)
    while True:
        resume = ["--resume"] if (out / "latest.pt").exists() else []
        command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--device", "cpu", "--out", str(out)]
        with open(tmp_path / "stderr.txt", "w") as err:
            process = subprocess.Popen([*command, *args, *resume], stderr=err, start_new_session=True)
        # Once a step at or past a random one is logged, a random fraction of a second later (a step below the one
        # the run resumes from: a kill in its start). Never near the end: a run killed after its last checkpoint is
        # finished, and refuses --resume.
        kill_after, delay = moments.randint(1, 80), moments.uniform(0.0, 0.2)
        while process.poll() is None:
            at = max([0] + [row["step"] for row in reports.read_stats(out / "stats.jsonl")])
            if kills < 4 and at >= kill_after:
                time.sleep(delay)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                break
            time.sleep(0.02)
        else:
            break
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()
    assert kills == 4

    whole, killed = (load_checkpoint(folder / "latest.pt") for folder in (tmp_path / "whole", out))
    assert whole["step"] == killed["step"] == steps
    assert_same_trainer_state({**whole, "run_id": None}, {**killed, "run_id": None}, "checkpoint")
    assert reports.read_stats(out / "stats.jsonl") == reports.read_stats(tmp_path / "whole" / "stats.jsonl")
    frames = [reports.sample_frames(folder) for folder in (tmp_path / "whole", out)]
    assert [step for step, _ in frames[1]] == list(range(10, steps + 1, 10))
    for (_, grid), (_, again) in zip(*frames, strict=True):
        assert grid.read_bytes() == again.read_bytes()
    assert sorted(path.name for path in out.glob("step_*.pt")) == [f"step_{s:07d}.pt" for s in (30, 60, 90, 120)]


@pytest.mark.parametrize(
    "error, line",
    [
        (
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.2 GiB is free.\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"
            ),
            "error: CUDA out of memory: the step does not fit this GPU's memory; lower --batch-size or --image-size",
        ),
        (  # the CUDA driver's own failure (torch.AcceleratorError), as when a CUDA graph is instantiated
            RuntimeError(
                "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API "
                "call, so the stacktrace below might be incorrect."
            ),
            "error: CUDA error: out of memory: the step does not fit this GPU's memory; lower --batch-size or "
            "--image-size",
        ),
        (  # Triton loading a kernel's binary onto a full GPU
            RuntimeError("Triton Error [CUDA]: out of memory"),
            "error: Triton Error [CUDA]: out of memory: the step does not fit this GPU's memory; lower --batch-size "
            "or --image-size",
        ),
        (  # on a CPU the allocator's failure is a plain RuntimeError, not torch.OutOfMemoryError
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)"
            ),
            "error: cannot allocate 400,000,000,000 bytes: the step does not fit this machine's memory; lower "
            "--batch-size or --image-size",
        ),
    ],
    ids=["gpu", "cuda-driver", "triton", "cpu"],
)
def test_cli_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, error, line):
    """A batch or image size too large for the device's memory is bad input: one line that says what to lower,
    status 2; any other RuntimeError is a bug, not bad input, and propagates."""
    script = load_script("train")
    argv = ["--out", str(tmp_path / "run"), "--quiet", "--device", "cpu", "--image-size", "16"]
    monkeypatch.setattr(script, "train", lambda run: (_ for _ in ()).throw(error))
    assert script.main(argv) == 2
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setattr(script, "train", lambda run: (_ for _ in ()).throw(RuntimeError("another error")))
    with pytest.raises(RuntimeError, match="another error"):
        script.main(["--out", str(tmp_path / "run2"), *argv[2:]])


def cli(*args, env=None):
    """scripts/train.py run as a user runs it, on the CPU unless `args` name a device: the CLI's behaviour is the
    same on every machine (on a GPU machine the default would be cuda, the gpu64 preset and compiled kernels)."""
    device = [] if "--device" in args else ["--device", "cpu"]
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *device, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize(
    "args, message, env",
    [
        (["--data", "/no/such/folder"], "does not exist", {}),
        (["--gamma", "1.5"], "error: --gamma must be in (0, 1]", {}),
        (["--resume"], "holds no run (no latest.pt): leave out --resume to start one there", {}),
        # The device may not be one the user gave (it was "got --device cpu" without one).
        (["--cuda-graphs"], "--cuda-graphs needs a CUDA device, and this run's is cpu (no GPU found, or --device", {}),
        (["--reference-step", "--amp"], "--reference-step runs in float32", {}),
        (["--device", "bogus"], "--device must be cpu, cuda or cuda:N, got 'bogus'", {}),
        (["--device", "mps"], "--device must be cpu, cuda or cuda:N, got 'mps'", {}),
        (["--out", "{file}"], "file is a file; expected a run folder (a new one, or one that holds a run)", {}),
        (["--out", "{file}/run"], "cannot create the run folder --out", {}),
        (["--lr", "1e-4", "--lr-floor", "1e-3"], "error: --lr-floor must be in [0, lr=0.0001]", {}),
        (
            ["--impl", "triton"],
            "the Triton kernels need a CUDA device, and this run's is cpu",
            {"TRITON_INTERPRET": "0"},
        ),
        ([], "BEGAN_FAST_IMPL must be one of", {"BEGAN_FAST_IMPL": "bogus"}),
        (["--holdout", "-1"], "error: --holdout must be an integer >= 0, got -1", {}),
        (["--dist-timeout", "inf"], "--dist-timeout must be in (0, 604800] seconds (a week), got inf", {}),
        (["--holdout", "10000"], "--holdout 10000 must leave training images: the set holds 10000", {}),
        (["--data", ""], "--data is empty: give a CelebA folder", {}),
        (["--steps", "0"], "error: --steps must be an integer >= 1, got 0", {}),
        (["--lr", "inf"], "error: --lr must be a finite number > 0, got inf", {}),
        # Not 0 or inf once held in float32 (a checkpoint helper: it trained at lr 0, "after decay")
        (
            ["--lr", "1e-46"],
            "error: --lr must be in [1.2e-38, 3.4e38], the range of the float32 it is held in, got",
            {},
        ),
        (["--lr", "1e39"], "error: --lr must be in [1.2e-38, 3.4e38], the range of the float32 it is held", {}),
        (["--crop-size", "0"], "error: --crop-size must be an integer >= 1, got 0", {}),  # not "None or an integer"
        (["--seed", str(2**64 - 1)], "error: --seed must be in [0, 2**63 - 1)", {}),
        (["--eval-images", "64"], "error: --eval-images sizes the SWD evaluations, and this run has none: give", {}),
        (["--workers", "100000"], "] (4 per core), got 100000", {}),  # not 100,000 processes, then out of memory
        # Not a batch torch cannot size (2**62: "Storage size calculation overflowed", a traceback) or unpack.
        (["--batch-size", str(2**62)], f"error: --batch-size must be an integer in [1, 1048576], got {2**62}", {}),
        (["--batch-size", str(2**64)], f"error: --batch-size must be an integer in [1, 1048576], got {2**64}", {}),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message, env):
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(file=tmp_path / "file") for a in args]
    result = cli("--out", str(tmp_path / "run"), "--quiet", *args, env=os.environ | env)
    assert_one_error_line(result, message)


def assert_one_error_line(result, message):
    """The CLI ended with exit status 2 and one line "error: ...message...", no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_cli_trains_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    common = ["--out", out, "--quiet", "--image-size", "16", "--batch-size", "4", "--checkpoint-every", "3"]
    assert cli(*common, "--steps", "3", "--lr", "1e-5", "--snapshot-every", "2").returncode == 0  # lr under the floor
    result = cli(*common, "--steps", "5", "--resume", "--snapshot-every", "4")  # an interval may change on resume
    assert result.returncode == 0, result.stderr
    assert "resuming at step 3" in result.stderr
    assert load_checkpoint(Path(out) / "latest.pt")["step"] == 5
    assert sorted(p.name for p in Path(out).glob("step_*.pt")) == ["step_0000002.pt", "step_0000004.pt"]
    for args, message in (
        ([], "already holds a run"),
        (["--out", ""], "argument --out: is empty (an unset shell variable?); give a path (see train.py --help)"),
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc' (see train.py --help)"),
        (["--resume", "--batch-size", "8"], "train setting batch_size is 4, not 8"),
        (["--resume", "--holdout", "5"], "data setting holdout is 0, not 5"),
        (["--resume", "--preset", "demo"], "--preset demo only chooses a new run's: leave it out"),
    ):
        result = cli(*common, "--steps", "6", *args)
        assert_one_error_line(result, message)


def test_cli_resume_takes_flags_that_match_the_run_but_not_the_preset(tmp_path):
    """--lr-floor 6e-4 is right for this run (lr 8e-4) and wrong for the demo preset (lr 5e-4): a resume that gives
    it again is checked against the run, not the preset."""
    common = ["--out", str(tmp_path / "run"), "--quiet", "--image-size", "16", "--batch-size", "4"]
    assert cli(*common, "--steps", "2", "--lr", "8e-4", "--lr-floor", "6e-4").returncode == 0
    result = cli(*common, "--steps", "3", "--resume", "--lr-floor", "6e-4")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["train_config"]["lr_floor"] == 6e-4
    assert_one_error_line(cli(*common, "--steps", "4", "--resume", "--lr-floor", "1e-4"), "lr_floor is 0.0006")


def test_cli_warns_once_about_undecodable_files(tmp_path):
    """The loader's scan and the pictures' own view of the folder see the same bad file: one warning, not two."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
    (folder / "6.png").write_bytes(b"not a png")
    common = ["--out", str(tmp_path / "run"), "--quiet", "--image-size", "16", "--batch-size", "2", "--steps", "2"]
    result = cli(*common, "--data", str(folder), "--sample-every", "1", "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped 1 of 7 image files") == 1, result.stderr
    # One line of its own, as errors are: not Python's "file:line: SkippedImagesWarning: ..." and the source line.
    [line] = [line for line in result.stderr.splitlines() if "skipped 1 of 7" in line]
    assert line.startswith("warning: ") and "Warning" not in result.stderr, result.stderr


def test_damaged_checkpoints_are_refused_with_one_line(tmp_path):
    run_steps(tmp_path, 4)
    whole = (tmp_path / "latest.pt").read_bytes()
    archive = zipfile.ZipFile(tmp_path / "latest.pt")
    records = sorted(archive.infolist(), key=lambda record: record.file_size)
    record = records[-1]  # the largest tensor: inside its data, which torch.load alone reads without complaint
    data = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 16
    header = records[0].header_offset + 30  # inside a record's file name
    flipped, garbled = bytearray(whole), bytearray(whole)
    flipped[data : data + 64] = bytes(255 - b for b in flipped[data : data + 64])
    garbled[header : header + 4] = b"\xc8\xff\xc8\xff"
    for damage, message in (
        (bytes(flipped), r"is damaged \(.+ fails its checksum\); copy an earlier snapshot \(step_XXXXXXX.pt\) over"),
        (bytes(garbled), r"is damaged \(.+\); copy an earlier snapshot"),
        (whole[: len(whole) // 2], r"is damaged \(it ends early, .+ a copy cut short .+\); copy an earlier snapshot"),
        (whole[:-5], r"is damaged \(it ends early"),
        (b"\x00" * 100, "cannot be read"),
        (b"", r"is damaged \(it is empty, 0 bytes\); copy an earlier snapshot"),  # was "cannot be read (EOFError)"
    ):
        (tmp_path / "latest.pt").write_bytes(damage)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "latest.pt")


def test_a_file_beginning_as_a_zip_archive_does_not_is_not_called_damaged(tmp_path):
    """Another program's file that happens to begin with "PK" is no checkpoint cut short."""
    (tmp_path / "notes.pt").write_bytes(b"PK notes: " + os.urandom(200))
    with pytest.raises(CheckpointError, match=r"notes\.pt cannot be read \(\w+\); is it a began-fast \.pt file\?$"):
        load_checkpoint(tmp_path / "notes.pt")


class _RunsCodeWhenUnpickled:
    """A pickled object whose unpickling calls a function: what a malicious checkpoint would run."""

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_its_code_never_run(tmp_path):
    """evaluate.py and sample.py read a checkpoint a user may have been handed: read with torch.load's
    weights_only=False, an object pickled in it ran its code (here, making a folder) before any check."""
    ran = tmp_path / "ran"
    payload = _RunsCodeWhenUnpickled()
    payload.path = ran
    torch.save({**entries(3), "format": "began-fast/1", "trainer": {"k": payload}}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match=r"latest\.pt cannot be read \(UnpicklingError\); is it a began-fast"):
        load_checkpoint(tmp_path / "latest.pt")
    assert not ran.exists()


def entries(step):
    """A checkpoint's entries of the types every reader takes for granted."""
    configs = {name: {"seed": random.randrange(100)} for name in ("model_config", "train_config", "data_config")}
    nets = {name: {"w": torch.rand(3, 2)} for name in ("G", "D")}
    return {"step": step, **configs, **nets, "trainer": {"k": torch.rand(())}, "fixed_z": torch.rand(4, 3) * 2 - 1}


def test_a_checkpoint_is_read_from_a_path_given_as_text_and_only_in_its_own_format(tmp_path):
    """load_checkpoint takes a str as a Path (a .pt file or a run folder), and every step from 0; a checkpoint of
    another format (a later version's) is refused with one line, whatever entries it holds."""
    state = entries(0)
    save_checkpoint(tmp_path / "latest.pt", state)
    for path in (str(tmp_path / "latest.pt"), str(tmp_path), tmp_path):
        loaded = load_checkpoint(path)
        assert loaded["step"] == 0 and torch.equal(loaded["fixed_z"], state["fixed_z"])
    torch.save({**state, "format": "began-fast/2"}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match=r"latest\.pt is not a began-fast checkpoint \(expected format 'began-"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "error, reason",
    [
        (
            RuntimeError("[enforce fail at inline_container.cc:778] .\n PytorchStreamWriter failed"),
            "PytorchStreamWriter",
        ),
        (RuntimeError(), "RuntimeError"),
    ],
    ids=["multi-line", "no-message"],
)
def test_a_checkpoint_write_that_torch_fails_alone_is_one_line_and_keeps_the_last_one(
    tmp_path, monkeypatch, error, reason
):
    """torch.save's zip writer can fail with a RuntimeError of several lines, or none, with no OSError behind it."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, entries(4))
    good = path.read_bytes()

    def fail(obj, f):
        f.write(os.urandom(1000))
        raise error

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError) as failed:
        save_checkpoint(path, entries(8))
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"cannot write checkpoint {path}: ") and reason in message
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_models_are_loaded_on_the_layers_asked_for_and_a_problem_is_named_by_its_first_line(tmp_path):
    """evaluate.py and sample.py --impl torch run PyTorch's own layers; the one line of a misfit is the problem's
    first, unless that is only a heading."""
    from began_fast.checkpoint import misfit

    run_steps(tmp_path, 2)
    G, D, _ = load_models(tmp_path, impl="torch")
    assert {module.impl for net in (G, D) for module in net.modules() if hasattr(module, "impl")} == {"torch"}
    error = RuntimeError("fixed_z is (64, 7), expected (64, 4)\nwhile resuming")
    assert str(misfit("x.pt", error)) == (
        "checkpoint x.pt does not fit this version of began-fast (RuntimeError: fixed_z is (64, 7), expected (64, 4))"
    )


def test_resume_of_a_checkpoint_whose_noise_generator_ran_on_another_kind_of_device(tmp_path, capsys):
    """A CUDA run's noise generator is a 16-byte Philox state, which a CPU generator cannot take (nor a CUDA one a
    CPU run's 5056 bytes): the resume goes on with a new stream, seeded from the seed and the step, and says so."""
    run_steps(tmp_path / "gpu", 4)
    state = load_checkpoint(tmp_path / "gpu" / "latest.pt")
    state["trainer"]["z_gen"] = torch.tensor([7, 0], dtype=torch.int64).view(torch.uint8)  # CUDA's: seed 7, offset 0
    torch.save(state, tmp_path / "gpu" / "latest.pt")
    resumed = []
    for out in ("a", "b"):
        shutil.copytree(tmp_path / "gpu", tmp_path / out)
        resumed.append(parameters(run_steps(tmp_path / out, 6, resume=True)))
        assert "warning: the checkpoint's noise generator ran on another kind of device" in capsys.readouterr().err
    for a, b in zip(*resumed, strict=True):  # the new stream is the same on every resume
        assert torch.equal(a, b)
    run_steps(tmp_path / "a", 8, resume=True)
    assert "noise generator" not in capsys.readouterr().err


def test_a_checkpoint_gives_back_every_setting_it_saved(tmp_path):
    """saved_configs reads back each field of the three configs as written: with every field away from its default
    (the runs of the other tests keep most defaults, so a load that put the default betas back passed them)."""
    model = ModelConfig(image_size=32, n=8, h=5, z_dim=7, skip=True, vanishing_residual=True, carry_steps=123)
    train = TrainConfig(
        batch_size=5,
        lr=3e-4,
        betas=(0.3, 0.9),
        gamma=0.7,
        lambda_k=0.002,
        lr_decay_window=17,
        lr_decay_factor=0.25,
        lr_floor=1e-5,
        steps=99,
        seed=4,
        log_every=3,
        sample_every=9,
        checkpoint_every=11,
        snapshot_every=33,
        lr_scaling="sqrt",
        eval_every=6,
        eval_images=64,
    )
    data = DataConfig(
        path="/data/faces",
        source="folder",
        crop="center",
        crop_size=100,
        flip=False,
        num_workers=3,
        loader="torch",
        builtin_count=500,
        builtin_seed=2,
        holdout=7,
    )
    for cfg in (model, train, data):
        default = type(cfg)()
        assert all(getattr(cfg, f.name) != getattr(default, f.name) for f in dataclasses.fields(cfg)), cfg
    configs = {"model_config": model, "train_config": train, "data_config": data}
    state = {key: dataclasses.asdict(cfg) for key, cfg in configs.items()}
    state |= {"step": 3, "G": {}, "D": {}, "trainer": {}, "fixed_z": torch.zeros(1)}
    save_checkpoint(tmp_path / "latest.pt", state)
    loaded = saved_configs(load_checkpoint(tmp_path / "latest.pt"), tmp_path / "latest.pt")
    assert loaded == {"model": model, "train": train, "data": data}


def test_resume_refuses_another_runs_checkpoint_in_a_run_folder(tmp_path):
    """A latest.pt copied into another run's folder would append its stats and pictures to that run's."""
    for name in ("a", "b"):
        run_steps(tmp_path / name, 4)
    before = {name: (tmp_path / "b" / name).read_bytes() for name in ("config.json", "stats.jsonl")}
    shutil.copyfile(tmp_path / "a" / "latest.pt", tmp_path / "b" / "latest.pt")
    with pytest.raises(ConfigError, match=r"b/latest.pt belongs to another run \(\w+\) than the folder's config.json"):
        run_steps(tmp_path / "b", 6, resume=True)
    assert {name: (tmp_path / "b" / name).read_bytes() for name in before} == before
    # A checkpoint that did not record its run (an older version's) resumes as before, and is named from then on.
    state = load_checkpoint(tmp_path / "a" / "latest.pt")
    del state["run_id"]
    torch.save(state, tmp_path / "a" / "latest.pt")
    run_steps(tmp_path / "a", 6, resume=True)
    run_id = json.loads((tmp_path / "a" / "config.json").read_text())["run"]["run_id"]
    assert load_checkpoint(tmp_path / "a" / "latest.pt")["run_id"] == run_id


def test_cli_resume_of_a_checkpoint_from_another_version_is_one_line(tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "4"]
    assert cli(*common, "--steps", "2").returncode == 0
    state = load_checkpoint(out / "latest.pt")
    del state["G"]
    torch.save(state, out / "latest.pt")
    result = cli(*common, "--steps", "3", "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"error: checkpoint {out / 'latest.pt'} does not fit this version of began-fast (its 'G' is missing; "
        "expected a dict)"
    )


def test_models_loaded_from_a_vanishing_residual_checkpoint_have_its_steps_carry(tmp_path):
    """evaluate.py and sample.py see G and D as training left them: mid-fade, with the carry the checkpoint's last
    update ran under (step 4's, set at its start: 1 - 3/10) in G's decoder and in both halves of D, which the run's
    own pictures and evaluation at step 4 used; not the carry 1 a new network starts with, nor the next step's."""
    model = dataclasses.replace(MODEL, vanishing_residual=True, carry_steps=10)
    run = setup_run(model, train_cfg(4), DATA, RunOptions(out=tmp_path, quiet=True))
    train(run)
    G, D, state = load_models(tmp_path)
    assert state["step"] == 4
    for net, trained in zip(
        (G.decoder, D.encoder, D.decoder), (run.G.decoder, run.D.encoder, run.D.decoder), strict=True
    ):
        assert net.carry.item() == trained.carry.item() == pytest.approx(0.7)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("step"), r"its 'step' is missing; expected an int >= 0"),
        (lambda state: state.update(step=-3), r"its 'step' is -3; expected an int >= 0"),
        (lambda state: state.update(step=True), r"its 'step' is True; expected an int >= 0"),
        (lambda state: state.update(fixed_z=None), r"its 'fixed_z' is None; expected a Tensor"),
        (lambda state: state["data_config"].update(shuffle=True), r"TypeError: .*unexpected keyword argument 'shuf"),
        (lambda state: state["train_config"].update(gamma=2.0), r"ConfigError: gamma must be in \(0, 1\], got 2.0"),
        (  # weights that are not the saved config's: the problem itself, not only load_state_dict's heading
            lambda state: state["G"].update({"decoder.fc.bias": state["G"]["decoder.fc.bias"][:5]}),
            r"RuntimeError: Error\(s\) in loading state_dict for Generator: size mismatch for decoder.fc.bias",
        ),
    ],
)
def test_a_checkpoint_of_another_version_or_edited_is_refused_by_every_reader(tmp_path, edit, message):
    """Training, evaluate.py and sample.py read a checkpoint through load_checkpoint and saved_configs: an entry
    missing or of another type, a setting this version does not know or a value out of range is one
    CheckpointError saying so, not a KeyError or TypeError deep inside the reader."""
    run_steps(tmp_path, 2)
    state = load_checkpoint(tmp_path / "latest.pt")
    edit(state)
    torch.save(state, tmp_path / "latest.pt")
    message = f"checkpoint {re.escape(str(tmp_path))}.* does not fit this version of began-fast \\(.*{message}"
    for read in (lambda: load_models(tmp_path), lambda: run_steps(tmp_path, 4, resume=True)):
        with pytest.raises(CheckpointError, match=message):
            read()


def test_a_misfit_checkpoints_long_problem_is_cut_to_one_short_line(tmp_path):
    """load_state_dict lists every missing key: a checkpoint of another model quotes the start of that list."""
    run_steps(tmp_path, 2)
    state = load_checkpoint(tmp_path / "latest.pt")
    state["G"] = {f"{name}.renamed": value for name, value in state["G"].items()}
    torch.save(state, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError) as refused:
        load_models(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "Missing key(s) in state_dict" in message and message.endswith("...)")
    assert len(message) <= len(f"checkpoint {tmp_path / 'latest.pt'} does not fit this version of began-fast (") + 320


def test_a_resume_refuses_sample_noise_of_another_shape_before_the_first_step(tmp_path):
    """The fixed z is read at the first sample step only, which can be hours into a resumed run."""
    run_steps(tmp_path, 2)
    state = load_checkpoint(tmp_path / "latest.pt")
    state["fixed_z"] = torch.zeros(64, 7)
    torch.save(state, tmp_path / "latest.pt")
    with pytest.raises(
        CheckpointError, match=r"does not fit .*\(ValueError: fixed_z is \(64, 7\), expected \(64, 4\)\)"
    ):
        setup_run(MODEL, train_cfg(4), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))


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


def test_cli_no_flip_trains_on_unmirrored_images_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys):
    """--no-flip (carpedm20/BEGAN-tensorflow's pipeline has no flips) reaches the loader and config.json; a resume
    that names the other setting is refused, as for every data setting that changes what is trained on."""
    from began_fast import train as train_module

    script, seen = load_script("train"), []

    def make_batches(cfg, *args, **kwargs):
        seen.append(cfg.flip)
        return real_make_batches(cfg, *args, **kwargs)

    real_make_batches = train_module.make_batches
    monkeypatch.setattr(train_module, "make_batches", make_batches)
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2", "--device", "cpu"]
    assert script.main([*args, "--steps", "1", "--no-flip"]) == 0
    assert seen == [False] and json.loads((out / "config.json").read_text())["data"]["flip"] is False
    assert script.main([*args, "--steps", "2", "--resume", "--flip"]) == 2
    assert "whose data setting flip is False, not True" in capsys.readouterr().err
    assert script.main([*args, "--steps", "2", "--resume"]) == 0 and seen == [False, False]


def test_cli_settings_given_as_zero_or_off_are_given_and_a_gpu_starts_from_gpu64(tmp_path):
    """A flag given a false value (--no-flip, --eval-every 0, --holdout 0) is given all the same: a resume checks or
    applies it (--eval-every 0 turns a run's evaluations off). Without --preset a new run on a GPU takes gpu64."""
    script = load_script("train")
    parser = script.build_parser()
    steps = random.randint(2, 99)
    given = ["--out", str(tmp_path), "--resume", "--steps", str(steps), "--no-flip", "--eval-every", "0"]
    *configs, explicit = script.configs_from_flags(parser.parse_args([*given, "--holdout", "0"]), "cpu")
    assert explicit == {"model": set(), "train": {"steps", "eval_every"}, "data": {"flip", "holdout"}}
    assert configs[1].steps == steps and configs[1].eval_every == 0 and configs[2].flip is False
    for device, preset in (("cuda", "gpu64"), ("cuda:1", "gpu64"), ("cpu", "demo")):
        model, train_config, *_ = script.configs_from_flags(parser.parse_args(["--out", str(tmp_path)]), device)
        assert (model, train_config) == (get_preset(preset).model, get_preset(preset).train), device


def test_cli_an_error_that_names_no_setting_is_said_as_it_is(tmp_path, capsys):
    """A config error that starts with a setting's name is said with its flag ("--steps must be ..."); one that
    starts with anything else (a path, "the run in ...") is left as it is, not given a "--" of its own."""
    script = load_script("train")
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--device", "cpu", "--image-size", "16", "--batch-size", "2"]
    assert script.main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert script.main([*args, "--steps", "1", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"error: the run in {out} has done its 1 step: give --steps above 1 to train it further\n"
    )
    assert script.main([*args, "--steps", "1"]) == 2
    assert capsys.readouterr().err == (
        f"error: {out} already holds a run ({out / 'latest.pt'}); add --resume to continue it, or choose another "
        "--out\n"
    )


def test_cli_switches_on_the_vanishing_residual(tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--quiet", "--image-size", "16", "--batch-size", "2", "--steps", "1"]
    assert cli(*args, "--vanishing-residual", "--carry-steps", "100").returncode == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["vanishing_residual"] is True and model["carry_steps"] == 100


def test_pictures_and_evaluation_run_in_the_steps_precision(tmp_path, monkeypatch):
    """A bf16 run draws its samples, reconstructions and SWD evaluations in bf16 too: compiled, a float32 layer
    would need kernels of its own (minutes of compiling on a GPU) for a run that never trains in float32. Every
    layer's input dtype is recorded by ops.conv_elu, whichever function it then runs (the pictures and evaluation
    pass no per-sample scale, so they run reference.conv_elu_ref, not TorchConvELU)."""
    from began_fast import ops

    seen = set()
    conv_elu = ops.conv_elu

    def recording(x, *args, **kwargs):
        seen.add(ops.autocast_inputs(x)[0][0].dtype)  # the dtype the layer computes in: x as autocast casts it
        return conv_elu(x, *args, **kwargs)

    monkeypatch.setattr(ops, "conv_elu", recording)
    run = run_steps(tmp_path, 8, amp="bf16", impl="torch")
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "swd" in r] == [8] and (tmp_path / "samples" / "step_0000008.png").exists()
    assert seen == {torch.bfloat16} and run.step.amp == "bf16"


def test_a_run_ending_off_its_schedules_logs_checkpoints_and_draws_its_last_step(tmp_path):
    """5 steps, logged every 2 and drawn every 4: the last step's statistics window (step 5 alone) is logged with
    its checkpoint, not lost, and its grid is drawn (the "done" line points at the samples of the run's end)."""
    run_steps(tmp_path, 5)
    rows = reports.read_stats(tmp_path / "stats.jsonl")
    assert [row["step"] for row in rows if "swd" not in row] == [2, 4, 5]
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [4, 5]
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 5


def test_a_resume_refuses_every_setting_that_shapes_training_and_takes_those_that_watch_it(tmp_path):
    """What the run trains (the model, the objective, the optimizer, the seed, the data's content) must stay the
    checkpoint's: each given anew with another value is refused. How long it runs, how it is watched and how its
    data is read (another machine: other --workers, another --loader) may change, and the new value is applied."""
    run_steps(tmp_path, 2)
    options = RunOptions(out=tmp_path, resume=True, quiet=True)
    configs = {"model": MODEL, "train": train_cfg(4), "data": DATA}

    def resume_with(section, name, value):
        given = configs | {section: dataclasses.replace(configs[section], **{name: value})}
        explicit = {"train": {"steps"}}
        explicit[section] = explicit.get(section, set()) | {name}
        return setup_run(*given.values(), options, explicit=explicit)

    refused = {
        "model": dict(image_size=32, n=8, h=8, z_dim=8, skip=True, vanishing_residual=True, carry_steps=100),
        "train": dict(batch_size=2, lr=2e-4, betas=(0.9, 0.999), gamma=0.7, lambda_k=0.01, lr_decay_window=10),
        "data": dict(crop="center", flip=False, builtin_count=32, builtin_seed=1, holdout=4),
    }
    refused["train"] |= dict(lr_decay_factor=0.25, lr_floor=1e-5, seed=1, lr_scaling="linear")
    for section, settings in refused.items():
        for name, value in settings.items():
            with pytest.raises(ConfigError, match=f"whose {section} setting {name} is "):
                resume_with(section, name, value)
    taken = {
        "train": dict(log_every=1, sample_every=3, checkpoint_every=3, snapshot_every=6, eval_every=3, eval_images=8),
        "data": dict(loader="torch", num_workers=1),
    }
    for section, settings in taken.items():
        for name, value in settings.items():
            run = resume_with(section, name, value)
            assert getattr({"train": run.train_cfg, "data": run.data_cfg}[section], name) == value, name


def test_a_resume_drops_the_grid_of_the_step_right_after_its_checkpoint(tmp_path):
    """A run that died after drawing a grid at step 5 (sample_every 1) and before its next checkpoint: a resume
    from step 4 that draws every 4 never redraws step 5, so that stale grid must go, or it sits in the strip."""
    run_steps(tmp_path, 4)
    shutil.copy(tmp_path / "samples" / "step_0000004.png", tmp_path / "samples" / "step_0000005.png")
    run_steps(tmp_path, 6, resume=True)
    assert [step for step, _ in reports.sample_frames(tmp_path)] == [4, 6]


def test_cli_resume_command_keeps_how_the_run_ran(tmp_path, monkeypatch):
    """How a run executes is not saved with it: the resume command printed after a stop carries every flag of it,
    or the run would go on in float32, without its graphs or on another step."""
    script = load_script("train")
    monkeypatch.chdir(tmp_path)
    command = f"{ROOT / 'scripts' / 'train.py'} --out {tmp_path / 'run'} --resume"
    how = dict(out=tmp_path / "run", device="cuda:1", impl="triton", amp="fp16", cuda_graphs=True, reference_step=False)
    given = "--device cuda:1 --impl triton --amp fp16 --cuda-graphs"
    assert script.resume_command(SimpleNamespace(**how)) == f"{command} {given}"
    how |= dict(device=None, impl="torch", amp=None, cuda_graphs=False, reference_step=True)
    assert script.resume_command(SimpleNamespace(**how)) == f"{command} --impl torch --reference-step"


@pytest.mark.parametrize(
    "error, status, line",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 2, "error: [Errno 28] No space left on device"),
        (TrainingError("non-finite loss up to step 6"), 2, "error: non-finite loss up to step 6"),
        (MetricError("broken evaluation"), 2, "error: broken evaluation"),
        (CollectiveError("rank 0 of 2: a collective failed"), 1, "error: rank 0 of 2: a collective failed"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
    ids=["full-disk", "diverged", "evaluation", "dead-rank", "ctrl-c-early"],
)
def test_cli_exit_status_says_how_the_run_ended(tmp_path, monkeypatch, capsys, error, status, line):
    """A full disk, a diverged run or a failed evaluation ends with one line and status 2, a dead rank with 1, a
    Ctrl-C before the loop took over with 130 (128 + SIGINT): what a shell's `&&` or a scheduler reads."""
    script = load_script("train")
    monkeypatch.setattr(script, "setup_run", lambda *args, **kwargs: (_ for _ in ()).throw(error))
    assert script.main(["--out", str(tmp_path / "run"), "--quiet", "--device", "cpu", "--image-size", "16"]) == status
    assert capsys.readouterr().err == line + "\n"


def test_a_bad_flag_or_environment_under_torchrun_is_one_line_and_a_flag_names_the_rank(monkeypatch, capsys):
    """Every error of a torchrun rank says "rank R of N: " (the README's promise), a bad flag too: before, argparse's
    line came without it, once per rank. A torchrun environment that is not one is a line of its own."""
    script = load_script("train")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as ended:
        script.main(["--dist-timeout", "abc"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: rank 1 of 2: argument --dist-timeout: invalid float value: 'abc' (see "), err
    monkeypatch.setenv("RANK", "one")
    assert script.main(["--steps", "1"]) == 2
    assert capsys.readouterr().err == "error: environment variable RANK must be a non-negative integer, got 'one'\n"
    with pytest.raises(SystemExit) as ended:  # --help is not refused for it
        script.main(["--help"])
    assert ended.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_ranks_agree_on_a_stop_at_every_statistics_read_and_the_last_step():
    """Under torchrun a SIGTERM that reached one rank stops every rank at the next step where they read their
    statistics (every log_every steps), not at the next checkpoint (thousands of steps later, past a scheduler's
    grace period); a single process stops after the step in flight."""
    agreed = []
    collectives = SimpleNamespace(max_=lambda own, device: agreed.append(own) or signal.SIGTERM)
    run = SimpleNamespace(
        collectives=collectives,
        train_cfg=train_cfg(11, log_every=2, checkpoint_every=8),
        step=SimpleNamespace(device=torch.device("cpu")),
    )
    stops = [train_module.stop_signal(run, [], done) for done in range(1, 12)]
    assert [done for done, stop in zip(range(1, 12), stops, strict=True) if stop] == [2, 4, 6, 8, 10, 11]
    assert set(stops) == {0, signal.SIGTERM} and agreed == [0] * 6  # its own: none
    # A checkpoint off the logging schedule reads the statistics too: the ranks agree there as well.
    agreed.clear()
    run.train_cfg = train_cfg(11, log_every=3, checkpoint_every=4)
    stops = [train_module.stop_signal(run, [signal.SIGINT], done) for done in range(1, 12)]
    assert [done for done, stop in zip(range(1, 12), stops, strict=True) if stop] == [3, 4, 6, 8, 9, 11]
    assert agreed == [signal.SIGINT] * 6
    one_process = SimpleNamespace(collectives=None, train_cfg=run.train_cfg, step=run.step)
    assert train_module.stop_signal(one_process, [signal.SIGINT, signal.SIGTERM], 3) == signal.SIGINT


def test_an_evaluation_may_take_every_training_image(tmp_path):
    """--eval-images up to the number of training images is enough (the refusal says "needs that many")."""
    run = setup_run(MODEL, train_cfg(1, eval_every=1, eval_images=64), DATA, RunOptions(out=tmp_path, quiet=True))
    train(run)
    assert [row["step"] for row in reports.read_stats(tmp_path / "stats.jsonl") if "swd" in row] == [1]


def test_a_resumed_runs_config_states_the_lr_it_goes_on_with(tmp_path):
    """config.json's effective_lr is the lr a resumed run carries after its decay, not the configured one."""

    def cfg(steps):  # at lr 1e-2 M stalls over windows of 2 steps: the lr decays
        return train_cfg(steps, lr=1e-2, lr_decay_window=2, lr_floor=1e-4)

    train(setup_run(MODEL, cfg(4), DATA, RunOptions(out=tmp_path, quiet=True)))
    run = setup_run(MODEL, cfg(5), DATA, RunOptions(out=tmp_path, resume=True, quiet=True))
    decayed = run.step.lr.item()
    assert decayed < 1e-2
    train(run)
    assert json.loads((tmp_path / "config.json").read_text())["run"]["effective_lr"] == pytest.approx(decayed)
