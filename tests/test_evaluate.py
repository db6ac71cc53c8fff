"""The judging scripts: scripts/evaluate.py on a tiny checkpoint (end to end, as a user runs it, and its one-line
errors) and scripts/compare_runs.py on two small synthetic run folders."""

import ctypes
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image

from began_fast.atomic_files import TEMPORARY_SUFFIX
from began_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from began_fast.config import DataConfig, ModelConfig, TrainConfig
from began_fast.data.builtin import BuiltinFaces, draw_faces
from began_fast.fid import INCEPTION_WEIGHTS_FILE
from began_fast.metrics import evaluate_models
from began_fast.model import Discriminator, Generator
from tests.scripts import dropped_by_a_finalizer, load_script

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig(image_size=16, n=4, h=4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a freshly initialised G and D at 16 px, n=4, h=4, in the documented format."""
    torch.manual_seed(0)
    G, D = Generator(TINY, impl="torch"), Discriminator(TINY, impl="torch")
    path = tmp_path_factory.mktemp("run") / "latest.pt"
    state = {
        "model_config": dataclasses.asdict(TINY),
        "train_config": dataclasses.asdict(TrainConfig()),
        "data_config": dataclasses.asdict(DataConfig()),
        "step": 123,
        "G": G.state_dict(),
        "D": D.state_dict(),
        "trainer": {},
        "fixed_z": torch.rand(4, TINY.z_size) * 2 - 1,
    }
    save_checkpoint(path, state)
    return path, G.eval(), D.eval()


def without_progress(stderr: str) -> str:
    """evaluate.py's stderr without the line that says what it evaluates (printed before the evaluation runs)."""
    return re.sub(r"^evaluating step \d+ on .* \.\.\.\n", "", stderr, count=1, flags=re.MULTILINE)


def test_evaluate_script_end_to_end(tiny_checkpoint, tmp_path):
    path, G, D = tiny_checkpoint
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "scripts/evaluate.py", str(path), "--num", "8", "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # What runs, and no warning: it trained on the built-in faces.
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "evaluating step 123 on cpu: SWD of 8 samples against 8 real images, D's error on 8 held-out images ...\n"
    )
    assert "SWD x1e3" in done.stdout and "(step 123)" in done.stdout
    assert "D recon L1" in done.stdout and "on 8 held-out images" in done.stdout
    report = json.loads(out.read_text())
    assert report["step"] == 123 and report["num"] == 8 and report["image_size"] == 16
    assert report["recon_images"] == "held-out" and report["recon_num"] == 8
    # The same numbers as evaluate_models on the images the script must read: SWD against the first 8 training
    # faces (seed 0), D's error on the 8 faces after the 10,000 the run trained on.
    held_out = BuiltinFaces(8, 16, seed=0, first=DataConfig().builtin_count).images
    expected = evaluate_models(G, D, BuiltinFaces(8, 16, seed=0), num=8, held_out=held_out)
    assert report["swd"] == pytest.approx(expected["swd"]) and report["swd"]["avg"] > 0
    assert report["recon_l1"] == pytest.approx(expected["recon_l1"])
    on_training = evaluate_models(G, D, BuiltinFaces(8, 16, seed=0), num=8)["recon_l1"]
    assert report["recon_l1"] != pytest.approx(on_training)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["missing.pt"], "does not exist"),
        (["missing.pt", "--json", "{tmp}/new/report.json"], "does not exist"),  # and makes no folder "new"
        (["{ckpt}", "--data", "{tmp}/no_such_dir"], "no_such_dir"),
        (["{ckpt}", "--num", "0"], "--num and --batch-size must be >= 1"),
        (["{ckpt}", "--num", "100000"], "--num 100000 is more than the 10000 real images to compare with: give"),
        (["{ckpt}", "--data", "{tmp}/faces", "--num", "9"], "--num 9 is more than the 8 real images"),  # before said
        (["{ckpt}", "--fid"], INCEPTION_WEIGHTS_FILE),
        (["{ckpt}", "--fid", "--num", "1"], "--fid needs --num >= 2"),
        (["{ckpt}", "--fid", "--inception-weights", "{tmp}/w.pth"], "is not a file"),
        (["{ckpt}", "--fid", "--inception-weights", "{tmp}/a_file"], "cannot be read by torch.load (EOFError)"),
        (["{ckpt}", "--fid", "--inception-weights", "{ckpt}"], "are not torch-fidelity's Inception state dict"),
        (["{ckpt}", "--json", "{tmp}/a_file/report.json"], "a_file is a file, not a folder"),  # before evaluating
        (["{ckpt}", "--json", "{tmp}/report.json"], "is a folder; expected a file name"),
        (["{ckpt}", "--json", "{ckpt}"], "--json must name a .json file (it is replaced), got"),  # not a checkpoint
        (["{ckpt}", "--seed", str(2**70)], "--seed must be in [0, 2**63 - 1), got"),
        (["{ckpt}", "--inception-weights", "{tmp}/w.pth"], "--inception-weights is for FID: add --fid"),
    ],
)
def test_evaluate_script_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    script = load_script("evaluate")
    monkeypatch.setattr(script, "evaluate_models", None)  # none of these may get as far as evaluating
    (tmp_path / "a_file").write_text("")
    (tmp_path / "report.json").mkdir()
    (tmp_path / "faces").mkdir()
    for i, face in enumerate(draw_faces(8, 16, seed=1)):
        Image.fromarray(face).save(tmp_path / "faces" / f"{i}.png")
    checkpoint = tiny_checkpoint[0].read_bytes()
    argv = [a.format(ckpt=tiny_checkpoint[0], tmp=tmp_path) for a in args]
    assert script.main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err  # no "evaluating ..." first
    assert tiny_checkpoint[0].read_bytes() == checkpoint and not (tmp_path / "new").exists()


def _stdout_whose_reader_went_away(monkeypatch):
    """sys.stdout on a pipe whose read end is closed, as `script | head -1` leaves it once head has its line."""
    read, write = os.pipe()
    os.close(read)
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    return stdout


@pytest.mark.parametrize("script", ["evaluate", "compare_runs"])
def test_a_reader_of_the_result_that_went_away_loses_no_file(tiny_checkpoint, tmp_path, monkeypatch, capsys, script):
    """`evaluate.py ... --json report.json | head -1` said "error: [Errno 32] Broken pipe" with status 2 and did not
    write the report (or wrote it and Python's flush at exit printed its BrokenPipeError, status 120); compare_runs's
    --plot alike (found by an evaluation-audit helper). Now the files are written and the script ends 0, quietly."""
    if script == "evaluate":
        written = tmp_path / "report.json"
        argv = [str(tiny_checkpoint[0]), "--num", "4", "--device", "cpu", "--json", str(written)]
    else:
        runs = [_write_run(tmp_path / run, lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50)) for run in "ab"]
        written = tmp_path / "m.png"
        argv = [*map(str, runs), "--plot", str(written)]
    with _stdout_whose_reader_went_away(monkeypatch):
        assert load_script(script).main(argv) == 0
    assert written.stat().st_size > 100
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Exception"))]


def test_evaluate_script_out_of_memory_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """--num or --batch-size too large for the device is bad input: one line that says what to lower, status 2, no
    --json written; any other RuntimeError is a bug and propagates."""
    script = load_script("evaluate")
    json_out = tmp_path / "eval.json"
    argv = [str(tiny_checkpoint[0]), "--num", "4", "--device", "cpu", "--json", str(json_out)]
    failure = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "123456789 bytes. Error code 12 (Cannot allocate memory)"
    )
    monkeypatch.setattr(script, "evaluate_models", lambda *args, **kwargs: (_ for _ in ()).throw(failure))
    assert script.main(argv) == 2
    assert without_progress(capsys.readouterr().err) == (
        "error: cannot allocate 123,456,789 bytes: the evaluation does not fit this machine's memory; lower "
        "--batch-size or --num\n"
    )
    failure = RuntimeError("another error")
    with pytest.raises(RuntimeError, match="another error"):
        script.main(argv)
    assert not json_out.exists()


