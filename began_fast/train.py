"""The training loop behind scripts/train.py, readable top to bottom.

A run folder holds config.json, stats.jsonl (a row per logging window, and a row per evaluation with "swd",
"recon_l1", "recon_images" and "recon_num": D's error on that many held-out images, or on training images when the run
holds none out),
TensorBoard events (when tensorboard is installed), samples/step_XXXXXXX.png from a fixed z with progress.png and
progress.gif (the grids over time), reconstruction.png (real images next to D(x)), convergence.png (M, k_t, lr
and SWD against the step), latest.pt and snapshots step_XXXXXXX.pt. The step keeps its statistics on the
device; this loop reads them every `log_every` steps, and that read is where a NaN or inf is caught.

Under torchrun (distributed.py) every rank runs this loop on its shard of each global batch; only rank 0 writes the
run folder and prints. Every rank still reads its statistics window on the same steps (the ranks hold the same
global statistics, so a NaN stops them all together), and at those steps the ranks agree whether any was asked
to stop: one tiny all-reduce. A rank whose loop finishes no step for --dist-timeout (another rank died or hung)
ends with one line (hang_guard.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from began_fast import metrics, ops, reports
from began_fast.atomic_files import atomic_write, remove_stale_temporaries
from began_fast.checkpoint import another_runs, config_dict, load_checkpoint, misfit, save_checkpoint, saved_configs
from began_fast.cli import STOP_SIGNALS, Interrupted, check_workers, say_line, say_line_in_a_handler
from began_fast.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from began_fast.data import fitted_crop, held_out_images, make_batches, open_source, resolve_source
from began_fast.data.gpu_resident import GpuResidentStream
from began_fast.data.sampler import data_position
from began_fast.distributed import Collectives, cores_per_rank, machine_cores
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.hang_guard import HangGuard
from began_fast.model import Discriminator, Generator, carry_after
from began_fast.run_folder import (
    DRAWN_WITH_THE_GRIDS,
    PICTURES_RECORD,
    RUN_FILES,
    RUN_FOLDERS,
    RUN_LOCK,
    SNAPSHOTS,
    snapshot_path,
)
from began_fast.seeds import FIXED_Z, generator, uniform_z
from began_fast.step import ReferenceStep, StepState
from began_fast.tensorboard_log import open_tensorboard
from began_fast.wording import counted

SAMPLE_GRID = 64  # images in a sample grid (8 x 8)
PRECOMPILE_ENV = "BEGAN_FAST_PRECOMPILE"  # "0": no head start, the first step compiles the kernels; "1", unset: one
# The longest a run waits for another process of its machine to compile (compile_kernels): one stopped while it
# compiles must not stop this one for ever; after it, this one compiles on its own share of the cores.
COMPILER_WAIT_S = 600.0
RECONSTRUCTION_PAIRS = 16
# A stop signal repeated sooner is the same request (stop_on_interrupt): torchrun's launcher repeats the signal it
# got to its workers at once, and they got it too when it came from a scheduler that signals every process of a job
# (a terminal's Ctrl-C reaches the launcher alone: the workers run in sessions of their own). A person's second
# Ctrl-C, to stop at once, comes later.
REPEAT_WINDOW_S = 2.0
LOCK_PATIENCE_S = 1.0  # how long lock_run_folder tries before it says the folder is another run's
# On --resume the checkpoint's configs stand. These settings may still be given anew: how long the run goes, how
# it is watched, and where and how its data is read (the same data, moved); any other one must match the saved.
RESUME_MAY_CHANGE = {
    "model": set(),
    "train": {"steps", "log_every", "sample_every", "checkpoint_every", "snapshot_every", "eval_every", "eval_images"},
    "data": {"path", "loader", "num_workers"},
}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or inf in the losses); the message is one line meant for the user."""


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, as opposed to what it trains (the configs)."""

    out: Path
    device: str = "cpu"
    impl: str = "auto"
    reference_step: bool = False  # the specification's step (D on x and on G(z) apart, float32), not the fast one
    amp: str | None = None  # None, "bf16" or "fp16"
    cuda_graphs: bool = False
    resume: bool = False
    quiet: bool = False  # no progress bar

    def __post_init__(self):
        if self.reference_step and (self.amp or self.cuda_graphs):
            raise ConfigError("--reference-step runs in float32 without graphs; drop --amp / --cuda-graphs")
        try:
            str(self.out).encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8, decoded as lone surrogates
            # TensorBoard's log writer stopped the run in a traceback at its start, once config.json was written.
            shown = str(self.out).encode(errors="backslashreplace").decode()
            raise ConfigError(f"--out {shown} is not a UTF-8 path, as the run's logs need: give one that is") from None
        # The device may be the default, not one the user gave: on a machine without a GPU it is the CPU.
        found = " (no GPU found, or --device cpu)" if self.device == "cpu" else ""
        this_device = f"and this run's is {self.device}{found}"
        if self.cuda_graphs and not str(self.device).startswith("cuda"):
            raise ConfigError(f"--cuda-graphs needs a CUDA device, {this_device}")
        device = torch.device(self.device)
        try:
            impl = ops.resolve_impl(self.impl, device)
        except ValueError as e:  # an unknown impl, or BEGAN_FAST_IMPL set to one
            raise ConfigError(str(e)) from None
        if os.environ.get(PRECOMPILE_ENV, "") not in ("", "0", "1"):
            raise ConfigError(
                f"{PRECOMPILE_ENV} must be 0 (no head start: the first step compiles the kernels) or 1 (the default), "
                f"got {os.environ[PRECOMPILE_ENV]!r}"
            )
        if impl == "triton":
            from kernels.interpreter import runs_on  # triton is installed: resolve_impl said so

            if not runs_on(device):
                raise ConfigError(
                    f"the Triton kernels need a CUDA device, {this_device}: --impl torch runs PyTorch's layers "
                    "(TRITON_INTERPRET=1 runs the kernels on the CPU, at minutes per step: for tests)"
                )


@dataclass
class Run:
    """Everything a training run is made of, built by `setup_run` (fresh or from the run folder's latest.pt)."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data_cfg: DataConfig
    opts: RunOptions
    G: Generator
    D: Discriminator
    step: StepState
    fixed_z: torch.Tensor
    collectives: Collectives | None = None  # None for a single process
    # How many training images the run reads (set when train() opens them), and how many the run read before its
    # checkpoint (None: a new run, or a checkpoint that did not record it).
    data_images: int | None = None
    saved_data_images: int | None = None
    # The digest of those images (training_images_digest), and the one the checkpoint recorded (None as above).
    data_digest: int | None = None
    saved_data_digest: int | None = None
    # The step this process started at, and the data position (epoch, offset; data.BatchOrder) the checkpoint kept
    # for it (None: a new run, or a checkpoint that did not record one: the position its step gives).
    start_step: int = 0
    saved_data_position: tuple[int, int] | None = None
    # The train config of the run that wrote the checkpoint (None: a new run): its --steps, the last step of that
    # run, whose evaluation and pictures it made off their schedules too, and the schedules it kept up to there.
    saved_train: TrainConfig | None = None
    # Names the run in its checkpoints and config.json, so a latest.pt of another run is not resumed into this
    # run's folder (a random hex string given at its start; a checkpoint that did not record one gets a new one).
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    # The latest.pt a resumed run read (file_identity), None for a new run: train() checks it is still there.
    checkpoint_identity: tuple[int, int, int] | None = None
    # The signal that made train() stop before its last step (SIGINT, SIGTERM: stop_on_interrupt), 0 when none did.
    stopped_by: int = 0

    @property
    def out(self) -> Path:
        return self.opts.out

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0, or the only process)."""
        return self.step.rank == 0

    @property
    def global_batch(self) -> int:
        return self.train_cfg.batch_size * self.step.world_size


def resumed_configs(state: dict, path: Path, given: dict, explicit: dict[str, set[str]]) -> dict:
    """The {"model", "train", "data"} configs of checkpoint `state` (read from `path`), with the `explicit` settings
    of the `given` configs applied where RESUME_MAY_CHANGE allows; an explicit setting that differs from the saved
    one is a ConfigError."""
    saved = saved_configs(state, path)
    for section, names in explicit.items():
        changes = {}
        for name in sorted(names):
            value, old = getattr(given[section], name), getattr(saved[section], name)
            if (section, name) == ("data", "path") and old is None and value is not None:
                raise ConfigError(
                    f"--resume continues the saved run, which trained on the built-in faces: --data {value} may name "
                    "the run's data moved, not other data; leave it out, or start a new run in another --out"
                )
            if name in RESUME_MAY_CHANGE[section]:
                changes[name] = value
            elif value != old:
                raise ConfigError(
                    f"--resume continues the saved run, whose {section} setting {name} is {old!r}, not {value!r}: "
                    "leave it out, or start a new run in another --out"
                )
        saved[section] = dataclasses.replace(saved[section], **changes)
    return saved


def setup_run(
    model_cfg,
    train_cfg,
    data_cfg,
    opts: RunOptions,
    collectives: Collectives | None = None,
    explicit: dict[str, set[str]] | None = None,
) -> Run:
    """Build the networks and the step; with opts.resume, restore them from `opts.out/latest.pt`.

    A new run refuses a folder where it would overwrite another run's checkpoints (check_new_run_folder). On resume the
    checkpoint's model, train and data configs stand, except the settings named in `explicit` ({"model"|"train"|
    "data": field names}, those the user gave; the command line passes them): RESUME_MAY_CHANGE ones are applied,
    any other must equal the saved value. explicit=None means {"train": {"steps"}}: the caller may raise `steps`.
    collectives: this rank's view of a torchrun job (distributed.start), None for a single process. Every rank
    builds the same networks from the same seed, or loads the same checkpoint, so all start from one state; a
    checkpoint may be resumed on another number of ranks (the README says what carries over exactly).
    """
    device = torch.device(opts.device)
    if opts.out.exists() and not opts.out.is_dir():
        raise ConfigError(f"--out {opts.out} is a file; expected a run folder (a new one, or one that holds a run)")
    check_run_entries(opts.out)
    if held_by_another(opts.out):  # before reading anything: a run not at its first checkpoint yet has no latest.pt
        raise ConfigError(folder_in_use(opts.out))
    latest = opts.out / "latest.pt"
    if not opts.resume:
        check_new_run_folder(opts.out)
    state = checkpoint_identity = None
    if opts.resume:
        check_resumable(opts.out)
        checkpoint_identity = file_identity(latest)  # before reading: a file replaced meanwhile counts as changed
        state = load_checkpoint(latest)
        given = {"model": model_cfg, "train": train_cfg, "data": data_cfg}
        configs = resumed_configs(state, latest, given, {"train": {"steps"}} if explicit is None else explicit)
        model_cfg, train_cfg, data_cfg = configs["model"], configs["train"], configs["data"]
        saved_train = saved_configs(state, latest)["train"]
        # A run that did its steps and was killed before the evaluation or the pictures of its last step: the same
        # command again makes them. Rank 0's folder decides (the other ranks may not see it), on every rank.
        finishes = agreed(
            collectives,
            device,
            lambda: (
                train_cfg.steps == state["step"]
                and any(owed_at(opts.out, train_cfg, saved_train, state["step"], final=True))
            ),
        )
        if train_cfg.steps < state["step"] or (train_cfg.steps == state["step"] and not finishes):
            where = (
                f"has done its {counted(train_cfg.steps, 'step')}"
                if train_cfg.steps == state["step"]
                else f"is at step {state['step']}, already past --steps {train_cfg.steps}"
            )
            raise ConfigError(f"the run in {opts.out} {where}: give --steps above {state['step']} to train it further")
        check_same_run(opts.out, state.get("run_id"))
        if (
            data_cfg.path is not None
            and "path" not in (explicit or {}).get("data", ())
            and not Path(data_cfg.path).exists()
        ):
            raise ConfigError(
                f"the run's data {data_cfg.path} is not there any more; if it moved, resume with --data naming where "
                "it is now"
            )
        if data_cfg.num_workers is not None and "num_workers" not in (explicit or {}).get("data", ()):
            try:  # the run's own --workers, checked on this machine and number of ranks, as a given one is
                check_workers(data_cfg.num_workers, fewest=0)
            except ConfigError as e:
                raise ConfigError(f"the run's saved {e}: give --workers anew") from None
    if "eval_images" in (explicit or {}).get("train", ()) and not train_cfg.eval_every:
        raise ConfigError("eval_images sizes the SWD evaluations, and this run has none: give --eval-every N too")
    data_cfg = fitted_crop(data_cfg, (explicit or {}).get("data", set()), resumed=opts.resume)
    check_out_outside_data(opts.out, data_cfg)
    torch.manual_seed(train_cfg.seed)
    G = Generator(model_cfg, impl=opts.impl).to(device)
    D = Discriminator(model_cfg, impl=opts.impl).to(device)
    fixed_z = uniform_z(SAMPLE_GRID, model_cfg.z_size, generator(train_cfg.seed, FIXED_Z))
    fixed_z = fixed_z.to(device)
    if opts.reference_step:
        step = ReferenceStep(G, D, train_cfg, device, collectives=collectives)
    else:
        step = FastStep(G, D, train_cfg, device, amp=opts.amp, impl=opts.impl, collectives=collectives)
    if state is not None:
        try:
            G.load_state_dict(state["G"])
            D.load_state_dict(state["D"])
            step.load_state_dict(state["trainer"])
            fixed_z = state["fixed_z"].to(device)
            if fixed_z.shape != (SAMPLE_GRID, model_cfg.z_size):  # else the first sample grid fails, hours in
                raise ValueError(f"fixed_z is {tuple(fixed_z.shape)}, expected ({SAMPLE_GRID}, {model_cfg.z_size})")
            saved_position = state.get("data_position")
            saved_position = None if saved_position is None else (int(saved_position[0]), int(saved_position[1]))
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:  # a missing entry, a wrong shape
            raise misfit(latest, e) from None
    run = Run(model_cfg, train_cfg, data_cfg, opts, G, D, step, fixed_z, collectives)
    if state is not None:
        run.saved_data_images = state.get("data_images")
        run.saved_data_digest = state.get("data_digest")
        run.saved_data_position = saved_position
        run.run_id = state.get("run_id") or run.run_id
        run.checkpoint_identity = checkpoint_identity
        run.saved_train = saved_train
    return run


def agreed(collectives: Collectives | None, device: torch.device, decide) -> bool:
    """decide() of rank 0 (of this process without torchrun), on every rank; the other ranks do not call it."""
    if collectives is None:
        return bool(decide())
    return bool(collectives.max_(int(decide()) if collectives.rank == 0 else 0, device))


def owed_at(out: Path, cfg: TrainConfig, saved: TrainConfig, step: int, final: bool) -> tuple[bool, bool]:
    """(evaluation, pictures): whether a run resumed with `cfg` from a checkpoint of `step` written by a run with
    `saved` makes each there, the run folder `out` not holding it. Due at a run's last step (`final`), or on the
    schedule of the run that wrote the checkpoint (a resume that changes --sample-every or --eval-every owes the
    steps of the old schedule, not of its own, whose steps start after this one); an evaluation only where both
    evaluate (a run that made none owes none, at its last step either; a resume given --eval-every 0 makes none)."""
    evaluates = bool(cfg.eval_every and saved.eval_every)
    evaluation = evaluates and (final or step % saved.eval_every == 0)
    if evaluation:
        evaluation = not any("swd" in row and row["step"] == step for row in reports.read_stats(out / "stats.jsonl"))
    pictures = final or step % saved.sample_every == 0
    return evaluation, pictures and not pictures_written(out, step)


def pictures_written(out: Path, step: int) -> bool:
    """Whether every picture of `step` is in the run folder `out`: its sample grid, and PICTURES_RECORD at that step
    or a later one (the grid is written first: a run killed, or failing, in the progress strip, the reconstructions
    or the plot after it has the grid without them). A folder without the record (a run from before it) goes by the
    grid; a damaged one means drawing them again."""
    if not (out / "samples" / f"step_{step:07d}.png").exists():
        return False
    try:
        return json.loads((out / PICTURES_RECORD).read_text())["step"] >= step
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclasses.dataclass(frozen=True)
class FolderContents:
    """What a run folder holds that decides whether a run starts or resumes there."""

    latest: bool  # a latest.pt (or a link by that name: a checkpoint on a disk not mounted now holds a run too)
    snapshots: list[Path]  # step_*.pt, in step order
    config: str  # "none", "run" (a began-fast run's config.json) or "other" (--out . in a project folder, say)

    @classmethod
    def of(cls, out: Path) -> FolderContents:
        latest = out / "latest.pt"
        snapshots = sorted(out.glob(SNAPSHOTS), key=lambda path: (len(path.name), path.name))  # past 9,999,999 too
        config = out / "config.json"
        kind = "none"
        if config.exists():
            try:
                saved = json.loads(config.read_text())
            except (OSError, ValueError):  # unreadable, or not JSON (UnicodeDecodeError is a ValueError)
                saved = None
            kind = "run" if isinstance(saved, dict) and {"model", "train", "run"} <= saved.keys() else "other"
        return cls(latest.exists() or latest.is_symlink(), snapshots, kind)


def check_run_entries(out: Path) -> None:
    """Refuse in one line a run folder where a name the run writes is taken by the other kind (a folder named
    stats.jsonl, a file named samples): the run would stop at its first write there with the OS's bare "[Errno 21]
    Is a directory" or "[Errno 17] File exists". A link is taken for what it links to; a dangling one is left to
    the write, which names it (atomic_write)."""
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise ConfigError(
                f"{out / name} is a folder, where the run writes its file {name}: move it away, or choose another --out"
            )
    for name in RUN_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise ConfigError(
                f"{out / name} is a file, where the run writes its folder {name}/: "
                "move it away, or choose another --out"
            )


def check_resumable(out: Path) -> None:
    """Refuse --resume in one line that says why where `out` holds no latest.pt: snapshots alone, a run that ended
    before its first checkpoint (its config.json is there), or none at all. A latest.pt that is there is read by
    load_checkpoint, which says what is wrong with it."""
    held = FolderContents.of(out)
    if held.latest:
        return
    if held.snapshots:
        raise ConfigError(
            f"--resume: {out} holds snapshots but no latest.pt: copy the last one ({held.snapshots[-1].name}) to "
            "latest.pt to resume from it"
        )
    if held.config == "run":
        raise ConfigError(
            f"--resume: the run in {out} ended before its first checkpoint (it has a config.json, no latest.pt): start "
            "it again without --resume"
        )
    raise ConfigError(f"--resume: {out} holds no run (no latest.pt): leave out --resume to start one there")


def check_new_run_folder(out: Path) -> None:
    """Refuse to start a new run in `out` where its files would overwrite what is not a dead start of its own: a
    run's checkpoints (latest.pt, or step_*.pt snapshots whose latest.pt was moved away), or a config.json that is
    not a run's (--out . in a project folder). A run folder that holds only a run's config.json, stats and pictures
    (one that died before its first checkpoint) is started again."""
    held = FolderContents.of(out)
    if held.latest:
        raise ConfigError(
            f"{out} already holds a run ({out / 'latest.pt'}); add --resume to continue it, or choose another --out"
        )
    if held.snapshots:
        others = f" and {len(held.snapshots) - 1} more" if len(held.snapshots) > 1 else ""
        raise ConfigError(
            f"{out} holds a run's checkpoints ({held.snapshots[-1].name}{others}) but no latest.pt: a new run would "
            "overwrite them; move them away, or choose another --out"
        )
    if held.config == "other":
        raise ConfigError(
            f"{out / 'config.json'} is not a began-fast run's: a new run would overwrite it; choose another --out"
        )


def check_same_run(out: Path, run_id: str | None) -> None:
    """Refuse to resume a latest.pt of one run in a folder whose config.json belongs to another (a checkpoint
    copied into the wrong folder would go on writing its stats and pictures among that run's)."""
    try:
        folder = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):  # no config.json (a rank's own folder), or not JSON
        return
    why = another_runs(out / "latest.pt", {"run_id": run_id}, folder) if isinstance(folder, dict) else None
    if why:
        raise ConfigError(f"{why}: resume it in a folder of its own")


