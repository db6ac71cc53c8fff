"""Draw from a trained generator.

    python scripts/sample.py runs/began/latest.pt --out runs/began/drawn   # grid.png, interpolation.png
    python scripts/sample.py runs/began --out runs/fid --num 10000  # + runs/fid/images/000000.png ... (for FID tools)

grid.png: a grid of G(z), z ~ U(-1, 1) (square for a square --grid). interpolation.png: each row walks from one
random z to another along the great circle (slerp), as in the BEGAN paper's Figure 4. OUT/images/ holds exactly the
--num images of the last call that finished: they are drawn beside it first and replace the numbered PNGs an earlier
call left there only once all are drawn, so an FID tool reading the folder never mixes two calls' images and a call
that fails or is interrupted leaves the earlier ones. On Linux the new set takes the earlier one's place in one step
(renameat2's RENAME_EXCHANGE), so that even a SIGKILL or a power loss leaves one set whole; where the folders cannot
be exchanged (an older C library, some network filesystems, a subfolder in OUT/images, OUT/images a link) the images are
replaced one by one, a Ctrl-C meanwhile waits for the end of it, and a SIGKILL can leave part of each. Errors end
with one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    import torch
    from PIL import Image
    from tqdm import tqdm

    from began_fast import reports
    from began_fast.atomic_files import TEMPORARY_SUFFIX, remove_stale_temporaries
    from began_fast.checkpoint import CheckpointError, load_models
    from began_fast.cli import (
        OneLineParser,
        check_impl_env,
        check_one_process,
        check_seed,
        check_stop,
        check_writable,
        input_path,
        interruption,
        one_line,
        output_path,
        resolve_device,
        stop_signals,
        stop_signals_held,
        warnings_as_lines,
    )
    from began_fast.config import ConfigError
    from began_fast.seeds import SAMPLING, generator, uniform_z
    from began_fast.wording import counted


NUMBERED = re.compile(r"\d{6,}\.png")  # the single images' names: 000000.png, 000001.png, ...
MAX_GRID = 4096  # images in one picture (a 64 x 64 grid)
MAX_NUM = 1_000_000  # single images per call (FID takes 50,000)

# libc's renameat2 (glibc >= 2.28) exchanges two folders in one step; None where the C library has none (an older
# glibc, another system): write_single_images replaces the images one by one there.
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100  # paths from the working folder, as os.rename takes them (linux/fcntl.h)
_RENAME_EXCHANGE = 2  # linux/fs.h
# renameat2's errors where it cannot exchange: a kernel before 3.15, a filesystem without the flag (some network ones)
_CANNOT_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (N, d) at fractions t (T,): (N, T, d)."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(1).clamp(-1 + 1e-7, 1 - 1e-7))[:, None, None]
    t = t[None, :, None]
    return (torch.sin((1 - t) * omega) * a[:, None] + torch.sin(t * omega) * b[:, None]) / torch.sin(omega)


@torch.no_grad()
def generate(G, z: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """G(z) in float32 on the CPU; a diverged G (NaN or inf) is refused rather than drawn as black and white."""
    images = torch.cat([G(chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])
    if not torch.isfinite(images).all():
        raise CheckpointError("G(z) holds NaN or inf: the checkpoint's generator has diverged")
    return images


def write_samples(G, args) -> None:
    """grid.png, interpolation.png and the single PNGs the flags ask for, into args.out."""
    dim = G.cfg.z_size
    gen = generator(args.seed, SAMPLING)  # not torch.manual_seed(seed)'s stream, which drew a run's initial weights
    args.out.mkdir(parents=True, exist_ok=True)
    with _only_call_writing(args.out):
        # What a killed call left of these outputs; not other temporaries: --out may be a run folder a trainer
        # writes. Another call writing into --out now would lose its folder here: the lock keeps it out.
        for name in ("grid.png", "interpolation.png", "images"):
            remove_stale_temporaries(args.out, of=name)
        _draw(G, args, dim, gen)


@contextlib.contextmanager
def _only_call_writing(out: Path):
    """An exclusive lock on the folder `out` for the call: two calls writing into one folder would remove each
    other's temporary folder and mix their images in images/. ConfigError when another holds it."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"--out {out}: another sample.py is writing into it; wait for it, or give another --out"
            raise ConfigError(message) from None
        yield
    finally:
        os.close(fd)  # and the lock with it