@pytest.mark.parametrize("script", ["evaluate", "sample"])
@pytest.mark.parametrize("device", ["mps", "bogus"])
def test_scripts_refuse_an_unknown_device_with_one_line(tiny_checkpoint, tmp_path, capsys, script, device):
    argv = [str(tiny_checkpoint[0]), "--device", device] + (["--out", str(tmp_path)] if script == "sample" else [])
    assert load_script(script).main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --device must be cpu, cuda or cuda:N, got {device!r}\n"


@pytest.mark.parametrize("script", ["evaluate", "sample"])
def test_scripts_refuse_an_unknown_began_fast_impl_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys, script):
    """BEGAN_FAST_IMPL=garbage ended both scripts in a ValueError traceback from G's first layer (status 1); train.py
    refused it in one line."""
    monkeypatch.setenv("BEGAN_FAST_IMPL", "garbage")
    out = tmp_path / "out"
    argv = [str(tiny_checkpoint[0]), "--device", "cpu"] + (["--out", str(out)] if script == "sample" else [])
    assert load_script(script).main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: BEGAN_FAST_IMPL must be one of ('auto', 'torch', 'triton'), got 'garbage'\n", err
    assert not out.exists()


def test_sample_script_refuses_a_diverged_generator_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    state = load_checkpoint(tiny_checkpoint[0])
    state["G"] = {name: torch.full_like(value, float("nan")) for name, value in state["G"].items()}
    save_checkpoint(tmp_path / "diverged.pt", state)
    out = tmp_path / "samples"
    assert load_script("sample").main([str(tmp_path / "diverged.pt"), "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: G(z) holds NaN or inf: the checkpoint's generator has diverged\n"
    assert not list(out.glob("*.png"))


def test_sample_script_noise_is_not_the_stream_that_drew_the_weights(tiny_checkpoint, tmp_path, monkeypatch):
    """The tiny checkpoint's G was initialised after torch.manual_seed(0): --seed 0 must not draw its z from a
    generator seeded alike, whose z would be rescaled rows of G's first layer."""
    script, drawn = load_script("sample"), []
    generate = script.generate
    monkeypatch.setattr(script, "generate", lambda G, z, *args: drawn.append(z) or generate(G, z, *args))
    argv = [str(tiny_checkpoint[0]), "--out", str(tmp_path), "--grid", "4", "--interp-rows", "0", "--seed", "0"]
    assert script.main(argv + ["--device", "cpu"]) == 0
    rows = load_checkpoint(tiny_checkpoint[0])["G"]["decoder.fc.weight"] * math.sqrt(TINY.z_size)
    assert len(drawn) == 1 and torch.cdist(drawn[0], rows).min() > 1e-3


INTERP_STEPS = (
    "--interp-steps must be >= 2 (a row walks from a z to another) and at most 4096 images in all (--interp-rows x "
    "--interp-steps), got"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "0", "--interp-rows", "0"], "--grid, --interp-rows and --num are all 0: there is nothing to draw"),
        (["--interp-steps", "1"], f"{INTERP_STEPS} 1"),
        (["--interp-rows", "-1"], "--interp-rows must be in [0, 4096], got -1"),
        (["--grid", "100000000"], "--grid must be in [0, 4096], got 100000000"),  # one picture, in memory
        (["--num", "1000000000"], "--num must be in [0, 1000000], got 1000000000"),
        (["--interp-rows", "64", "--interp-steps", "65"], f"{INTERP_STEPS} 65"),
        (["--seed", "-1"], "--seed must be in [0, 2**63 - 1), got -1"),
    ],
)
def test_sample_script_refuses_a_request_it_cannot_draw(tiny_checkpoint, tmp_path, capsys, argv, message):
    out = tmp_path / "samples"
    assert load_script("sample").main([str(tiny_checkpoint[0]), "--out", str(out), "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("taken", "argv", "said"),
    [
        ("images", ["--num", "2"], "is a file, where sample.py writes its folder images/"),
        ("grid.png/", [], "is a folder, where sample.py writes its picture grid.png"),
        ("interpolation.png/", [], "is a folder, where sample.py writes its picture interpolation.png"),
    ],
)
def test_sample_script_refuses_an_output_name_taken_by_the_other_kind_before_drawing(
    tiny_checkpoint, tmp_path, capsys, taken, argv, said
):
    """A file named images made the call fail after it had replaced the earlier grid.png and interpolation.png."""
    out = tmp_path / "samples"
    out.mkdir()
    earlier = {name: name.encode() for name in ("grid.png", "interpolation.png") if not taken.startswith(name)}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    (out / taken.rstrip("/")).mkdir() if taken.endswith("/") else (out / taken).write_text("notes")
    argv = [str(tiny_checkpoint[0]), "--out", str(out), "--device", "cpu", "--grid", "4", "--interp-rows", "2", *argv]
    assert load_script("sample").main(argv) == 2
    path = out / taken.rstrip("/")
    assert capsys.readouterr().err == f"error: {path} {said}: move it away, or give another --out\n"
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


def test_scripts_take_a_run_folder_for_its_latest_checkpoint(tiny_checkpoint, tmp_path, capsys):
    run = tiny_checkpoint[0].parent
    drawn = tmp_path / "drawn"
    argv = [str(run), "--out", str(drawn), "--grid", "4", "--interp-rows", "0", "--device", "cpu"]
    assert load_script("sample").main(argv) == 0
    assert (drawn / "grid.png").is_file() and not (drawn / "interpolation.png").exists()
    assert capsys.readouterr().err == f"wrote grid.png from step 123 to {drawn}\n"
    assert load_checkpoint(run)["step"] == 123
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder without a latest.pt"):
        load_checkpoint(tmp_path)
    # A latest.pt that is a folder (what --resume reads), named directly or through its run folder.
    (tmp_path / "run" / "latest.pt").mkdir(parents=True)
    for path in (tmp_path / "run", tmp_path / "run" / "latest.pt"):
        with pytest.raises(
            CheckpointError, match=f"checkpoint {tmp_path / 'run' / 'latest.pt'} is a folder, not a file"
        ):
            load_checkpoint(path)


def test_sample_script_images_folder_holds_the_last_calls_images_only(tiny_checkpoint, tmp_path, capsys):
    """An FID tool reads OUT/images/ whole: a smaller --num must not leave an earlier call's images there."""
    out = tmp_path / "fid"
    draw = ["--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    assert load_script("sample").main([str(tiny_checkpoint[0]), "--num", "7", *draw]) == 0
    (out / "images" / "notes.png").write_bytes(b"the user's own file")
    assert load_script("sample").main([str(tiny_checkpoint[0]), "--num", "3", *draw]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "notes.png"]
    assert not (out / "grid.png").exists() and not (out / "interpolation.png").exists()


def test_sample_script_keeps_the_earlier_images_when_a_call_fails_or_is_interrupted(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, sigterm_recorded
):
    """images/ is replaced only once a call has drawn all its images: a diverged checkpoint, or a Ctrl-C half-way,
    leaves the earlier call's set whole and no temporary folder behind."""
    out = tmp_path / "fid"
    draw = ["--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    sample = load_script("sample")
    assert sample.main([str(tiny_checkpoint[0]), "--num", "5", *draw]) == 0
    earlier = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    state = load_checkpoint(tiny_checkpoint[0])
    state["G"] = {name: torch.full_like(value, float("nan")) for name, value in state["G"].items()}
    save_checkpoint(tmp_path / "diverged.pt", state)
    assert sample.main([str(tmp_path / "diverged.pt"), "--num", "3", *draw]) == 2
    saved = []

    def save_then_interrupt(image, path, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        Path(path).write_bytes(b"drawn")

    monkeypatch.setattr(sample.Image.Image, "save", save_then_interrupt)
    assert sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "1", *draw]) == 130
    interrupted = "error: interrupted; each picture and images/ is whole, as this call or an earlier one wrote it"
    assert capsys.readouterr().err.splitlines()[-1] == interrupted
    assert saved and {p.name: p.read_bytes() for p in (out / "images").iterdir()} == earlier
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    # Where the folders cannot be exchanged, a Ctrl-C while the earlier set goes out and the new one in, one by one,
    # waits for the end of it: one whole set.
    monkeypatch.undo()
    monkeypatch.setattr(sample, "_renameat2", None)
    replace = os.replace

    def replace_then_press_ctrl_c(source, target):
        replace(source, target)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(sample.os, "replace", replace_then_press_ctrl_c)
    assert sample.main([str(tiny_checkpoint[0]), "--num", "4", "--seed", "2", *draw]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == interrupted
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # A SIGTERM there too (it left part of each, 2847 images of 3000 and 20000 in a helper's run).
    monkeypatch.setattr(sample.os, "replace", lambda a, b: (replace(a, b), signal.raise_signal(signal.SIGTERM)))
    assert sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "3", *draw]) == 143
    said = "error: stopped by SIGTERM; each picture and images/ is whole, as this call or an earlier one wrote it"
    assert capsys.readouterr().err.splitlines()[-1] == said and sigterm_recorded == []
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    # A SIGKILLed call cannot remove its temporary folder: the next call does, and leaves other programs' alone,
    # and a trainer's checkpoint in the writing (--out may be the run folder).
    killed, others = out / f".images.k1ll3d{TEMPORARY_SUFFIX}", out / ".images.backup"
    for folder in (killed, others):
        folder.mkdir()
        (folder / "000000.png").write_bytes(b"drawn")
    (out / f".latest.pt.wr1t1ng{TEMPORARY_SUFFIX}").write_bytes(b"half a checkpoint")
    (out / f".grid.png.k1ll3d{TEMPORARY_SUFFIX}").write_bytes(b"half a grid")  # atomic_write's, of a killed call
    monkeypatch.undo()
    assert sample.main([str(tiny_checkpoint[0]), "--num", "2", *draw]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".images.backup",
        f".latest.pt.wr1t1ng{TEMPORARY_SUFFIX}",
        "images",
    ]


def _skip_unless_folders_exchange(sample, tmp_path):
    """Skip a test of the exchange where renameat2 cannot exchange two folders in tmp_path's filesystem (no such
    function in the C library, a kernel before 3.15, a filesystem without RENAME_EXCHANGE)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    exchanged = sample._renameat2 and sample._renameat2(
        sample._AT_FDCWD, bytes(a), sample._AT_FDCWD, bytes(b), sample._RENAME_EXCHANGE
    )
    a.rmdir()
    b.rmdir()
    if exchanged != 0:
        pytest.skip("renameat2 cannot exchange folders here")


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_sample_script_full_disk_names_the_image_it_could_not_write(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A disk that fills while --num images are drawn ended with `error: [Errno 28] No space left on device`, which
    names no file (PIL's write gives none): the line names the image, as atomic_write's do for the other outputs;
    the earlier images stay whole and no temporary folder is left."""
    out = tmp_path / "fid"
    draw = [str(tiny_checkpoint[0]), "--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    sample = load_script("sample")
    assert sample.main([*draw, "--num", "3"]) == 0
    earlier, saved = _contents(out / "images"), []
    save = sample.Image.Image.save

    def save_until_the_disk_is_full(image, path, *args, **kwargs):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return save(image, path, *args, **kwargs)

    monkeypatch.setattr(sample.Image.Image, "save", save_until_the_disk_is_full)
    capsys.readouterr()
    assert sample.main([*draw, "--num", "4", "--seed", "1"]) == 2
    said = f"error: [Errno 28] cannot write {out / 'images' / '000002.png'}: No space left on device\n"
    assert capsys.readouterr().err.splitlines(keepends=True)[-1] == said
    assert _contents(out / "images") == earlier and sorted(p.name for p in out.iterdir()) == ["images"]


@pytest.mark.parametrize(
    "failure",
    [None, "no renameat2", errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP],
    ids=["exchanged", "no renameat2", "ENOSYS", "EINVAL", "EOPNOTSUPP"],
)
def test_sample_script_swaps_the_images_whole_keeping_the_folders_other_entries_and_mode(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, failure
):
    """The new set takes the earlier one's place in one step (the folder exchanged: another inode), with the
    folder's other entries (a file, a symbolic link as itself) and its mode, not mkdtemp's 0700; the earlier set is
    removed. Where renameat2 cannot exchange (no such function in the C library, or its error where the kernel or
    filesystem cannot), the images are replaced one by one in the same folder, to the same result."""
    sample = load_script("sample")

    def renameat2(*args):  # failing as libc's does
        ctypes.set_errno(failure)
        return -1

    if failure is None:
        _skip_unless_folders_exchange(sample, tmp_path)
    else:
        monkeypatch.setattr(sample, "_renameat2", None if failure == "no renameat2" else renameat2)
    draw = ["--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    out, reference = tmp_path / "fid", tmp_path / "reference"
    assert sample.main([str(tiny_checkpoint[0]), "--num", "5", "--out", str(out), *draw]) == 0
    images = out / "images"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(images.stat().st_mode) == 0o777 & ~umask  # a first call's: as any new folder
    (images / "notes.txt").write_text("the user's own file")
    (images / "notes.link").symlink_to("notes.txt")
    images.chmod(0o750)
    earlier_folder = images.stat().st_ino
    assert sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "1", "--out", str(out), *draw]) == 0
    assert sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "1", "--out", str(reference), *draw]) == 0
    drawn = {name: data for name, data in _contents(images).items() if name.endswith(".png")}
    assert drawn == _contents(reference / "images") and sorted(drawn) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(p.name for p in images.iterdir()) == [*sorted(drawn), "notes.link", "notes.txt"]
    assert (images / "notes.txt").read_text() == "the user's own file"
    assert (images / "notes.link").is_symlink() and os.readlink(images / "notes.link") == "notes.txt"
    assert stat.S_IMODE(images.stat().st_mode) == 0o750
    assert sorted(p.name for p in out.iterdir()) == ["images"]  # the earlier set gone with its temporary folder
    assert (images.stat().st_ino != earlier_folder) == (failure is None)