def check_out_outside_data(out: Path, data_cfg: DataConfig) -> None:
    """Refuse a run folder inside the image folder it trains on: its sample grids would become training images
    when the folder is read again (a resume, evaluate.py). A CelebA folder given by its parent reads only
    img_align_celeba, so a run folder beside that is outside."""
    kind, images = resolve_source(data_cfg)
    if kind in ("celeba", "folder") and out.resolve().is_relative_to(Path(images).resolve()):
        raise ConfigError(
            f"--out {out} lies inside the data folder {images}: the run's pictures would become training "
            "images; choose an --out outside it"
        )


def _int64_digest(chunks) -> int:
    """A 64-bit BLAKE2 digest of the byte strings `chunks`, as a signed integer (an int64 tensor holds it)."""
    digest = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        digest.update(chunk)
    return int.from_bytes(digest.digest(), "little", signed=True)


def start_fingerprint(run: Run) -> dict[str, int]:
    """What every rank of a torchrun job must share before its first step, each as one int64: the step it
    starts at, the settings that shape training (not the rank's own folder, data path and workers, which may differ
    between machines) and the weights with k_t (a wrong or stale copy of latest.pt on one machine)."""
    settings = {
        "model": config_dict(run.model_cfg),
        "train": config_dict(run.train_cfg),
        "data": {k: v for k, v in config_dict(run.data_cfg).items() if k not in ("path", "num_workers")},
        "step": [run.opts.reference_step, run.opts.amp, run.opts.cuda_graphs],
    }
    tensors = [*run.G.state_dict().values(), *run.D.state_dict().values(), run.step.k]
    return {
        "the starting step": run.step.steps_done,
        "the settings": _int64_digest([json.dumps(settings, sort_keys=True).encode()]),
        "the weights": _int64_digest(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors
        ),
    }