def _draw(G, args, dim: int, gen) -> None:
    if args.grid:
        reports.save_image_grid(generate(G, uniform_z(args.grid, dim, gen), args.device), args.out / "grid.png")
    if args.interp_rows:
        ends = uniform_z(2 * args.interp_rows, dim, gen)
        path = slerp(ends[: args.interp_rows], ends[args.interp_rows :], torch.linspace(0, 1, args.interp_steps))
        images = generate(G, path.reshape(-1, dim), args.device)
        reports.save_image_grid(images, args.out / "interpolation.png", nrow=args.interp_steps)
    if args.num:
        write_single_images(G, uniform_z(args.num, dim, gen), args.device, args.out / "images")


def write_single_images(G, z: torch.Tensor, device, folder: Path) -> None:
    """G(z) as numbered PNGs in `folder`, replacing the numbered PNGs of an earlier call; its other entries stay.

    The images are drawn into a temporary folder beside it first, so a call that fails or is interrupted leaves the
    earlier set whole; one that a killed call left (SIGKILL, a power loss) is removed by the next. Once all are drawn
    the two folders are exchanged in one step (_exchange), so that a SIGKILL or a power loss at any moment leaves
    `folder` the earlier set or the new one, each whole; the earlier set, then in the temporary folder, is removed.
    Where they cannot be exchanged (a C library without renameat2, as glibc before 2.28 and other systems; a kernel
    or filesystem that cannot exchange, as some network filesystems; an entry of `folder` that cannot be hard-linked,
    as a subfolder or another filesystem mounted there; a `folder` that is a symbolic link), the earlier images are
    removed and the new ones moved in one by one, with Ctrl-C and SIGTERM held until the end of it: a SIGKILL or a
    power loss meanwhile leaves part of each, until the next call."""
    folder.mkdir(exist_ok=True)  # a first call's is empty, with the mode a new folder gets: the new set takes it
    drawing = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMPORARY_SUFFIX))
    try:
        index = 0
        for chunk in tqdm(z.split(256), desc="images", unit="batch"):
            for image in reports.to_uint8_hwc(generate(G, chunk, device)):
                check_stop()  # a Ctrl-C that a finalizer dropped
                name = f"{index:06d}.png"
                try:
                    Image.fromarray(image).save(drawing / name)
                except OSError as e:  # a full disk: PIL's write names no file ("[Errno 28] No space left on device")
                    if e.errno is None:
                        raise
                    raise OSError(e.errno, f"cannot write {folder / name}: {e.strerror}") from e
                index += 1
        check_stop()
        if not _exchange(folder, drawing):
            with stop_signals_held():  # the earlier set out and this one in: a Ctrl-C or SIGTERM meanwhile would
                # leave part of each
                for earlier in folder.glob("*.png"):  # numbered as this function numbers them: an earlier call's
                    if NUMBERED.fullmatch(earlier.name):
                        earlier.unlink()
                for drawn in sorted(drawing.iterdir()):
                    if NUMBERED.fullmatch(drawn.name):  # not the other entries' hard links _exchange may have made
                        os.replace(drawn, folder / drawn.name)
    finally:
        shutil.rmtree(drawing, ignore_errors=True)  # the unfinished set, or the earlier one _exchange swapped out