@pytest.mark.parametrize("case", ["subfolder", "symbolic link"])
def test_sample_script_replaces_the_images_one_by_one_where_its_folder_cannot_be_exchanged(
    tiny_checkpoint, tmp_path, capsys, case
):
    """A subfolder of images/ cannot be hard-linked into the new folder, and an images/ that is a symbolic link
    would be exchanged itself, not the folder it names: both keep the one-by-one swap, as before the exchange."""
    out, elsewhere = tmp_path / "fid", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    if case == "subfolder":
        (elsewhere / "kept").mkdir()
        (elsewhere / "kept" / "000000.png").write_bytes(b"the user's own file")
        elsewhere.rename(out / "images")
        elsewhere = out / "images"
    else:
        (out / "images").symlink_to(elsewhere)
    draw = ["--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    assert load_script("sample").main([str(tiny_checkpoint[0]), "--num", "2", *draw]) == 0
    names = ["000000.png", "000001.png"] + (["kept"] if case == "subfolder" else [])
    assert sorted(p.name for p in elsewhere.iterdir()) == names
    assert (out / "images").is_symlink() == (case == "symbolic link")
    assert case != "subfolder" or (elsewhere / "kept" / "000000.png").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["images"]


class _Killed(BaseException):
    """A SIGKILL as the call meets it: it ends there, and its temporary folder is not removed."""


def test_a_sample_call_killed_at_any_moment_of_its_swap_leaves_one_whole_set(tiny_checkpoint, tmp_path, capsys):
    """The call is killed before each change it makes to the folders (a link, a chmod, the exchange, a rename or
    unlink), in turn, until one is not: images/ holds the earlier set or the new one, each whole, with the user's
    file. (The one-by-one swap left part of each: 3 of 4 earlier images, say, and 1 of 3 new.)"""
    sample = load_script("sample")
    _skip_unless_folders_exchange(sample, tmp_path)
    draw = ["--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    earlier, new = tmp_path / "earlier", tmp_path / "new"
    assert sample.main([str(tiny_checkpoint[0]), "--num", "4", "--out", str(earlier), *draw]) == 0
    assert sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "1", "--out", str(new), *draw]) == 0
    for out in (earlier, new):
        (out / "images" / "notes.txt").write_text("the user's own file")
    sets = [_contents(earlier / "images"), _contents(new / "images")]
    kill_at, changes, found = 0, [], []

    def killed_at_its_turn(name, change):
        def change_or_die(*args, **kwargs):
            changes.append(name)
            if len(changes) > kill_at:
                raise _Killed
            return change(*args, **kwargs)

        return change_or_die

    for kill_at in itertools.count():
        out = tmp_path / f"killed_at_{kill_at}"
        shutil.copytree(earlier, out)
        changes.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
            for name in ("link", "chmod", "replace", "rename", "unlink"):
                patch.setattr(os, name, killed_at_its_turn(name, getattr(os, name)))
            patch.setattr(sample, "_renameat2", killed_at_its_turn("renameat2", sample._renameat2))
            try:
                status = sample.main([str(tiny_checkpoint[0]), "--num", "3", "--seed", "1", "--out", str(out), *draw])
            except _Killed:
                status = None
        images = _contents(out / "images")
        assert images in sets, f"killed at change {kill_at} of {changes}: images/ holds {sorted(images)}"
        found.append(sets.index(images))
        left = [p.name for p in out.iterdir() if p.name != "images"]
        assert all(name.startswith(".images.") and name.endswith(TEMPORARY_SUFFIX) for name in left), left
        if status is not None:
            break
    # Killed before the exchange or at it: the earlier set; after it, or not killed: the new one.
    assert status == 0 and "renameat2" in changes, changes
    exchange = changes.index("renameat2")
    assert found == [0] * (exchange + 1) + [1] * (len(changes) - exchange), (changes, found)