def training_images_digest(source) -> int:
    """One int64 that tells data sets apart without reading them whole: their files' names (image folders, relative
    to the folder, so a moved copy keeps its digest) and a first, middle and last image: its file's bytes as stored
    (another machine's Pillow or libjpeg may decode the same file to other pixels), else its pixels."""
    count, files = len(source), getattr(source, "files", ())
    root = getattr(source, "root", None)
    names = [os.path.relpath(name, root).encode() + b"\0" for name in files]

    def image(i: int) -> bytes:
        if files:
            try:
                return Path(files[i]).read_bytes()
            except OSError:  # gone since the folder was opened: what the loader reads in its place
                pass
        return source[i].contiguous().numpy().tobytes()

    return _int64_digest([*names, *(image(i) for i in sorted({0, count // 2, count - 1}))])


def data_fingerprint(count: int, digest: int, batches) -> dict[str, int]:
    """What every rank of a torchrun job must read alike, each as one int64 (the data path is not compared: each
    machine may keep its copy elsewhere): the number of training images, their digest (training_images_digest, which
    the checkpoint keeps too), and the loader. Ranks that
    opened different copies (one with a file missing or damaged, so skipped) would cut their shards from different
    orders, overlapping and leaving images out; ranks on different loaders (--loader auto picks one by each GPU's
    free memory) would not share one global batch."""
    return {
        "the number of training images": count,
        "the training images": digest,
        "the loaders": _int64_digest([type(batches).__name__.encode()]),
    }


def checkpoint_state(run: Run) -> dict:
    return {
        "model_config": config_dict(run.model_cfg),
        "train_config": config_dict(run.train_cfg),
        "data_config": config_dict(run.data_cfg),
        "step": run.step.steps_done,
        "G": run.G.state_dict(),
        "D": run.D.state_dict(),
        "trainer": run.step.state_dict(),
        "fixed_z": run.fixed_z.cpu(),
        "data_images": run.data_images,
        "data_digest": run.data_digest,
        "data_position": list(
            data_position(
                run.data_images, run.global_batch, run.step.steps_done, run.start_step, run.saved_data_position
            )
        ),
        "run_id": run.run_id,
    }


def write_checkpoint(run: Run) -> Path:
    """latest.pt, then the snapshot of a snapshot step: a run killed between the two resumes from this step, and
    catch_up copies latest.pt, which holds that step's state, to the snapshot. (The snapshot first left a first
    checkpoint killed between them as a snapshot without latest.pt, which --resume refused until it was copied.)"""
    state = checkpoint_state(run)
    latest = run.out / "latest.pt"
    save_checkpoint(latest, state)
    if run.step.steps_done % run.train_cfg.snapshot_every == 0:
        save_checkpoint(snapshot_path(run.out, run.step.steps_done), state)
    return latest


def restore_snapshot(run: Run) -> None:
    """The snapshot due at the resumed checkpoint's step (on the schedule of the run that wrote it), when the run was
    killed before writing it: latest.pt, the same state, copied to its name."""
    step, snapshot = run.start_step, snapshot_path(run.out, run.start_step)
    if step % run.saved_train.snapshot_every or snapshot.exists():
        return
    with open(run.out / "latest.pt", "rb") as latest:
        atomic_write(snapshot, lambda f: shutil.copyfileobj(latest, f))
    if not run.opts.quiet:  # a file appears that the user may have removed on purpose: say where it came from
        say_line(f"  wrote the snapshot {snapshot.name} the run never wrote: a copy of latest.pt, its step's state")


class RealImages:
    """The run's real images for pictures and evaluation: the source the loader reads (opened once: opening a
    folder checks every file)."""

    def __init__(self, run: Run, source):
        self.run, self.source = run, source

    @functools.cached_property
    def held_out(self) -> torch.Tensor | None:
        """The images D's reconstruction error is measured on: held-out ones when the run has them, else None (the
        evaluation's real images, which it trains on)."""
        return held_out_images(self.source, self.run.train_cfg.eval_images)

    @functools.cached_property
    def fixed_batch(self) -> torch.Tensor:
        """The first real images in [-1, 1] on the run's device: the same ones in every reconstruction grid."""
        images = torch.stack([self.source[i] for i in range(min(RECONSTRUCTION_PAIRS, len(self.source)))])
        return reports.from_uint8(images, self.run.opts.device)


@torch.no_grad()
def write_pictures(run: Run, real: RealImages, pictures: reports.BackgroundWriter) -> None:
    """The fixed-z sample grid, the grids-over-time strip and GIF, D's reconstructions, and the convergence plot:
    G and D run here; `pictures`' thread writes the files while training goes on."""
    out, step = run.out, run.step.steps_done
    # In the step's precision: the kernels it compiled and what it trained (an --amp run has no float32 kernels).
    with run.step.autocast():
        samples, x = run.G(run.fixed_z).float(), real.fixed_batch
        reconstructed = run.D(x).float()
    pixels = [reports.to_uint8_hwc(images) for images in (samples, x, reconstructed)]
    pictures.submit(_write_pictures, out, step, *pixels)


def _write_pictures(out: Path, step: int, samples: np.ndarray, x: np.ndarray, reconstructed: np.ndarray):
    reports.save_image_grid(samples, out / "samples" / f"step_{step:07d}.png", nrow=8)
    reports.update_progress(out)
    reports.save_reconstruction_grid(x, reconstructed, out / "reconstruction.png")
    # The rows up to this step: the loop appends later ones meanwhile.
    stats = [row for row in reports.read_stats(out / "stats.jsonl") if row["step"] <= step]
    reports.plot_convergence(stats, out / "convergence.png")
    atomic_write(out / PICTURES_RECORD, lambda f: f.write((json.dumps({"step": step}) + "\n").encode()))


@torch.no_grad()
def evaluate(run: Run, real: RealImages, stats_file, writer) -> None:
    """SWD of G's samples against real images, and D's reconstruction error, appended to stats.jsonl."""
    with run.step.autocast():  # as write_pictures
        result = metrics.evaluate_models(
            run.G, run.D, real.source, num=run.train_cfg.eval_images, device=run.opts.device, held_out=real.held_out
        )
    row = {
        "step": run.step.steps_done,
        "swd": result["swd"]["avg"],
        "recon_l1": result["recon_l1"],
        "recon_images": "training" if real.held_out is None else "held-out",
        "recon_num": run.train_cfg.eval_images if real.held_out is None else len(real.held_out),
    }
    stats_file.write(json.dumps(row) + "\n")
    stats_file.flush()
    if writer is not None:
        writer.scalars({"eval/swd": row["swd"], "eval/recon_l1": row["recon_l1"]}, row["step"])
    if not run.opts.quiet:  # an evaluation is rare, and what a user watches for
        recon_on = counted(row["recon_num"], f"{row['recon_images']} image")
        swd, recon = f"{row['swd']:.2f}", f"{row['recon_l1']:.4f}"
        say_line(f"step {row['step']}: SWD x1e3 {swd}, D's reconstruction error {recon} on {recon_on}")


def catch_up(run: Run, real: RealImages, stats_file, writer, pictures: reports.BackgroundWriter) -> None:
    """On a resume, the snapshot, evaluation and pictures due at the checkpoint's step that the run never wrote (it
    was killed between latest.pt and them, or they failed): made now, as the loop would have made them then, with
    the carry of the step's last update, so the run's record has every step of its schedule. The checkpoint's step
    is a last step when the run that wrote it ended there, or when this resume does."""
    step = run.start_step
    if step == 0:
        return
    restore_snapshot(run)
    final = step in (run.saved_train.steps, run.train_cfg.steps)
    owes_evaluation, owes_pictures = owed_at(run.out, run.train_cfg, run.saved_train, step, final)
    if not (owes_evaluation or owes_pictures):
        return
    if run.model_cfg.vanishing_residual:  # the next step sets its own again
        for net in (run.G, run.D):
            net.set_carry(carry_after(step, run.model_cfg))
    if owes_evaluation:
        evaluate(run, real, stats_file, writer)
    if owes_pictures:
        write_pictures(run, real, pictures)


def log_window(run: Run, stats_file, writer, bar, since: int) -> dict:
    """Read the means of the window after step `since` from the device (the loop's only sync), check them, and
    write them out (rank 0: the other ranks pass stats_file=None and only read and check)."""
    row = {"step": run.step.steps_done, **run.step.stats.read_and_reset(), "lr": run.step.lr.item()}
    if not all(math.isfinite(v) for v in row.values()):
        window = f"step {row['step']}" if row["step"] == since + 1 else f"steps {since + 1} to {row['step']}"
        raise TrainingError(
            f"non-finite loss in {window} "
            f"(L_D={row['l_d']:.4g}, L_G={row['l_g']:.4g}, M={row['m']:.4g}); training stopped, "
            f"{last_good_checkpoint(run)}"
        )
    if stats_file is None:
        return row
    stats_file.write(json.dumps(row) + "\n")
    stats_file.flush()
    if writer is not None:
        writer.scalars(
            {f"began/{key}": row[key] for key in ("m", "k", "l_d", "l_g", "l_real", "l_fake", "lr")}, row["step"]
        )
    bar.set_postfix(M=f"{row['m']:.4f}", k=f"{row['k']:.4f}", L_D=f"{row['l_d']:.4f}", L_G=f"{row['l_g']:.4f}")
    return row


def check_weights(run: Run) -> None:
    """Before a checkpoint: G's and D's weights and k_t are finite (one read from the device). The statistics read
    with it are those of the weights before each update, so an update that diverged on the checkpoint's own step
    shows only here; a checkpoint must never replace the last good one with it."""
    tensors = [*run.G.parameters(), *run.D.parameters(), run.step.k]
    if not torch.stack([t.detach().isfinite().all() for t in tensors]).all().item():
        raise TrainingError(
            f"non-finite weights after step {run.step.steps_done} (its update diverged); training stopped, "
            f"{last_good_checkpoint(run)}"
        )


def last_good_checkpoint(run: Run) -> str:
    latest = run.out / "latest.pt"
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint had been written yet"


@contextlib.contextmanager
def stop_on_interrupt(acknowledge: bool = True, below_a_bar: bool = False):
    """Turn Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption or time limit, `timeout`, `docker stop`) into a
    request the loop honours between steps (a step is never cut in half): it yields the list of the signals received,
    each once. The same signal again acts at once, as it would have without this, unless it comes within
    REPEAT_WINDOW_S of the first: then it is the first's echo. acknowledge: say so at once, when the request comes (an
    evaluation in progress can take a minute before the loop stops): rank 0's part; below_a_bar: a progress bar is
    drawn, and the line starts below it."""
    requested, first_at, previous = [], {}, {}

    def handler(signum, frame):
        now = time.monotonic()
        if now - first_at.setdefault(signum, now) > REPEAT_WINDOW_S:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
        elif signum not in requested:
            requested.append(signum)
            if acknowledge:
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                say_line_in_a_handler(
                    f"{name}: stopping after the step in progress, with a checkpoint (another {name}, "
                    f"{REPEAT_WINDOW_S:g} s or more from now, stops at once)",
                    below_a_bar,
                )

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield requested
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def compile_kernels(run: Run) -> None:
    """On a GPU with the Triton layers, compile the step's kernels before its first step, many at once
    (StepState.precompile): left to the first step, its autotuning compiles them one after another, minutes on a
    machine's first run (later runs read Triton's disk cache either way). The processes of the machine take turns
    (CompilerTurn): the first compiles on all its cores, and the others (torchrun's other ranks, runs started
    together) wait for it, then each readies the step's kernels on its share of the cores, mostly read from the
    cache. Rank 0 says how it went. Only a head start: should it fail, the first step compiles the kernels, and that
    is said instead. BEGAN_FAST_PRECOMPILE=0 leaves them to the first step (to time the difference, say)."""
    step = run.step
    if step.device.type != "cuda" or os.environ.get(PRECOMPILE_ENV) == "0":
        return
    if ops.resolve_impl(run.opts.impl, step.device) != "triton":  # the layers' impl, the fast or reference step's
        return
    from kernels.precompile import CompilerTurn, error_line  # Triton: on the triton impl only

    cores, share = machine_cores(), cores_per_rank()
    say = functools.partial(print, file=sys.stderr, flush=True) if run.is_main else lambda *args, **kwargs: None
    size = run.model_cfg.image_size
    with CompilerTurn() as turn:
        threads = cores if turn.first else share
        if turn.first is False:
            say("  kernels: waiting for another process to compile Triton kernels into the cache ...", end="")
            start = time.perf_counter()
            let_go = turn.wait(COMPILER_WAIT_S)
            seconds = time.perf_counter() - start
            waited = f"{seconds:.1f} s" if let_go else f"went on after {seconds:.1f} s"
            say(f" {waited}; readying the step on {threads} CPU threads ...", end="")
        else:
            say(f"  kernels: compiling the step's Triton kernels on {threads} CPU threads ...", end="")
        try:
            done = step.precompile((run.train_cfg.batch_size, 3, size, size), threads)
        except Exception as error:  # noqa: BLE001 (a head start only: whatever stopped it, the first step compiles)
            say(f" stopped ({error_line(error)}); the first step compiles them instead")
            return
    if done.failed:
        ready = f"{done.compiles - done.failed} of {done.compiles}"
        failed = f"; {done.failed} failed, left to the first step (the first: {done.first_failure})"
    else:
        ready, failed = str(done.compiles), ""
    say(f" {ready} ready in {done.seconds:.1f} s{failed}")


def make_feed(run: Run, batches):
    """A callable that runs one step on the next batch: eagerly, or as a CUDA graph replay. With a GPU-resident
    data set the graph gathers the batch itself, from the indices staged before each replay; otherwise each replay
    copies the loader's batch in."""
    if not run.opts.cuda_graphs:
        return lambda: run.step(next(batches))
    shape = (run.train_cfg.batch_size, 3, run.model_cfg.image_size, run.model_cfg.image_size)
    if isinstance(batches, GpuResidentStream):
        return CudaGraphStep(run.step, shape, stream=batches)
    graph = CudaGraphStep(run.step, shape)
    return lambda: graph(next(batches))


def write_config(run: Run) -> None:
    """config.json: the three configs and how the run executes, with the batch and lr as the ranks see them."""
    run_info = {"run_id": run.run_id} | dataclasses.asdict(run.opts) | {"torch": torch.__version__}
    run_info |= {
        "world_size": run.step.world_size,
        "per_rank_batch": run.train_cfg.batch_size,
        "global_batch": run.global_batch,
        "effective_lr": run.step.lr.item(),  # after the lr decays a resumed run carries
    }
    config = {"model": config_dict(run.model_cfg), "train": config_dict(run.train_cfg)}
    config |= {"data": config_dict(run.data_cfg), "run": run_info}
    text = json.dumps(config, indent=2, default=str) + "\n"  # default=str: the Paths
    atomic_write(run.out / "config.json", lambda f: f.write(text.encode()))


def open_stats(out: Path, start: int):
    """stats.jsonl for appending. A new run starts it afresh; a resumed run keeps the rows up to its checkpoint's
    step and drops later ones (logged after the last checkpoint by a run that then died, the torn last line of a
    crash included), so no step repeats."""
    path = out / "stats.jsonl"
    if start == 0:
        return open(path, "w")
    if path.exists():
        rows = reports.read_stats(path, warn=True)  # said: the lines skipped are not written back
        kept = "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= start)
        atomic_write(path, lambda f: f.write(kept.encode()))
    return open(path, "a")


def drop_later_pictures(out: Path, start: int) -> None:
    """Remove the sample grids of steps after `start`, drawn by a run that then died before its next checkpoint
    (a new run, start 0, removes those of a run that died before its first): this run draws them again when it
    gets there, and if it stops sooner they must not end its progress strip. The pictures drawn with them showed
    those steps until this run's first sample step: the progress strip and GIF are drawn again from the grids that
    stay, the convergence plot from the stats rows that stay (open_stats dropped the later ones), and the
    reconstructions, which only a sample step draws, are removed. A PICTURES_RECORD past `start` comes back to it:
    at a dropped step, it would say that this run's pictures of that step were all written once its grid is."""
    later = [path for step, path in reports.sample_frames(out) if step > start]
    if not later:
        return
    for path in later:
        path.unlink()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # none, or damaged: pictures_written's call
        if json.loads((out / PICTURES_RECORD).read_text())["step"] > start:
            atomic_write(out / PICTURES_RECORD, lambda f: f.write((json.dumps({"step": start}) + "\n").encode()))
    for name in DRAWN_WITH_THE_GRIDS:
        (out / name).unlink(missing_ok=True)
    if reports.update_progress(out):
        reports.plot_convergence(reports.read_stats(out / "stats.jsonl"), out / "convergence.png")


def check_evaluation_data(run: Run, real: RealImages) -> None:
    """Before the first step: --eval-images needs that many real images (else the first evaluation would fail
    hours into the run)."""
    cfg = run.train_cfg
    if cfg.eval_every and len(real.source) < cfg.eval_images:
        raise ConfigError(
            f"--eval-images {cfg.eval_images} needs that many real images, the data set holds {len(real.source)}; "
            "lower --eval-images"
        )


def stop_signal(run: Run, interrupted: list, done: int) -> int:
    """The signal to stop on after step `done`, 0 to go on: the first this process received (stop_on_interrupt);
    under torchrun, the largest any rank received (SIGTERM over SIGINT), agreed at the steps where every rank reads
    its statistics anyway (a rank never stops alone, leaving the others waiting)."""
    own = interrupted[0] if interrupted else 0
    if run.collectives is None:
        return own
    cfg = run.train_cfg
    if done % cfg.log_every and done % cfg.checkpoint_every and done != cfg.steps:
        return 0
    return run.collectives.max_(own, run.step.device)


def announce(run: Run, data: str) -> None:
    """The run's first lines on stderr: where it starts, on what data, with which model, objective and step
    (gamma: gpu64 and paper64 differ in it alone)."""
    cfg, start = run.train_cfg, run.step.steps_done
    lines = [f"began-fast: {'resuming at step ' + str(start) if start else 'new run'} in {run.out}", f"  data: {data}"]
    if start == cfg.steps:
        lines.append(
            f"  its last step, {start}, is done: this writes that step's evaluation or pictures, which the run "
            "never wrote"
        )
    if run.saved_data_images not in (None, run.data_images):
        lines.append(
            f"  warning: the data set now holds {run.data_images} training images, the run read "
            f"{run.saved_data_images} before its checkpoint: it goes on, but not with the batches it would have seen"
        )
    elif run.saved_data_digest not in (None, run.data_digest):
        lines.append(
            "  warning: the data set's training images are not the ones the run read before its checkpoint (their "
            "files' names, or the first, middle or last image, differ): it goes on, training on other data"
        )
    if run.step.noise_restarted:
        lines.append(
            "  warning: the checkpoint's noise generator ran on another kind of device and cannot go on here: z "
            "comes from a new stream, seeded from the seed and the step"
        )
    lines.append(f"  model: {run.model_cfg.describe()}")
    objective = f"gamma {cfg.gamma:g}, lambda_k {cfg.lambda_k:g}, Adam betas {', '.join(f'{b:g}' for b in cfg.betas)}"
    lines.append(f"  train: {counted(cfg.steps, 'step')}, {objective}")
    opts = run.opts
    graphs = "on" if opts.cuda_graphs else "off"
    step_kind = "reference" if opts.reference_step else f"fast, amp {opts.amp or 'off'}, cuda graphs {graphs}"
    lines.append(f"  step: {step_kind}, impl {opts.impl}, device {opts.device}")
    lr = run.step.lr.item()  # float32: compared with a margin, not for equality
    decayed = " after decay" if lr < 0.999 * cfg.lr * run.step.lr_factor else ""
    lines.append(
        f"  ranks: {run.step.world_size}, batch {cfg.batch_size} per rank, global batch {run.global_batch}, "
        f"lr {lr:g}{decayed} (lr {cfg.lr:g}, scaling {cfg.lr_scaling})"
    )
    print("\n".join(lines), file=sys.stderr)


def lock_run_folder(out: Path):
    """An open file holding an exclusive lock on the run folder `out` until it is closed (or its process ends, however
    it ends). ConfigError when another process holds it: two runs writing one folder overwrite each other's
    checkpoints and interleave their stats, each believing it finished. Where the file system has no locks: none."""
    try:
        handle = open(out / RUN_LOCK, "a+")
    except OSError as e:
        raise ConfigError(f"cannot write into the run folder --out {out}: {e.strerror}") from None
    # A held_by_another that looks at that moment (another rank of this job, another run's setup) holds a shared lock
    # for microseconds: tried again for a while, the lock is refused only by a process that keeps it, a run.
    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            handle.close()
            raise ConfigError(folder_in_use(out)) from None
        except OSError:  # no locks here (ENOLCK): as before them
            return handle


def check_run_folders_writable(out: Path) -> None:
    """Before the first step: the run folder and those of its folders that exist (a resumed run's) take new files. A
    read-only one refused the run's first picture or checkpoint, after its steps were computed."""
    for folder in (out, *(out / name for name in RUN_FOLDERS if (out / name).is_dir())):
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ConfigError(f"cannot write into the run folder --out {out}: {folder} ({e.strerror})") from None


def folder_in_use(out: Path) -> str:
    return f"another process is training in {out} (it holds {RUN_LOCK}): let it end, or choose another --out"


def held_by_another(out: Path) -> bool:
    """Whether a process holds the run folder `out` now (lock_run_folder); False where it has no lock file or the
    file system no locks. The lock tried here is a shared one, which only a run's exclusive lock refuses (every rank
    of a job looks at once: exclusive tries refused each other), and goes with the file's closing."""
    try:
        with open(out / RUN_LOCK, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no folder, no lock file, or no locks (ENOLCK)
        return False
    return False


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of `path`, None where there is none: atomic_write's replacement changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def check_folder_as_found(run: Run) -> None:
    """Once this process holds its run folder: no other run wrote it since setup_run looked at it (one that held it
    then and has let go since), as this one would overwrite that run's work."""
    latest = run.out / "latest.pt"
    if run.checkpoint_identity is None:
        check_new_run_folder(run.out)
    elif file_identity(latest) != run.checkpoint_identity:
        raise ConfigError(f"another process wrote {latest} after this run read it: resume again to go on from it")


def train(run: Run) -> Path:
    """Run from the step the run is at to `train_cfg.steps`; return the path of the last checkpoint.

    Ctrl-C or SIGTERM finishes the step in flight (under torchrun: the steps up to the next statistics read), writes
    a checkpoint and returns cleanly, with the signal in run.stopped_by. Only rank 0 writes the run folder and prints,
    and holds it (lock_run_folder) from before its first write to the end.
    """
    with contextlib.ExitStack() as held:
        return _train(run, held)


def _train(run: Run, held: contextlib.ExitStack) -> Path:
    cfg, out, main = run.train_cfg, run.out, run.is_main
    if run.collectives is not None:
        run.collectives.check_same(start_fingerprint(run), run.step.device)
    start = run.start_step = run.step.steps_done
    source = open_source(run.data_cfg, run.model_cfg.image_size)
    batches = make_batches(
        run.data_cfg,
        run.model_cfg.image_size,
        cfg.batch_size,
        device=torch.device(run.opts.device),
        seed=cfg.seed,
        start_step=start,
        start_position=run.saved_data_position,
        rank=run.step.rank,
        world_size=run.step.world_size,
        source=source,
    )
    run.data_images, run.data_digest = len(source), training_images_digest(source)
    if run.collectives is not None:
        run.collectives.check_same(
            data_fingerprint(run.data_images, run.data_digest, batches),
            run.step.device,
            remedy="give every rank the same data (a whole copy on every machine) and the same --loader",
        )
    real = RealImages(run, source)
    check_evaluation_data(run, real)  # on every rank: where rank 0 alone refused, the others said a rank had died
    if main:
        # Once every check passed: a refused start leaves no run folder, a refused resume its config as it was, and
        # either says nothing but its error.
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder --out {out}: {e.strerror}") from None
        held.enter_context(lock_run_folder(out))
        check_folder_as_found(run)
        check_run_folders_writable(out)
        for folder in (out, out / "samples"):
            remove_stale_temporaries(folder)
        write_config(run)
        if start == 0:  # a new run: the record of a dead start's pictures is not its own
            (out / PICTURES_RECORD).unlink(missing_ok=True)
        announce(run, batches.describe())
    if start < cfg.steps:  # else this resume only makes its last step's missing evaluation or pictures (catch_up)
        compile_kernels(run)  # after make_batches, whose workers fork: one forked meanwhile would hold the turn
        feed = make_feed(run, batches)
    writer = open_tensorboard(out, start) if main else None
    last_checkpoint = out / "latest.pt"
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=run.opts.quiet or not main)
    stats = open_stats(out, start) if main else contextlib.nullcontext()  # None on the other ranks
    if main:
        drop_later_pictures(out, start)
    pictures = reports.BackgroundWriter()
    try:
        # The pictures in flight are written with the stop signals still deferred: under torchrun a rank that stops
        # on a signal may leave before rank 0 is done, and the launcher then ends rank 0 with SIGTERM.
        with (
            stop_on_interrupt(acknowledge=main, below_a_bar=not bar.disable) as interrupted,
            stats as stats_file,
            HangGuard(run.collectives) as guard,
        ):
            if main:
                catch_up(run, real, stats_file, writer, pictures)
            logged = start  # the last step whose window was read
            for _ in range(start, cfg.steps):
                feed()
                done = run.step.steps_done
                guard.beat(done)
                bar.update(1)
                stop = run.stopped_by = stop_signal(run, interrupted, done)
                checkpoint_due = any(done % every == 0 for every in (cfg.checkpoint_every, cfg.snapshot_every))
                checkpoint_due = checkpoint_due or done == cfg.steps or stop
                # Statistics and weights are read before every checkpoint: it never holds a diverged model.
                if done % cfg.log_every == 0 or checkpoint_due:
                    log_window(run, stats_file, writer, bar, since=logged)
                    logged = done
                if checkpoint_due:
                    check_weights(run)
                with guard.paused():  # rank 0's own work; the other ranks' wait for it counts against their timeout
                    # The checkpoint first: a failure in the pictures or the evaluation cannot cost it.
                    if main and checkpoint_due:
                        last_checkpoint = write_checkpoint(run)
                    if main and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                        evaluate(run, real, stats_file, writer)
                    if main and (done % cfg.sample_every == 0 or done == cfg.steps):
                        write_pictures(run, real, pictures)
                if stop:
                    if main:
                        say_line(f"{Interrupted(stop).what} at step {done}; checkpoint written to {last_checkpoint}")
                    break
            with guard.paused():
                pictures.wait()
    finally:
        pictures.close()
        bar.close()
        if writer is not None:
            writer.close()
    return last_checkpoint
