"""Evaluate a trained BEGAN: SWD (and FID) of its samples against real images, and D's reconstruction error.

    python scripts/evaluate.py runs/began/latest.pt                      # against the built-in faces
    python scripts/evaluate.py runs/celeba64/latest.pt --data data/celeba64.h5 --num 8192 --json eval.json
    python scripts/evaluate.py runs/celeba64/latest.pt --data img_align_celeba --fid \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth

SWD (x1e3, per pyramid level and averaged; lower is better) compares --num samples of G with the first --num
real images. D's reconstruction error mean|x - D(x)| is measured on up to --num images D never trained on: the
run's held-out images (the built-in faces after its training set; the last --holdout images of a folder or HDF5
file), or any images of another data set. A run that held out nothing is measured on its training images, and
the table says so. FID needs the optional torch-fidelity package and its Inception weights. Bad input ends with
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    from began_fast.atomic_files import atomic_write
    from began_fast.checkpoint import CheckpointError, load_models, saved_configs
    from began_fast.cli import (
        OneLineParser,
        check_impl_env,
        check_one_process,
        check_seed,
        check_stop,
        check_writable,
        data_path,
        input_path,
        interruption,
        one_line,
        out_of_memory,
        output_path,
        print_result,
        resolve_device,
        stop_signals,
        warnings_as_lines,
    )
    from began_fast.config import ConfigError, DataConfig
    from began_fast.data import DataError, detect_source, fitted_crop, held_out_images, open_source
    from began_fast.data.builtin import BuiltinFaces
    from began_fast.fid import FIDUnavailableError, require_fid
    from began_fast.metrics import MetricError, evaluate_models
    from began_fast.run_folder import check_not_a_runs_file
    from began_fast.wording import counted


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint",
        type=input_path,
        help="a began-fast .pt file (a run's latest.pt or a step_XXXXXXX.pt snapshot) or a run folder",
    )
    p.add_argument("--data", help="CelebA folder, image folder or HDF5 file (default: the built-in faces)")
    p.add_argument("--num", type=int, default=2048, help="generated and real images to compare (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of z and of SWD's random patches and directions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--fid", action="store_true", help="also compute FID (needs torch-fidelity)")
    p.add_argument("--inception-weights", help="torch-fidelity's Inception weights file (default: torch hub cache)")
    p.add_argument("--json", type=output_path, help="also write the results to this JSON file")
    return p.parse_args(argv)


def too_many(num: int, available: int) -> str:
    return f"--num {num} is more than the {available} real images to compare with: give --num {available} or less"


def evaluation_images(trained_on: DataConfig, path: str | None, num: int, image_size: int, trained_images=None):
    """(real, held_out, recon_images): the real images SWD compares with, the images D's reconstruction error is
    measured on (None: the same real images) and what those are, "held-out" or "training".

    On the data the checkpoint trained on, its own settings (crop, holdout) are reused; other data was never
    trained on. Where the run's data is no longer where it was, `path` holding as many training images under the
    run's settings as the run trained on (trained_images, its checkpoint's data_images) is taken for that data,
    moved, with a warning. Built-in faces are drawn per (seed, index), so only the faces needed are drawn."""
    if path is None and trained_on.path is None:
        training = trained_on.builtin_count - trained_on.holdout
        if training < num:  # before the held-out faces are drawn (a millisecond each)
            raise ConfigError(too_many(num, training))
        real = BuiltinFaces(num, image_size, trained_on.builtin_seed)
        return real, BuiltinFaces(num, image_size, trained_on.builtin_seed, first=training).images, "held-out"
    if path is None:
        warnings.warn(
            f"the checkpoint trained on {trained_on.path}, but without --data it is scored against the built-in "
            f"faces: pass --data {trained_on.path} to score it against the data it trained on",
            stacklevel=2,
        )
        return BuiltinFaces(num, image_size, seed=0), None, "held-out"
    same = trained_on.path is not None and _same_source(trained_on.path, path)  # None: the run's data is gone
    if same or same is None and trained_images is not None:
        cfg = DataConfig(
            path=path,
            source=trained_on.source,
            crop=trained_on.crop,
            crop_size=trained_on.crop_size,
            holdout=trained_on.holdout,
        )
        # An HDF5 file (the one prepare_celeba made of the run's folder) holds cropped images: the crop is left out.
        cfg = fitted_crop(cfg, resumed=True)
        try:
            real = open_source(cfg, image_size)
        except DataError:
            if same:
                raise
            real = None  # the run's settings do not fit this data: other data
        if real is not None and (same or len(real) == trained_images):
            if not same:
                warnings.warn(
                    f"the run's data {trained_on.path} is gone; {path} holds as many training images as the run "
                    f"read ({trained_images}) with its settings, so it is taken for that data, moved: its crop and "
                    "holdout are reused",
                    stacklevel=2,
                )
            held_out = held_out_images(real, num)
            return real, held_out, "training" if held_out is None else "held-out"
    return open_source(DataConfig(path=path), image_size), None, "held-out"


def _same_source(a: str, b: str) -> bool | None:
    """Whether paths a (the run's data) and b name the same images: a CelebA folder is named by itself or by its
    parent. None when a is gone from where it was (b may be it, moved)."""
    try:
        run_data = detect_source(a)[1]
    except DataError:
        return None
    try:
        return Path(run_data).resolve() == Path(detect_source(b)[1]).resolve()
    except DataError:  # b is no data set: open_source says why
        return False


def format_table(report: dict) -> str:
    swd = "  ".join(f"{level}: {value:.2f}" for level, value in report["swd"].items())
    lines = [
        f"checkpoint   {report['checkpoint']} (step {report['step']})",
        f"real data    {report['data']}",
        f"SWD x1e3     {swd}",
    ]
    if "fid" in report:
        lines.append(
            f"FID          {report['fid']:.2f} (of {report['num']} images: FID falls as N grows, compare at equal N)"
        )
    recon_on = counted(report["recon_num"], f"{report['recon_images']} image")
    recon = f"D recon L1   {report['recon_l1']:.4f} (mean |x - D(x)| on {recon_on}"
    if report["recon_images"] == "training":
        recon += "; the run held out none: train with --holdout N"
    lines.append(recon + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with warnings_as_lines(), stop_signals():
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    try:
        check_one_process("evaluate.py")
        if args.num < 1 or args.batch_size < 1:
            raise ConfigError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
        if args.fid and args.num < 2:
            raise ConfigError(f"--fid needs --num >= 2 (the covariance of the images' features), got {args.num}")
        check_seed(args.seed)
        if args.inception_weights is not None and not args.fid:
            raise ConfigError("--inception-weights is for FID: add --fid, or leave it out")
        args.device = resolve_device(args.device)
        check_impl_env()
        if args.fid:
            require_fid(args.inception_weights)
        if args.json is not None:
            if args.json.suffix != ".json":  # --json latest.pt would replace a checkpoint
                raise ConfigError(f"--json must name a .json file (it is replaced), got {args.json}")
            check_not_a_runs_file(args.json, "--json")  # --json RUN/config.json replaced the run's record
        G, D, state = load_models(args.checkpoint, device=args.device)
        real, held_out, recon_images = evaluation_images(
            saved_configs(state, args.checkpoint)["data"],
            data_path(args.data),
            args.num,
            G.cfg.image_size,
            state.get("data_images"),
        )
        if len(real) < args.num:  # before the evaluation is announced (the built-in faces are counted before drawn)
            raise ConfigError(too_many(args.num, len(real)))
        if args.json is not None:  # before the evaluation, not after it; after the checks: a refused call creates
            check_writable(args.json, "--json")  # no folder
        # The evaluation takes tens of seconds on a CPU and prints nothing until it ends: say what runs meanwhile.
        metrics = "SWD and FID" if args.fid else "SWD"
        recon_num = args.num if held_out is None else len(held_out)
        print(
            f"evaluating step {state['step']} on {args.device}: {metrics} of {counted(args.num, 'sample')} against "
            f"{counted(args.num, 'real image')}, D's error on {counted(recon_num, recon_images + ' image')} ...",
            file=sys.stderr,
            flush=True,
        )
        result = evaluate_models(
            G,
            D,
            real,
            num=args.num,
            seed=args.seed,
            device=args.device,
            batch_size=args.batch_size,
            held_out=held_out,
            with_fid=args.fid,
            inception_weights=args.inception_weights,
        )
        report = {
            "checkpoint": str(args.checkpoint),
            "step": state["step"],
            "data": real.describe(),
            **result,
            "recon_images": recon_images,
            "recon_num": recon_num,
        }
        print_result(format_table(report))
        if args.json is not None:
            check_stop()  # a Ctrl-C that a finalizer dropped
            atomic_write(args.json, lambda f: f.write((json.dumps(report, indent=2, allow_nan=False) + "\n").encode()))
    except (CheckpointError, ConfigError, DataError, FIDUnavailableError, MetricError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        ran_out = out_of_memory(e, "the evaluation")
        if ran_out is None:
            raise
        print(f"error: {ran_out}; lower --batch-size or --num", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stop = interruption(e)
        print(f"error: {stop.what}; nothing was written", file=sys.stderr)
        return stop.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