STOPS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM")]


@pytest.mark.parametrize("stop", [signal.raise_signal, dropped_by_a_finalizer], ids=["raised", "dropped"])
@pytest.mark.parametrize("signum, status, what", STOPS)
def test_evaluate_and_compare_runs_stop_on_a_signal_with_one_line_and_write_nothing(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, sigterm_recorded, signum, status, what, stop
):
    """Ctrl-C, or SIGTERM (`timeout`, a scheduler), ends them with one line and status 128 + signal, and nothing
    written. SIGTERM ended them at once, silently; compare_runs printed a traceback on Ctrl-C. A signal that Python
    dropped in a finalizer stops them too, before the --json or the --plot is written (not: written, status 0)."""
    evaluate, compare_runs = load_script("evaluate"), load_script("compare_runs")
    evaluate_models, compare = evaluate.evaluate_models, compare_runs.compare
    monkeypatch.setattr(
        evaluate, "evaluate_models", lambda *args, **kwargs: stop(signum) or evaluate_models(*args, **kwargs)
    )
    report = tmp_path / "eval.json"
    assert evaluate.main([str(tiny_checkpoint[0]), "--num", "4", "--device", "cpu", "--json", str(report)]) == status
    assert without_progress(capsys.readouterr().err).splitlines() == [f"error: {what}; nothing was written"]
    a, b = (_write_run(tmp_path / name, lr=1e-4, m_of_step=lambda s: 0.3, steps=[10, 20]) for name in "ab")
    monkeypatch.setattr(compare_runs, "compare", lambda *args: stop(signum) or compare(*args))
    assert compare_runs.main([str(a), str(b), "--plot", str(tmp_path / "m.png")]) == status
    assert capsys.readouterr().err.splitlines() == [f"error: {what}; nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and sigterm_recorded == []
    signal.raise_signal(signal.SIGTERM)  # each handler is put back
    assert sigterm_recorded == [signal.SIGTERM] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "at, stop",
    [(0, signal.raise_signal), (0, dropped_by_a_finalizer), (3, dropped_by_a_finalizer)],
    ids=["raised", "dropped-in-the-first", "dropped-in-the-last"],
)
@pytest.mark.parametrize("signum, status, what", STOPS)
def test_sample_script_stops_drawing_at_a_signal_even_one_a_finalizer_dropped(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, sigterm_recorded, signum, status, what, at, stop
):
    """Ctrl-C or SIGTERM while the images are drawn ends the call after the image it came in, with one line, status
    128 + signal, the earlier set whole and no temporary folder: raised there (SIGTERM ended the call at once, its
    temporary folder left behind), or dropped by Python in a finalizer (PIL's objects free themselves in them) in
    the first image (the call would draw all the others first) or in the last (it would replace the earlier set and
    exit 0)."""
    sample = load_script("sample")
    out = tmp_path / "fid"
    draw = [str(tiny_checkpoint[0]), "--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    assert sample.main([*draw, "--num", "4"]) == 0
    earlier, save, saved = _contents(out / "images"), sample.Image.Image.save, []

    def save_then_stop(image, path, *args, **kwargs):
        save(image, path, *args, **kwargs)
        saved.append(path)
        if len(saved) == at + 1:
            stop(signum)

    monkeypatch.setattr(sample.Image.Image, "save", save_then_stop)
    assert sample.main([*draw, "--num", "4", "--seed", "1"]) == status
    said = f"error: {what}; each picture and images/ is whole, as this call or an earlier one wrote it"
    assert capsys.readouterr().err.splitlines()[-1] == said and len(saved) == at + 1
    assert _contents(out / "images") == earlier and sorted(p.name for p in out.iterdir()) == ["images"]
    assert sigterm_recorded == []


def test_two_sample_calls_into_one_folder_do_not_mix_their_images(tiny_checkpoint, tmp_path, capsys):
    """A call writing into --out holds it: a second call there is refused in one line before it changes anything,
    as it would remove the first's temporary folder (taking it for a killed call's) and put its images among the
    first's."""
    out = tmp_path / "fid"
    out.mkdir()
    drawing = out / f".images.dr4w1ng{TEMPORARY_SUFFIX}"  # the first call's images, not yet in images/
    drawing.mkdir()
    (drawing / "000000.png").write_bytes(b"drawn")
    writing = os.open(out, os.O_RDONLY)  # as a call that is drawing holds it
    try:
        fcntl.flock(writing, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = [str(tiny_checkpoint[0]), "--num", "2", "--out", str(out), "--device", "cpu"]
        assert load_script("sample").main(args) == 2
    finally:
        os.close(writing)
    refused = f"error: --out {out}: another sample.py is writing into it; wait for it, or give another --out"
    assert capsys.readouterr().err.splitlines() == [refused] and list(out.iterdir()) == [drawing]
    assert _contents(drawing) == {"000000.png": b"drawn"}
    drawing.rename(out / "first")
    assert load_script("sample").main(args) == 0 and len(list((out / "images").iterdir())) == 2


@pytest.mark.parametrize("failing", [None, "syncfs", "renameat2"])
def test_sample_script_syncs_the_new_images_before_the_exchange_and_a_failure_is_one_line(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, failing
):
    """The new images' filesystem is synced (syncfs) before the folders are exchanged, so that a power loss after
    the exchange finds no image named without its data. A failed writeback, or an exchange that fails for another
    reason than a system that cannot exchange (EIO here), ends the call with one line naming the folders and status
    2, the earlier set whole, no temporary folder: not the images swapped in regardless."""
    sample = load_script("sample")
    _skip_unless_folders_exchange(sample, tmp_path)
    out = tmp_path / "fid"
    draw = [str(tiny_checkpoint[0]), "--out", str(out), "--grid", "0", "--interp-rows", "0", "--device", "cpu"]
    assert sample.main([*draw, "--num", "3"]) == 0
    earlier, events = _contents(out / "images"), []

    def recorded(name, call):
        def record_then_call(*args):
            events.append(name)
            if name == failing:
                ctypes.set_errno(errno.EIO)
                return -1
            return call(*args)

        return record_then_call

    monkeypatch.setattr(sample._libc, "syncfs", recorded("syncfs", sample._libc.syncfs))
    monkeypatch.setattr(sample, "_renameat2", recorded("renameat2", sample._renameat2))
    capsys.readouterr()
    status = sample.main([*draw, "--num", "2", "--seed", "1"])
    assert events == ["syncfs", "renameat2"][: 1 + (failing != "syncfs")]
    if failing is None:
        assert status == 0 and sorted(_contents(out / "images")) == ["000000.png", "000001.png"]
    else:
        drawing = f"'{re.escape(str(out))}/\\.images\\.[^/']+'"
        exchanged = "" if failing == "syncfs" else re.escape(f" -> '{out / 'images'}'")
        said = f"error: \\[Errno 5\\] Input/output error: {drawing}{exchanged}\n"
        assert status == 2 and re.fullmatch(said, capsys.readouterr().err.splitlines(keepends=True)[-1])
        assert _contents(out / "images") == earlier and sorted(p.name for p in out.iterdir()) == ["images"]


def test_evaluate_script_warns_in_one_line(tiny_checkpoint, tmp_path, capsys):
    """A file it skips is reported as "warning: ...", not as Python's "file:line: Category: message" and source."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(draw_faces(1, 20, seed=i)[0]).save(folder / f"{i}.png")
    (folder / "4.png").write_bytes(b"not a png")
    argv = [str(tiny_checkpoint[0]), "--data", str(folder), "--num", "4", "--device", "cpu"]
    assert load_script("evaluate").main(argv) == 0
    err = without_progress(capsys.readouterr().err)
    assert err.startswith("warning: ") and "skipped 1 of 5 image files" in err and "Warning" not in err, err
    assert err.count("\n") == 1, err


def test_sample_script_warns_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The fallback from Triton to PyTorch (BEGAN_FAST_IMPL=triton where triton is not installed) is "warning: ...",
    as in evaluate.py and train.py, not Python's "file:line: UserWarning: message" with the source line under it."""
    from began_fast import ops

    monkeypatch.setenv("BEGAN_FAST_IMPL", "triton")
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    ops._warn_fallback.cache_clear()  # warned once per process: another test may have had it
    argv = [str(tiny_checkpoint[0]), "--out", str(tmp_path / "s"), "--grid", "4", "--interp-rows", "0"]
    assert load_script("sample").main(argv + ["--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: began_fast: impl='triton' unavailable (triton is not installed)"), err
    assert "UserWarning" not in err and err.count("\n") == 2, err  # the warning, then "wrote grid.png ..."


def _folder_run(tiny_checkpoint, tmp_path):
    """(checkpoint, folder): the tiny checkpoint as if trained on a folder of 6 faces holding out the last 2."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(draw_faces(1, 20, seed=i)[0]).save(folder / f"{i}.png")
    state = load_checkpoint(tiny_checkpoint[0])
    state["data_config"] = dataclasses.asdict(DataConfig(path=str(folder), holdout=2))
    save_checkpoint(tmp_path / "folder_run.pt", state)
    return tmp_path / "folder_run.pt", folder


def test_the_evaluation_table_counts_one_image_in_the_singular():
    """One image is counted in the singular: the table said "on 1 held-out images" (evaluate.py --num 1)."""
    report = {"checkpoint": "c.pt", "step": 3, "data": "d", "swd": {"16": 1.0, "avg": 1.0}, "recon_l1": 0.5}
    table = load_script("evaluate").format_table(report | {"recon_num": 1, "recon_images": "held-out"})
    assert "(mean |x - D(x)| on 1 held-out image)" in table


def test_evaluate_script_reports_ds_error_on_the_held_out_count_below_num(tiny_checkpoint, tmp_path, capsys):
    """A folder run that held out 2 images, evaluated with --num 4: D's error is measured on those 2, and the table
    and JSON say 2, not --num."""
    checkpoint, folder = _folder_run(tiny_checkpoint, tmp_path)
    out = tmp_path / "eval.json"
    argv = [str(checkpoint), "--data", str(folder), "--num", "4", "--device", "cpu", "--json", str(out)]
    assert load_script("evaluate").main(argv) == 0
    assert "on 2 held-out images" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num"] == 4 and report["recon_images"] == "held-out" and report["recon_num"] == 2


def test_evaluate_script_warns_that_a_folder_run_without_data_is_scored_against_the_built_in_faces(
    tiny_checkpoint, tmp_path, capsys
):
    """Without --data the built-in faces stand in for the data the run trained on (as before), with one warning that
    names that data and the flag; a run of the built-in faces gets none (test_evaluate_script_end_to_end)."""
    checkpoint, folder = _folder_run(tiny_checkpoint, tmp_path)
    assert load_script("evaluate").main([str(checkpoint), "--num", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert without_progress(captured.err) == (
        f"warning: the checkpoint trained on {folder}, but without --data it is scored against the built-in faces: "
        f"pass --data {folder} to score it against the data it trained on\n"
    )
    assert "real data    builtin faces: 4 images" in captured.out


def test_evaluation_on_the_runs_own_celeba_folder_however_it_is_named(tmp_path):
    """A CelebA folder is named by itself or by its parent: either way it is the data the run trained on, so its
    crop and held-out images are the run's, not another data set's defaults."""
    images = tmp_path / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(draw_faces(1, 64, seed=i)[0]).resize((178, 218)).save(images / f"{i:06d}.jpg")  # CelebA's size
    trained_on = DataConfig(path=str(tmp_path / "celeba"), crop="center", crop_size=30, holdout=2)
    evaluation_images = load_script("evaluate").evaluation_images
    for path in (tmp_path / "celeba", images, tmp_path / "celeba" / ".." / "celeba"):
        real, held_out, recon_images = evaluation_images(trained_on, str(path), 4, 16)
        assert "center crop 30" in real.describe() and len(real) == 4, path
        assert recon_images == "held-out" and len(held_out) == 2, path
    # The run's data gone from where it was: --data with as many training images as the run read is that data,
    # moved (its crop and held-out images are the run's; before, its training images were scored as held out);
    # with another count, or no count in the checkpoint, it is other data.
    moved = dataclasses.replace(trained_on, path=str(tmp_path / "gone"))
    with pytest.warns(UserWarning, match=f"the run's data {tmp_path / 'gone'} is gone; .* taken for that data, moved"):
        real, held_out, recon_images = evaluation_images(moved, str(images), 4, 16, 4)
    assert "center crop 30" in real.describe() and len(real) == 4 and len(held_out) == 2
    for trained_images in (5, None):
        real, held_out, recon_images = evaluation_images(moved, str(images), 4, 16, trained_images)
        assert "celeba crop" in real.describe() and held_out is None and recon_images == "held-out"
    # The run's folder gone and the HDF5 file made of it given: that data, moved, though the run saved its crop
    # (runs do since a renamed CelebA folder was cropped as a plain one), which an HDF5 file's images have had.
    h5 = tmp_path / "celeba16.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("images", data=draw_faces(6, 16, seed=0))
    with pytest.warns(UserWarning, match="is gone; .* taken for that data, moved: its crop and holdout are reused"):
        real, held_out, recon_images = evaluation_images(moved, str(h5), 4, 16, 4)
    assert "hdf5" in real.describe() and len(real) == 4 and len(held_out) == 2 and recon_images == "held-out"


def _write_run(folder, *, lr, m_of_step, steps, swd=None, image_size=16, data=None, **train):
    """A run folder as scripts/train.py writes it, with M = m_of_step(step) and SWD evaluations {step: value}."""
    folder.mkdir()
    model = dataclasses.replace(TINY, image_size=image_size)
    config = {
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(TrainConfig(lr=lr, lr_floor=lr / 5, **train)),
        "data": dataclasses.asdict(DataConfig(**(data or {}))),
    }
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"step": s, "m": m_of_step(s), "k": 0.01, "lr": lr} for s in steps]
    rows += [{"step": s, "swd": v} for s, v in (swd or {}).items()]
    (folder / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def compare(capsys):
    """Run compare_runs.main in this process (a subprocess would spend seconds importing torch): (rc, out, err)."""
    main = load_script("compare_runs").main

    def run(argv):
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


def test_compare_runs_at_equal_steps_with_a_swd_verdict(tmp_path, compare, tiny_checkpoint):
    # A logs every 50 steps up to 1000, B every 100 up to 1500: common steps 100, 200, ..., 1000.
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 1001, 50), swd={500: 90.0})
    b = _write_run(
        tmp_path / "b", lr=3e-4, m_of_step=lambda s: 0.2, steps=range(100, 1501, 100), swd={500: 60.0, 1500: 40.0}
    )
    shutil.copy(tiny_checkpoint[0], a / "latest.pt")
    rc, out, err = compare([a, b, "--json", "--plot", tmp_path / "m.png"])
    assert rc == 0, err
    c = json.loads(out)
    assert c["checkpoint_steps"] == [123, None]
    assert c["common_steps"] == {"count": 10, "first": 100, "last": 1000}
    assert c["m_mean_abs_diff"] == pytest.approx(0.1) and c["m_at_last_common_step"] == [0.3, 0.2]
    assert c["swd_at_common_steps"] == [{"step": 500, "swd": [90.0, 60.0]}]
    assert c["config_diff"]["train.lr"] == [1e-4, 3e-4]
    assert c["verdict"].startswith("b is better than a: SWD at step 500")
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert err == f"plot written to {tmp_path / 'm.png'}\n"
    rc, out, err = compare([a, b, "--plot", tmp_path / "m.txt"])
    assert (rc, out, err) == (
        2,
        "",
        f"error: --plot {tmp_path / 'm.txt'} must name a .png file (the plot is a PNG image)\n",
    )
    assert not (tmp_path / "m.txt").exists()
    (tmp_path / "a_file").write_text("")
    plot = tmp_path / "a_file" / "m.png"
    rc, out, err = compare([a, b, "--plot", plot])  # refused before the table is printed
    assert (rc, out, err) == (2, "", f"error: --plot {plot}: {plot.parent} is a file, not a folder\n")
    rc, out, err = compare([a, tmp_path / "none", "--plot", tmp_path / "new" / "m.png"])
    assert rc == 2 and err.startswith(f"error: run folder {tmp_path / 'none'} does not exist")
    assert not (tmp_path / "new").exists()
    rc, table, _ = compare([a, b])
    assert rc == 0 and "verdict: b is better than a" in table and "config train.lr: 0.0001 vs 0.0003" in table


def test_evaluate_and_compare_runs_replace_no_file_of_a_run(tmp_path, compare, tiny_checkpoint, capsys):
    """`evaluate.py RUN --json RUN/config.json` replaced the run's config.json, the only record of how it ran, with
    the report (exit 0); `compare_runs.py A B --plot B/convergence.png` the run's own plot. Each is refused before
    any work, and the file is as it was; a new name in the run folder is written."""
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50))
    b = _write_run(tmp_path / "b", lr=3e-4, m_of_step=lambda s: 0.2, steps=range(50, 501, 50))
    for run in (a, b):
        shutil.copy(tiny_checkpoint[0], run / "latest.pt")
        (run / "samples").mkdir()
    before = {path: path.read_bytes() for path in (a / "config.json", a / "latest.pt")}
    for plot in (b / "convergence.png", b / "samples" / "step_0000500.png"):
        run = plot.parent.parent if plot.parent.name == "samples" else plot.parent
        said = f"error: --plot {plot} is in the run {run}, whose files it would replace: give another file name\n"
        assert compare([a, b, "--plot", plot]) == (2, "", said)
        assert not plot.exists()
    assert compare([a, b, "--plot", b / "against_a.png"])[0] == 0 and (b / "against_a.png").is_file()
    evaluate = load_script("evaluate")
    for report in (a / "config.json", a / "pictures.json", a / "samples" / "report.json"):
        assert evaluate.main([str(a), "--json", str(report), "--device", "cpu", "--num", "4"]) == 2
        assert "whose files it would replace: give another file name" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in before} == before and not (a / "pictures.json").exists()
    assert evaluate.main([str(a), "--json", str(a / "eval.json"), "--device", "cpu", "--num", "4"]) == 0
    assert json.loads((a / "eval.json").read_text())["step"] == 123


def test_compare_runs_judges_swd_over_its_last_evaluations_and_within_run_to_run_noise(tmp_path, compare):
    """One snapshot's SWD is noisy (two runs of one setting: 167.85 and 226.59 at step 4000, 26% apart): the verdict
    averages the last three common evaluations, and calls a difference within that noise even (under 30%), but not
    one beyond it (the gamma study's 89.67 against 131.28 at step 10,000, 32% apart)."""
    steps = range(2000, 6001, 2000)
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.2, steps=steps, swd=dict.fromkeys(steps, 100.0))
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.2, steps=steps, swd={2000: 200, 4000: 200, 6000: 80})
    snapshots = [
        _write_run(tmp_path / name, lr=1e-4, m_of_step=lambda s: 0.2, steps=[step], swd={step: swd})
        for name, step, swd in [("c", 4000, 167.85), ("d", 4000, 226.59), ("e", 10000, 89.67), ("f", 10000, 131.28)]
    ]
    # Four common evaluations: the last three say g is better, the first three h.
    steps = range(2000, 8001, 2000)
    g = _write_run(tmp_path / "g", lr=1e-4, m_of_step=lambda s: 0.2, steps=steps, swd=dict.fromkeys(steps, 100.0))
    h_swd = {2000: 10, 4000: 80, 6000: 80, 8000: 290}
    h = _write_run(tmp_path / "h", lr=1e-4, m_of_step=lambda s: 0.2, steps=steps, swd=h_swd)
    pairs = [(a, b), snapshots[:2], snapshots[2:], (g, h)]
    verdicts = [json.loads(compare([x, y, "--json"])[1])["verdict"] for x, y in pairs]
    assert verdicts[0] == "a is better than b: mean SWD at steps 2000, 4000, 6000: 100 (a) vs 160 (b)"
    assert verdicts[1] == (
        "even: SWD at step 4000: 167.8 vs 226.6, apart by less than 30% of the larger, within two runs' noise"
    )
    assert verdicts[2] == "e is better than f: SWD at step 10000: 89.67 (e) vs 131.3 (f)"
    assert verdicts[3] == "g is better than h: mean SWD at steps 4000, 6000, 8000: 100 (g) vs 150 (h)"


def test_compare_runs_gives_ms_verdict_beside_swds(tmp_path, compare):
    """A run trained 300 steps against one that did not learn (lr 1e-9): SWD called them even (278 vs 204, the
    collapsed G's samples scoring worse than the untrained G's noise-like ones) though M, 0.20 against 0.41, tells
    them apart (found by an evaluation-audit helper). M's verdict is said beside SWD's; where M is the verdict, once."""
    steps = range(25, 301, 25)
    a = _write_run(tmp_path / "a", lr=5e-4, m_of_step=lambda s: 0.2, steps=steps, swd={100: 290, 200: 270, 300: 274})
    b = _write_run(tmp_path / "b", lr=1e-9, m_of_step=lambda s: 0.41, steps=steps, swd={100: 204, 200: 204, 300: 204})
    rc, out, err = compare([a, b])
    assert rc == 0, err
    assert "verdict: even: mean SWD at steps 100, 200, 300: 278 vs 204, apart by less than 30%" in out
    assert "by M alone: a is better than b: mean M over the last 10 common steps: 0.2 (a) vs 0.41 (b)" in out
    c = _write_run(tmp_path / "c", lr=1e-9, m_of_step=lambda s: 0.41, steps=steps)
    for other, m_verdict in ((b, "a is better than b: mean M"), (c, None)):  # c: no SWD, M is the verdict
        compared = json.loads(compare([a, other, "--json"])[1])
        assert compared["m_verdict"] is None if m_verdict is None else compared["m_verdict"].startswith(m_verdict)
    assert "by M alone" not in compare([a, c])[1]


def test_compare_runs_says_how_many_lines_of_a_runs_stats_it_skipped(tmp_path, compare):
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50), swd={500: 90.0})
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50), swd={500: 91.0})
    lines = (b / "stats.jsonl").read_text().splitlines()
    lines[3] = lines[3][:10]  # damaged in the middle: step 200's row
    (b / "stats.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = compare([a, b])
    assert rc == 0 and "common steps      9 logged" in out
    assert err == f"warning: {b / 'stats.jsonl'}: skipped line 4, not a stats row\n"


def test_compare_runs_config_diff_holds_settings_not_the_runs_names_and_folders(tmp_path, compare):
    """Two real runs' config.json always differ in run_id and out, and often in resume and quiet: the diff listed
    them beside the settings that matter (found by a new-user walkthrough). A setting of how it ran stays."""
    folders = []
    for name, invocation in (("a", {"resume": False, "quiet": True}), ("b", {"resume": True, "quiet": False})):
        folder = _write_run(tmp_path / name, lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50))
        config = json.loads((folder / "config.json").read_text())
        run = {"run_id": f"{name}-run", "out": str(folder), "amp": "bf16" if name == "b" else None, **invocation}
        (folder / "config.json").write_text(json.dumps(config | {"run": run}))
        folders.append(folder)
    assert json.loads(compare([*folders, "--json"])[1])["config_diff"] == {"run.amp": [None, "bf16"]}


