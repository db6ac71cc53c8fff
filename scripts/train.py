"""Train BEGAN.

    python scripts/train.py                        # built-in faces, `demo` preset on a CPU (`gpu64` on a GPU)
    python scripts/train.py --data CELEBA_DIR_OR_H5 --preset paper64 --out runs/celeba64
    python scripts/train.py --out runs/celeba64 --resume --steps 200000
    python scripts/train.py --data data/celeba64.h5 --amp --cuda-graphs     # the fast path on a GPU
    torchrun --nproc-per-node 8 scripts/train.py --data data/celeba64.h5 --amp --cuda-graphs   # 8 GPUs, data-parallel

Under torchrun every rank runs this script on its shard of each global batch (--batch-size is per rank); only
rank 0 prints and writes the run folder. Bad input (a missing path, an invalid value, a damaged checkpoint, a
diverged run) ends with one line on stderr and exit status 2, never a traceback; a rank that died or hung makes
the others end with one line naming the rank and the timeout, and exit status 1. Ctrl-C, or SIGTERM (a scheduler's
preemption or time limit, `timeout`, `docker stop`), writes a checkpoint after the step in flight and exits with
status 128 + the signal's number: 130 or 143.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    from began_fast.checkpoint import CheckpointError
    from began_fast.cli import (
        STOP_SIGNALS,
        OneLineParser,
        check_workers,
        data_path,
        one_line,
        out_of_memory,
        output_path,
        resolve_device,
        say_line,
        warnings_as_lines,
    )
    from began_fast.config import CROPS, LOADERS, LR_SCALINGS, PRESETS, ConfigError, DataConfig, get_preset, replace
    from began_fast.data import DataError
    from began_fast.distributed import DEFAULT_TIMEOUT_S, CollectiveError, World, start, stop
    from began_fast.fast_step import AMP_DTYPES
    from began_fast.metrics import MetricError
    from began_fast.ops import IMPLS
    from began_fast.train import RunOptions, TrainingError, setup_run, train
    from began_fast.wording import counted


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CelebA folder, image folder or HDF5 file (default: the built-in faces)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (default: demo, gpu64 on a GPU)")
    p.add_argument("--steps", type=int, help="train until this many steps are done (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="batch per rank (global batch: this x the number of ranks)")
    p.add_argument("--gamma", type=float, help="diversity ratio gamma in (0, 1]")
    p.add_argument("--lr", type=float, help="the lr of one rank (see --lr-scaling)")
    p.add_argument(
        "--lr-floor", type=float, help="the lr never decays below this (default: the preset's, at most --lr)"
    )
    p.add_argument(
        "--lr-scaling", choices=LR_SCALINGS, help="lr for N torchrun ranks: as given (none, default), x N or x sqrt(N)"
    )
    p.add_argument("--seed", type=int, help="seeds the initial weights, each z, the data's order and flips (default 0)")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument(
        "--skip",
        action=argparse.BooleanOptionalAction,
        help="the paper's decoder skip connections on or off (default: the preset's; demo has them)",
    )
    p.add_argument(
        "--vanishing-residual",
        action=argparse.BooleanOptionalAction,
        help="the paper's vanishing residuals: each ELU conv blended with its input, fading over --carry-steps",
    )
    p.add_argument("--carry-steps", type=int, help="steps over which the vanishing residual fades (default 16000)")
    p.add_argument("--crop", choices=CROPS, help="crop before resizing (default: the source's own)")
    p.add_argument("--crop-size", type=int, help="side of the crop box in source pixels (default: the crop's own)")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="mirror each training image left-right with probability 1/2 (default on; carpedm20/BEGAN-tensorflow "
        "trains without)",
    )
    p.add_argument("--loader", choices=LOADERS, help="how images are read (default: auto)")
    p.add_argument(
        "--workers",
        type=int,
        help="DataLoader worker processes or DALI threads (default: 0 for the built-in faces, else up to 8, the "
        "rank's share of the cores)",
    )
    p.add_argument(
        "--holdout",
        type=int,
        help="keep the data set's last N images out of training; evaluations measure D's reconstruction error on "
        "them (default 0; the built-in faces hold out the faces after the training set anyway)",
    )
    p.add_argument("--out", type=output_path, default=Path("runs/began"), help="run folder (default: runs/began)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest.pt")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun GPU LOCAL_RANK)")
    p.add_argument(
        "--impl",
        choices=IMPLS,
        help="layer implementation (default: torch with --reference-step, so that it is plain PyTorch; else auto)",
    )
    p.add_argument(
        "--amp", nargs="?", const="bf16", choices=sorted(AMP_DTYPES), help="mixed precision (bf16 when given bare)"
    )
    p.add_argument("--cuda-graphs", action="store_true", help="capture the whole step in one CUDA graph")
    p.add_argument("--reference-step", action="store_true", help="run the specification's step (slow, float32)")
    p.add_argument("--log-every", type=int, help="steps between statistics rows in stats.jsonl (default 50)")
    p.add_argument("--sample-every", type=int, help="steps between sample grids and pictures (default: the preset's)")
    p.add_argument("--checkpoint-every", type=int, help="steps between rewrites of latest.pt (default: the preset's)")
    p.add_argument(
        "--snapshot-every", type=int, help="keep step_XXXXXXX.pt every this many steps (default: the preset's)"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        help="steps between evaluations (SWD and D's reconstruction error), printed and logged beside M "
        "(default: never)",
    )
    p.add_argument("--eval-images", type=int, help="images per evaluation (default 512)")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"under torchrun: seconds a rank may go without finishing a step or a collective before it ends with "
        f"an error (another rank died or hung; default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# Config fields set by a flag of another name; any other field's flag is its name with dashes.
_FLAG_OF_FIELD = {"num_workers": "--workers", "path": "--data"}


def in_flag_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """A config error names the config field ("steps must be an integer >= 1, got 0"); the user gave a flag, so the
    message names it ("--steps must be an integer >= 1, got 0")."""
    field, space, rest = message.partition(" ")
    flag = _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))
    if not (space and flag in parser._option_string_actions):
        return message
    return f"{flag} {rest.replace('must be None or ', 'must be ', 1)}"  # a flag left out is None; one given, not


def configs_from_flags(args: argparse.Namespace, device: str):
    """(model, train, data configs, the settings given by section): a new run's are the preset's with the flags laid
    over them; a resumed run's are the flags alone, which setup_run checks against the checkpoint's settings."""
    preset = get_preset(args.preset or ("gpu64" if device.startswith("cuda") else "demo"))
    if args.workers is not None:
        check_workers(args.workers, fewest=0)
    # The settings given on the command line, by config section (None: not given, the preset's stands).
    flags = {
        "model": dict(
            image_size=args.image_size,
            skip=args.skip,
            vanishing_residual=args.vanishing_residual,
            carry_steps=args.carry_steps,
        ),
        "train": dict(
            steps=args.steps,
            batch_size=args.batch_size,
            gamma=args.gamma,
            lr=args.lr,
            lr_floor=args.lr_floor,
            lr_scaling=args.lr_scaling,
            seed=args.seed,
            log_every=args.log_every,
            sample_every=args.sample_every,
            checkpoint_every=args.checkpoint_every,
            snapshot_every=args.snapshot_every,
            eval_every=args.eval_every,
            eval_images=args.eval_images,
        ),
        "data": dict(
            path=data_path(args.data),
            crop=args.crop,
            crop_size=args.crop_size,
            flip=args.flip,
            loader=args.loader,
            num_workers=args.workers,
            holdout=args.holdout,
        ),
    }
    explicit = {section: {k for k, v in values.items() if v is not None} for section, values in flags.items()}
    if args.resume:
        if args.preset:  # ignored, it would mislead: a user who names one expects its settings
            raise ConfigError(
                f"--resume continues the run in {args.out} with its saved settings; --preset {args.preset} only "
                "chooses a new run's: leave it out"
            )
        # The checkpoint's settings stand, and setup_run checks the flags given against them: laid over a
        # preset first, a flag right for the run could be refused as wrong for the preset (--lr-floor).
        model_cfg, train_cfg, data_cfg = (SimpleNamespace(**flags[section]) for section in ("model", "train", "data"))
    else:
        if args.lr is not None and args.lr_floor is None:  # a small --lr lowers the preset's floor with it
            flags["train"]["lr_floor"] = min(preset.train.lr_floor, args.lr)
        model_cfg = replace(preset.model, **flags["model"])
        train_cfg = replace(preset.train, **flags["train"])
        data_cfg = replace(DataConfig(), **flags["data"])
    return model_cfg, train_cfg, data_cfg, explicit


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues an interrupted run exactly: how it ran is not saved with it (see --resume)."""
    how = [
        word
        for flag, value in (("--device", args.device), ("--impl", args.impl), ("--amp", args.amp))
        if value
        for word in (flag, value)
    ]
    how += [flag for flag, on in (("--cuda-graphs", args.cuda_graphs), ("--reference-step", args.reference_step)) if on]
    script = Path(__file__).resolve()
    if script.is_relative_to(Path.cwd()):  # as the user most likely typed it: from the working folder
        script = script.relative_to(Path.cwd())
    return shlex.join([str(script), "--out", str(args.out), "--resume", *how])