def _exchange(folder: Path, drawing: Path) -> bool:
    """Put the folder `drawing` where `folder` is and `folder` where `drawing` is, in one step (renameat2 with
    RENAME_EXCHANGE), having hard-linked into `drawing` the entries of `folder` that are not numbered PNGs and given
    it the mode of `folder`. False, `folder` untouched, where they cannot be exchanged (see write_single_images)."""
    if _renameat2 is None or folder.is_symlink():  # exchanged, the link would move, not the folder it names
        return False
    with os.scandir(folder) as entries:
        for entry in entries:
            if not NUMBERED.fullmatch(entry.name):
                try:  # linked, not moved: until the exchange `folder` holds them, after it the new folder does
                    os.link(entry.path, drawing / entry.name, follow_symlinks=False)  # a symbolic link as itself
                except OSError:  # a folder, another filesystem mounted there, a file its filesystem will not link
                    return False
    os.chmod(drawing, stat.S_IMODE(folder.stat().st_mode))  # mkdtemp made it 0700
    # The new images' data on disk before their names are: a power loss after the exchange finds them whole. syncfs,
    # of this filesystem only (glibc has had it since 2.14, before renameat2): os.sync would wait for every one's.
    folder_fd = os.open(drawing, os.O_RDONLY)
    try:
        if _libc.syncfs(folder_fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(drawing))
    finally:
        os.close(folder_fd)
    if _renameat2(_AT_FDCWD, os.fsencode(drawing), _AT_FDCWD, os.fsencode(folder), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(drawing), None, str(folder))


def check_outputs_in_place(args: argparse.Namespace) -> None:
    """Before drawing: no name this call writes in --out is taken by the other kind (an images file, a grid.png
    folder). A file named images made the call fail after it had replaced grid.png and interpolation.png."""
    for name, asked, folder in (
        ("grid.png", args.grid, False),
        ("interpolation.png", args.interp_rows, False),
        ("images", args.num, True),
    ):
        path = args.out / name
        if asked and path.exists() and path.is_dir() != folder:
            kind, writes = ("a file", f"its folder {name}/") if folder else ("a folder", f"its picture {name}")
            raise ConfigError(f"{path} is {kind}, where sample.py writes {writes}: move it away, or give another --out")


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=input_path, help="a began-fast .pt file or a run folder (its latest.pt)")
    p.add_argument(
        "--out", type=output_path, default=Path("runs/samples"), help="output folder (default: runs/samples)"
    )
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (default 64; 0: no grid.png)")
    p.add_argument(
        "--num", type=int, default=0, help="also write this many single PNGs to OUT/images/, replacing earlier ones"
    )
    p.add_argument("--interp-rows", type=int, default=8, help="rows of interpolation.png (0: no interpolation.png)")
    p.add_argument("--interp-steps", type=int, default=10, help="images per interpolation row, both ends included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = p.parse_args(argv)
    try:
        check_one_process("sample.py")
        for name, most in (("grid", MAX_GRID), ("num", MAX_NUM), ("interp_rows", MAX_GRID)):
            if not 0 <= getattr(args, name) <= most:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, {most}], got {getattr(args, name)}")
        if args.interp_rows and not 2 <= args.interp_steps <= MAX_GRID // args.interp_rows:
            raise ConfigError(
                f"--interp-steps must be >= 2 (a row walks from a z to another) and at most {MAX_GRID} images in "
                f"all (--interp-rows x --interp-steps), got {args.interp_steps}"
            )
        if not (args.grid or args.interp_rows or args.num):
            raise ConfigError("--grid, --interp-rows and --num are all 0: there is nothing to draw")
        check_seed(args.seed)
        args.device = resolve_device(args.device)
        check_impl_env()
        G, _, state = load_models(args.checkpoint, args.device)
        check_writable(args.out, "--out", folder=True)  # after the checks above: a refused call creates no folder
        check_outputs_in_place(args)
        with warnings_as_lines(), stop_signals():
            write_samples(G, args)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stop = interruption(e)
        print(
            f"error: {stop.what}; each picture and images/ is whole, as this call or an earlier one wrote it",
            file=sys.stderr,
        )
        return stop.status
    written = [name for name, asked in (("grid.png", args.grid), ("interpolation.png", args.interp_rows)) if asked]
    written += [f"{counted(args.num, 'image')} in images/"] if args.num else []
    print(f"wrote {', '.join(written)} from step {state['step']} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