def test_compare_runs_takes_a_run_that_saved_no_crop_for_the_crop_its_folder_took(tmp_path, compare):
    """Runs save the crop they take since a CelebA folder moved under another name was cropped as a plain one on
    resume; an earlier run on the same folder saved none. They are compared, not refused as of different data."""
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    Image.fromarray(draw_faces(1, 64, seed=0)[0]).resize((178, 218)).save(folder / "000001.jpg")
    data = {"path": str(folder)}
    steps, swd = range(50, 501, 50), {500: 90.0}
    earlier = _write_run(tmp_path / "earlier", lr=1e-4, m_of_step=lambda s: 0.3, steps=steps, swd=swd, data=data)
    later = _write_run(
        tmp_path / "later", lr=1e-4, m_of_step=lambda s: 0.3, steps=steps, swd=swd, data=data | {"crop": "celeba"}
    )
    compared = json.loads(compare([earlier, later, "--json"])[1])
    assert compared["config_diff"] == {} and compared["verdict"].startswith("even: SWD at step 500")
    centre = _write_run(
        tmp_path / "centre", lr=1e-4, m_of_step=lambda s: 0.3, steps=steps, swd=swd, data=data | {"crop": "center"}
    )
    assert json.loads(compare([earlier, centre, "--json"])[1])["verdict"].startswith("none: SWD does not compare")