def main(argv=None) -> int:
    parser = build_parser()
    try:
        world = World.from_env()
    except ConfigError as e:
        parser.parse_args(argv)  # --help still prints the help
        say_line(f"error: {one_line(e)}")
        return 2
    # Under torchrun, "rank R of N: ": each rank that meets an error says so, on its own machine's terms, a bad flag
    # included.
    parser.error_prefix = rank = f"rank {world.rank} of {world.world_size}: " if world.world_size > 1 else ""
    args = parser.parse_args(argv)
    try:
        with warnings_as_lines(rank):
            device = world.device(resolve_device(args.device))
            model_cfg, train_cfg, data_cfg, explicit = configs_from_flags(args, device)
            opts = RunOptions(
                out=args.out,
                device=device,
                impl=args.impl or ("torch" if args.reference_step else "auto"),
                reference_step=args.reference_step,
                amp=args.amp,
                cuda_graphs=args.cuda_graphs,
                resume=args.resume,
                quiet=args.quiet,
            )
            collectives = start(world, device, args.dist_timeout)
            run = setup_run(model_cfg, train_cfg, data_cfg, opts, collectives, explicit)
            last = train(run)
            if run.stopped_by and world.world_size > 1:
                # The ranks stopped together on a signal, and one that leaves first makes torchrun's launcher send
                # SIGTERM to the others: their way out (leaving the process group, the resume line) is not cut short.
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
    except ConfigError as e:
        say_line(f"error: {rank}{in_flag_terms(one_line(e), parser)}")
        return 2
    except (DataError, CheckpointError, MetricError, TrainingError, OSError) as e:
        say_line(f"error: {rank}{one_line(e)}")
        return 2
    except CollectiveError as e:  # its message names the rank
        say_line(f"error: {e}")
        return 1
    except RuntimeError as e:  # after CollectiveError, a RuntimeError too
        ran_out = out_of_memory(e, "the step")
        if ran_out is None:
            raise
        say_line(f"error: {rank}{ran_out}; lower --batch-size or --image-size")
        return 2
    except KeyboardInterrupt:  # a Ctrl-C before the loop took over, or a second one
        say_line(f"error: {rank}interrupted")
        return 130
    finally:
        stop()
    if run.stopped_by:  # Ctrl-C or SIGTERM: train() said where it stopped and what it wrote
        if run.is_main:
            launch = "the same torchrun launch of" if run.step.world_size > 1 else "python"
            say_line(f"resume with: {launch} {resume_command(args)}")
        # Not 0: a shell's `train && evaluate` must not go on with a run that did not finish, and a scheduler
        # reads the signal from it.
        return 128 + run.stopped_by
    if run.is_main:
        done = f"done: {counted(run.step.steps_done, 'step')}; checkpoint {last}; samples in {run.out / 'samples'}"
        print(done, file=sys.stderr)
    return 0


if __name__ == "__main__":
    status = main()
    if status and "LOCAL_RANK" in os.environ:
        # A torchrun worker that failed leaves at once: at interpreter exit Gloo's threads can abort the process
        # ("terminate called without an active exception", SIGABRT) while the launcher ends the other ranks, so
        # the launcher would report a crash instead of this status. What it had to write is written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
