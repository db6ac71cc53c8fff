"""Turn a CelebA folder (or any image folder) into the HDF5 file the fast loaders read.

    python scripts/prepare_celeba.py data/img_align_celeba data/celeba64.h5 --size 64
    python scripts/prepare_celeba.py photos/ photos128.h5 --size 128 --crop center --workers 8

The file holds one dataset, `images`: uint8 (N, S, S, 3), each image cropped (the CelebA box for a CelebA folder,
the centred square otherwise; --crop to choose) and resized with a Lanczos filter, in the sorted order of the
file names. One image per HDF5 chunk, so a random read touches one image. Files that cannot be decoded are left
out and counted. The file is written under a temporary name, synced and renamed at the end: a crash leaves no half
file, and the next run removes the temporary file a killed one left.
Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import os
import signal
import sys
import warnings
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from began_fast.startup import quiet_ctrl_c_while_importing  # noqa: E402

with quiet_ctrl_c_while_importing():
    import h5py
    import numpy as np
    from tqdm import tqdm

    from began_fast.atomic_files import durable_replace
    from began_fast.cli import (
        STOP_SIGNALS,
        OneLineParser,
        check_one_process,
        check_stop,
        check_workers,
        check_writable,
        input_path,
        interruption,
        one_line,
        output_path,
        stop_signals,
        stop_signals_held,
    )
    from began_fast.config import CROPS, IMAGE_SIZES, ConfigError, DataConfig
    from began_fast.data import DataError, open_source, resolve_source
    from began_fast.data.images import load_image
    from began_fast.distributed import machine_cores
    from began_fast.wording import counted


_job: tuple[int, str, int | None] = (64, "center", None)  # (size, crop, crop_size), set in each worker
_large: frozenset[str] = frozenset()  # the files above PIL's pixel limit (the source's scan warned about them)


def _init_worker(size: int, crop: str, crop_size: int | None, large: frozenset[str]) -> None:
    global _job, _large
    _job, _large = (size, crop, crop_size), large
    # Ctrl-C and SIGTERM, which a terminal or a scheduler may send every process of the job, are the main process's
    # to handle (one line, not one per worker): it ends the pool in order (_end_pool). A worker killed while it sends
    # its result would keep the result queue's lock, and the pool would hang.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _decoded(pool, files: list[str], chunk: int, window: int):
    """The images of `files` in order, decoded by `pool` (None for a file that does not decode), queued `window` files
    at a time, the next window while this one is read: the pool never holds more than two windows of work, all that
    _end_pool waits for."""
    windows = [files[start : start + window] for start in range(0, len(files), window)]
    pending = pool.imap(_decode, windows[0], chunksize=chunk) if windows else iter(())
    for following in [*windows[1:], None]:
        queued = None if following is None else pool.imap(_decode, following, chunksize=chunk)
        yield from pending
        pending = queued


def _end_pool(pool) -> None:
    """End the pool in order once its queued windows are decoded (none are left at the end; seconds' worth when a
    prepare stopped early: a failed write, a stop signal), so that the `with`'s Pool.terminate finds no worker: it
    holds the task queue and ends the workers with SIGTERM, which they ignore (it would wait for them for ever, as
    Python 3.12 did); and a worker it killed while sending its result would keep the result queue's lock, so that
    the pool would hang all the same (seen on a full disk)."""
    with stop_signals_held():  # another Ctrl-C meanwhile is the same request
        pool.close()
        pool.join()


def _decode(path: str) -> np.ndarray | None:
    """(S, S, 3) uint8, or None when the file cannot be decoded."""
    try:
        return load_image(path, *_job, path in _large)
    except (OSError, ValueError):
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "src", type=input_path, help="a CelebA folder (img_align_celeba or its parent) or any folder of images"
    )
    p.add_argument("out", type=output_path, help="the HDF5 file to write (.h5 or .hdf5)")
    p.add_argument("--size", type=int, default=64, help=f"image size S, one of {IMAGE_SIZES} (default 64)")
    p.add_argument("--crop", choices=CROPS, help="crop before resizing (default: the folder's own)")
    p.add_argument("--crop-size", type=int, help="side of the crop box in source pixels (default: the crop's own)")
    p.add_argument("--workers", type=int, default=machine_cores(), help="decoding processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (kept whole until the end)")
    return p.parse_args(argv)


def _temporary(out: Path, pid: int | str) -> Path:
    """The name process `pid` writes `out` under until it is complete."""
    return out.with_name(f".{out.name}.{pid}.tmp")


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary files of `out` whose writer is gone (killed: a CelebA file is gigabytes); one of a
    process still running, another prepare_celeba writing the same file, stays."""
    for stale in out.parent.glob(glob.escape(f".{out.name}.") + "*.tmp"):
        pid = stale.name[len(out.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            stale.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def prepare(args: argparse.Namespace) -> tuple[int, int]:
    """Write the file; returns (images written, files skipped)."""
    check_one_process("prepare_celeba.py")
    if args.size not in IMAGE_SIZES:  # another size is resized again on every read
        raise DataError(f"--size must be an image size the model trains at, one of {IMAGE_SIZES}, got {args.size}")
    check_workers(args.workers, fewest=1)
    if args.crop_size is not None and args.crop_size < 1:  # DataConfig would name its field, crop_size
        raise DataError(f"--crop-size must be >= 1, got {args.crop_size}")
    if args.out.suffix.lower() not in (".h5", ".hdf5"):
        raise DataError(f"the output must be an .h5 or .hdf5 file, got {args.out}")
    if args.out.exists() and not args.overwrite:  # a prepared data set can take an hour to remake
        raise DataError(f"{args.out} already exists; give --overwrite to replace it, or choose another output")
    cfg = DataConfig(path=str(args.src), crop=args.crop, crop_size=args.crop_size)
    kind, _ = resolve_source(cfg)
    if kind not in ("celeba", "folder"):  # before it is opened: opening an HDF5 file warns about its image size
        raise DataError(f"{args.src} is not an image folder (it is a {kind} source)")
    # Before the folder is opened: opening checks every file's header (a minute for CelebA), then the hour of decoding.
    # Its missing folders are made once it opened: a source refused leaves none behind.
    check_writable(args.out, "the output", create=False)
    source = open_source(cfg, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files = source.files
    remove_stale_temporaries(args.out)
    tmp = _temporary(args.out, os.getpid())
    chunk = max(1, min(64, len(files) // (4 * args.workers)))
    try:
        with Pool(args.workers, _init_worker, (args.size, source.crop, source.crop_size, source.large)) as pool:
            try:
                written = _write(tmp, _decoded(pool, files, chunk, window=2 * chunk * args.workers), args, source)
            finally:
                _end_pool(pool)
        check_stop()  # a stop signal dropped by a finalizer: the earlier file stays
        durable_replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    return written, len(files) - written


def _write(tmp: Path, decoded, args: argparse.Namespace, source) -> int:
    """Write the `decoded` images of source.files to the HDF5 file `tmp`; return how many were written."""
    size, files, written = args.size, source.files, 0
    # No chunk cache: each image goes to disk in its own write, so a full disk fails that write, here, and not a
    # write from an h5py finalizer, where Python drops the error and HDF5 then crashes the process.
    try:
        f = h5py.File(tmp, "w", rdcc_nbytes=0)
    except OSError as e:  # a full disk
        raise _write_error(e, args.out) from None
    try:
        images = f.create_dataset(
            "images",
            shape=(len(files), size, size, 3),
            maxshape=(None, size, size, 3),
            dtype=np.uint8,
            chunks=(1, size, size, 3),
        )
        # h5py stores text as UTF-8: a folder name that is not (its bytes decoded as lone surrogates) as '\udce9'.
        source_name = str(args.src).encode(errors="backslashreplace").decode()
        f.attrs.update({"source": source_name, "crop": source.crop, "image_size": size})
        for image in tqdm(decoded, total=len(files), unit="img"):
            check_stop()
            if image is not None:
                images[written] = image
                written += 1
        if written == 0:
            raise DataError(f"none of the {len(files)} images under {args.src} could be decoded")
        images.resize(written, axis=0)
        f.flush()  # the file's metadata too, while a failure can still be handled as below
    except BaseException as e:
        with contextlib.suppress(OSError, RuntimeError):  # the error that made it fail is the one to tell
            f.close()
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, DataError):
            raise _write_error(e, args.out, written, len(files)) from None
        raise
    _close(f, args.out)
    return written


def _write_error(error: BaseException, out: Path, written: int | None = None, total: int = 0) -> OSError:
    """h5py's error for a failed write as one line that names the output and the system's reason (h5py's own names
    the temporary file, with a time stamp, a C buffer's address and offsets)."""
    code = getattr(error, "errno", None)
    if code is None and "No space left on device" in str(error):  # some of h5py's RuntimeErrors carry no errno
        code = errno.ENOSPC
    when = "" if written is None else f" after {written} of {total} images"
    if code is None:
        return OSError(f"cannot write {out}{when}: {one_line(error)}")
    return OSError(code, f"cannot write {out}{when}: {os.strerror(code)}")


def _close(f: h5py.File, out: Path) -> None:
    try:
        f.close()
    except (OSError, RuntimeError) as e:  # h5py raises RuntimeError for some failed closes
        raise _write_error(e, out) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with stop_signals():
                written, skipped = prepare(args)
        except (ConfigError, DataError, OSError) as e:
            error, status = one_line(e), 2
        except KeyboardInterrupt as e:
            stop = interruption(e)
            error, status = f"{stop.what}; {args.out} left as it was", stop.status
        finally:
            for warning in caught:  # before the error: the line that says why it stopped is the last
                print(f"warning: {warning.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return status
    note = f", skipped {skipped} more that could not be decoded" if skipped else ""
    print(f"wrote {counted(written, 'image')} of {args.size}x{args.size} to {args.out}{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