def test_compare_runs_refuses_a_latest_pt_of_another_run(tmp_path, compare, tiny_checkpoint):
    """A latest.pt copied into another run's folder: its step was shown beside that run's stats (found by an
    evaluation-audit helper); refused as train.py refuses to resume it there. One of the same run is read."""
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50))
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.3, steps=range(50, 501, 50))
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(config | {"run": {"run_id": "b-run"}}))
    state = load_checkpoint(tiny_checkpoint[0])
    save_checkpoint(b / "latest.pt", state | {"run_id": "b-run"})
    rc, out, err = compare([a, b])
    assert rc == 0 and "checkpoint step   None vs 123" in out, err
    save_checkpoint(b / "latest.pt", state | {"run_id": "p-run"})
    assert compare([a, b]) == (
        2,
        "",
        f"error: {b / 'latest.pt'} belongs to another run (p-run) than the folder's config.json and stats.jsonl "
        "(b-run): its step is not theirs\n",
    )


def test_compare_runs_keeps_each_runs_swd_whatever_the_runs_are_named(tmp_path, compare):
    step = _write_run(tmp_path / "step", lr=1e-4, m_of_step=lambda s: 0.3, steps=[100], swd={100: 50.0})
    other = _write_run(tmp_path / "other", lr=1e-4, m_of_step=lambda s: 0.3, steps=[100], swd={100: 90.0})
    rc, out, err = compare([step, other, "--json"])
    assert rc == 0, err
    assert json.loads(out)["swd_at_common_steps"] == [{"step": 100, "swd": [50.0, 90.0]}]


def test_compare_runs_without_evaluations_judges_by_m_and_calls_small_differences_even(tmp_path, compare):
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.2, steps=range(50, 501, 50))
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.205, steps=range(50, 501, 50))
    rc, out, err = compare([a, b, "--json"])
    assert rc == 0, err
    c = json.loads(out)
    assert c["config_diff"] == {} and c["verdict"].startswith("even: mean M over the last 10 common steps")


def test_compare_runs_judges_m_over_the_last_common_steps_and_calls_under_10_percent_even(tmp_path, compare):
    """20 common steps: b's M is half a's over the first 10, 8% above it over the last 10 (within two seeds' noise,
    3.9%, with a margin: even); c's is 14% above a's throughout (beyond it)."""
    steps = range(50, 1001, 50)
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.2, steps=steps)
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.1 if s <= 500 else 0.216, steps=steps)
    c = _write_run(tmp_path / "c", lr=1e-4, m_of_step=lambda s: 0.228, steps=steps)
    with_b, with_c = (json.loads(compare([a, other, "--json"])[1]) for other in (b, c))
    assert with_b["m_tail_mean"] == pytest.approx([0.2, 0.216])
    assert with_b["verdict"] == (
        "even: mean M over the last 10 common steps (no common SWD evaluation; M is a weaker guide): 0.2 vs 0.216, "
        "apart by less than 10% of the larger, within two runs' noise"
    )
    assert with_b["m_mean_abs_diff"] == pytest.approx((10 * 0.1 + 10 * 0.016) / 20)  # the gaps, not their sum
    assert with_c["verdict"].startswith("a is better than c: mean M over the last 10 common steps")


def test_compare_runs_of_two_folders_of_one_name_names_each_by_its_path(tmp_path, compare):
    """runs1/x against runs2/x: each run is named by the path given, in the table and in the plot's legend."""
    for parent in ("runs1", "runs2"):
        (tmp_path / parent).mkdir()
    a = _write_run(tmp_path / "runs1" / "x", lr=1e-4, m_of_step=lambda s: 0.3, steps=[100, 200])
    b = _write_run(tmp_path / "runs2" / "x", lr=1e-4, m_of_step=lambda s: 0.2, steps=[100, 200])
    rc, out, err = compare([a, b, "--json", "--plot", tmp_path / "compared.PNG"])  # the suffix in any case
    assert rc == 0, err
    c = json.loads(out)
    assert c["runs"] == [str(a), str(b)] and c["verdict"].startswith(f"{b} is better than {a}: mean M")
    assert (tmp_path / "compared.PNG").stat().st_size > 1000


@pytest.mark.parametrize(
    ("change", "evaluated", "withheld"),
    [
        ({"image_size": 32}, True, "SWD does not compare runs with different model.image_size 16 vs 32"),
        ({"eval_images": 1024}, True, "SWD does not compare runs with different train.eval_images 512 vs 1024"),
        ({"data": {"path": "c64.h5"}}, True, "SWD does not compare runs with different data.path None vs c64.h5"),
        ({"data": {"builtin_seed": 1}}, True, "SWD does not compare runs with different data.builtin_seed 0 vs 1"),
        ({"gamma": 0.7}, False, "M does not compare runs with different train.gamma 0.5 vs 0.7"),
        ({"gamma": 0.7}, True, None),  # SWD compares the samples, whatever gamma trained them
    ],
)
def test_compare_runs_gives_no_verdict_where_the_measure_differs(tmp_path, compare, change, evaluated, withheld):
    swd = {500: 60.0} if evaluated else None
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=[500], swd=swd and {500: 90.0})
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.2, steps=[500], swd=swd, **change)
    rc, out, err = compare([a, b, "--json"])
    assert rc == 0, err
    verdict = json.loads(out)["verdict"]
    assert verdict == f"none: {withheld}" if withheld else verdict.startswith("b is better than a: SWD at step 500")


def test_compare_runs_reads_the_good_rows_of_a_damaged_stats_file(tmp_path, compare):
    """Rows damaged on disk or by hand (bytes that are not UTF-8, no step, not an object, an M that is not a finite
    number) are skipped, by the comparison and by the plot alike."""
    a = _write_run(tmp_path / "a", lr=1e-4, m_of_step=lambda s: 0.3, steps=[100, 200])
    b = _write_run(tmp_path / "b", lr=1e-4, m_of_step=lambda s: 0.2, steps=[100, 200])
    with open(b / "stats.jsonl", "ab") as f:
        f.write(b'{"step": 300, "m": 0.1}\xff\xfe\n{"m": 0.1}\n5\n{"step": 200.5, "m": 0.1}\n')
        f.write(b'{"step": 400, "m": "x"}\n{"step": 500, "m": NaN}\n{"step": 200, "m": Infinity}\n')
    rc, out, err = compare([a, b, "--json", "--plot", tmp_path / "m.png"])
    assert rc == 0, err
    c = json.loads(out)
    assert c["common_steps"] == {"count": 2, "first": 100, "last": 200} and c["m_at_last_common_step"] == [0.3, 0.2]
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_compare_runs_rejects_missing_or_incomplete_folders(tmp_path):
    good = _write_run(tmp_path / "good", lr=1e-4, m_of_step=lambda s: 0.2, steps=[50])
    (tmp_path / "no_stats").mkdir()
    (tmp_path / "no_stats" / "config.json").write_text("{}")
    late = _write_run(tmp_path / "late", lr=1e-4, m_of_step=lambda s: 0.2, steps=[100])
    damaged = _write_run(tmp_path / "damaged", lr=1e-4, m_of_step=lambda s: 0.2, steps=[50])
    (damaged / "latest.pt").write_bytes(b"not a checkpoint")
    compare_runs = load_script("compare_runs")
    for other, match in [
        (tmp_path / "nowhere", "does not exist"),
        (good / "config.json", "is a file, not a folder"),
        (tmp_path / "no_stats", "stats.jsonl is missing"),
        (late, "share no logged step"),
        (damaged, "cannot be read"),
    ]:
        with pytest.raises(ValueError, match=match):
            compare_runs.compare(compare_runs.load_run(good), compare_runs.load_run(other))
    # As a user runs it, uninstalled, from the repository root.
    done = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", str(good), str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: run folder") and done.stderr.count("\n") == 1


def _quality_run(out: Path, steps: int, fast_flags: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAST_FLAGS": fast_flags, "EVAL_NUM": "32", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", "scripts/quality_run.sh", str(out), str(steps), "demo"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # the process ended while we looked
            continue
        if text in line:
            found.append(line)
    return found


def test_quality_run_trains_evaluates_and_compares_both_steps(tmp_path):
    """scripts/quality_run.sh (the GPU session's quality phase) on the CPU: the demo preset for 10 steps, the
    fast run in bf16 (no CUDA graphs without a GPU). It exits 0 with both evaluations and the comparison written."""
    done = _quality_run(tmp_path / "q", 10, "--amp", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for run in ("reference", "fast"):
        report = json.loads((tmp_path / "q" / run / "eval.json").read_text())
        assert report["step"] == 10 and report["num"] == 32
    config = json.loads((tmp_path / "q" / "fast" / "config.json").read_text())
    assert config["run"]["amp"] == "bf16" and config["run"]["reference_step"] is False
    assert "verdict:" in (tmp_path / "q" / "compare.txt").read_text()
    assert (tmp_path / "q" / "compare.png").stat().st_size > 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the runs' processes")
def test_quality_run_stops_at_the_first_failed_run_and_ends_the_other(tmp_path):
    """A fast run that fails at its start (--cuda-graphs on the CPU) ends the check at once, with the failed run's
    log named, and stops the reference run rather than waiting out its steps."""
    out = tmp_path / "q"
    done = _quality_run(out, 100_000, "--cuda-graphs --device cpu", timeout=120)
    assert done.returncode == 1
    assert f"the fast run failed: {out}/fast.log" in done.stdout and "needs a CUDA device" in done.stdout
    deadline = time.monotonic() + 10  # the reference run was sent SIGTERM as the script ended
    while _processes_naming(f"{out}/reference") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(f"{out}/reference")


def test_quality_run_ends_after_the_run_it_stops_has_ended(tmp_path):
    """A run stopped by SIGTERM finishes its step and writes its checkpoint before it exits. The script ended before
    that: gpu_checks.sh, which stops it at a call's limit, then moved the checkpoints away and packed the folder
    while the runs still wrote. A stand-in python: the fast run fails at its start, the reference run takes a second
    to stop and says so in a file. The fast run fails once the reference run's trap is set: when it failed at once,
    the reference run was now and then sent SIGTERM while its bash still started, before its trap (1 run in 3 under
    load failed so)."""
    stopped, trapped = tmp_path / "stopped", tmp_path / "trapped"
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/bin/bash\n"
        f'case "$*" in *--reference-step*) ;; *) for _ in $(seq 600); do [ -e {trapped} ] && break; sleep 0.05; done\n'
        "    exit 1 ;; esac\n"
        f"trap 'sleep 1; touch {stopped}; exit 143' TERM\n"
        f"touch {trapped}\n"
        "sleep 60 & wait\n"
    )
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in)}
    command = ["bash", "scripts/quality_run.sh", str(tmp_path / "q"), "10", "demo"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "the fast run failed" in done.stdout, done.stdout + done.stderr
    assert stopped.exists()
