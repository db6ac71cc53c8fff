"""The DALI loader against the torch loader: same images, same crop, same range, every file once per epoch.

DALI decodes in a different library from PIL, so the parity tolerance is measured, not assumed. Measured on the
built-in faces saved as 178x218 JPEGs (quality 90), DALI CPU pipeline vs the torch loader, in [-1, 1] units:
- no resize (celeba box at 128 px): identical (max 6e-8): the JPEG decoders agree bit for bit;
- 32 px: mean |diff| 0.0011, 99th percentile 2 levels (0.016), max 10 levels (0.078); 16 px: mean 0.0022,
  max 0.086; on noisy random JPEGs (the worst case for ringing) mean 0.0024 and max 0.047 at 32 px.
The differences come from the Lanczos-3 resize alone (DALI and PIL weigh and round the antialiased filter
differently): a few pixels on hard edges, never a shifted or mis-cropped image. The bounds below leave about 1.5x
headroom over those numbers; a wrong crop, a missing flip or a wrong normalisation moves the mean by 0.1 or more.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from began_fast.config import DataConfig
from began_fast.data import (
    BatchOrder,
    DataError,
    SkippedImagesWarning,
    TorchLoader,
    dali_installed,
    make_batches,
    open_source,
)
from began_fast.data.builtin import draw_face

HAS_DALI = dali_installed()
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install 'began-fast[dali]')")

MEAN_TOL = 0.004  # mean |dali - torch| over a batch, [-1, 1] units (measured <= 0.0024)
P99_TOL = 4 / 127.5  # 99th percentile: 4 uint8 levels (measured 2)
MAX_TOL = 16 / 127.5  # any pixel: 16 uint8 levels (measured 10, on a hard edge)
EXACT_TOL = 1 / 127.5  # no resize: the decoders agree; one level allows for a different libjpeg-turbo build

NUM_FACES = 24


def _face(index: int, width: int = 178, height: int = 218) -> Image.Image:
    """Built-in face `index` as a width x height RGB image (a CelebA-shaped crop of a square drawing)."""
    side = max(width, height)
    image = draw_face(np.random.default_rng([7, index]), side)
    left, top = (side - width) // 2, (side - height) // 2
    return image.crop((left, top, left + width, top + height))


@pytest.fixture(scope="module")
def celeba_dir(tmp_path_factory):
    """A CelebA-like folder: NUM_FACES distinct 178x218 JPEGs under img_align_celeba/."""
    root = tmp_path_factory.mktemp("celeba") / "img_align_celeba"
    root.mkdir()
    for i in range(NUM_FACES):
        _face(i).save(root / f"{i:06d}.jpg", quality=90)
    return str(root)


def _dali(
    cfg: DataConfig,
    image_size: int,
    batch_size: int,
    *,
    source=None,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
    **order,
):
    """DaliLoader over cfg's source (or `source`) in BatchOrder(len(source), batch_size, seed, **order)."""
    from began_fast.data.dali import DaliLoader

    source = open_source(cfg, image_size) if source is None else source
    order = BatchOrder(len(source), batch_size, seed=seed, **order)
    return DaliLoader(cfg, image_size, source, order, device=device, dtype=dtype)


def _reference(cfg: DataConfig, image_size: int) -> torch.Tensor:
    """Every image of the source as the torch loader makes it: (N, 3, S, S) float32 in [-1, 1]."""
    source = open_source(cfg, image_size)
    return torch.stack([source[i] for i in range(len(source))]).float() / 127.5 - 1


def _match(batch: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The index of the reference image (or its mirror image) nearest to each image of the batch."""
    candidates = torch.cat([reference, reference.flip(-1)])
    distance = (batch[:, None] - candidates[None]).abs().flatten(2).mean(2)
    return distance.argmin(1) % len(reference)


def _assert_close_to_torch(dali: torch.Tensor, torch_batch: torch.Tensor, label: str) -> None:
    diff = (dali.float() - torch_batch).abs()
    mean, p99, worst = diff.mean().item(), diff.flatten().quantile(0.99).item(), diff.max().item()
    print(f"{label}: mean {mean:.5f}, p99 {p99:.4f}, max {worst:.4f} ([-1, 1] units)")
    assert mean < MEAN_TOL and p99 < P99_TOL and worst < MAX_TOL, f"{label}: {mean=:.5f} {p99=:.4f} {worst=:.4f}"


def _epoch(loader) -> torch.Tensor:
    return torch.cat([next(loader) for _ in range(len(loader))])


@needs_dali
@pytest.mark.parametrize("image_size", [16, 32])
def test_celeba_batches_match_torch_loader(celeba_dir, image_size):
    cfg = DataConfig(path=celeba_dir, flip=False, num_workers=1)
    loader = _dali(cfg, image_size, 8)
    images = _epoch(loader)
    assert images.shape == (NUM_FACES, 3, image_size, image_size) and images.dtype == torch.float32
    assert images.device.type == "cpu" and images.min() >= -1 and images.max() <= 1
    reference = _reference(cfg, image_size)
    order = _match(images, reference)
    assert sorted(order.tolist()) == list(range(NUM_FACES)), "one epoch must hold every file once"
    _assert_close_to_torch(images, reference[order], f"celeba crop, {image_size}px")


@needs_dali
def test_without_resize_the_decoders_agree(celeba_dir):
    cfg = DataConfig(path=celeba_dir, flip=False, num_workers=1)
    images = next(_dali(cfg, 128, 8))
    reference = _reference(cfg, 128)
    assert (images - reference[_match(images, reference)]).abs().max().item() <= EXACT_TOL


@needs_dali
def test_flips_are_per_sample_mirrors(celeba_dir):
    cfg = DataConfig(path=celeba_dir, flip=True, num_workers=1)
    images = _epoch(_dali(cfg, 32, 8))
    reference = _reference(cfg, 32)
    order = _match(images, reference)
    straight = (images - reference[order]).abs().flatten(1).mean(1)
    mirrored = (images - reference[order].flip(-1)).abs().flatten(1).mean(1)
    flipped = mirrored < straight
    assert 0 < flipped.sum() < NUM_FACES, "with flip on, some but not all of 24 images are mirrored"
    _assert_close_to_torch(
        images, torch.where(flipped[:, None, None, None], reference[order].flip(-1), reference[order]), "flips"
    )


@needs_dali
def test_float16_output_is_the_float32_output_rounded(celeba_dir):
    cfg = DataConfig(path=celeba_dir, flip=True, num_workers=1)
    half, single = next(_dali(cfg, 32, 8, dtype=torch.float16)), next(_dali(cfg, 32, 8))
    assert half.dtype == torch.float16
    # Same seed, same files and flips; fp16 rounds values in [-1, 1] to within 2**-11.
    torch.testing.assert_close(half.float(), single, atol=2**-11, rtol=0)


@needs_dali
def test_bfloat16_output_is_the_float32_output_rounded(celeba_dir):
    # DALI has no bfloat16: the batch is made in float32 and rounded by torch, so it is that batch's rounding.
    cfg = DataConfig(path=celeba_dir, flip=True, num_workers=1)
    seed = int(torch.randint(0, 2**31, ()))
    bf16, single = (next(_dali(cfg, 32, 8, dtype=dtype, seed=seed)) for dtype in (torch.bfloat16, torch.float32))
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, single.to(torch.bfloat16))


@needs_dali
@pytest.mark.parametrize("world_size, batch_size", [(2, 4), (3, 4), (2, 5)])
def test_shards_cover_every_file_once_per_epoch(celeba_dir, world_size, batch_size):
    # 24 files: with batch 4 every epoch divides into whole global batches; with batch 5 on 2 ranks an epoch is 2
    # global batches of 10 and drops 4 files, and no file may come twice in an epoch nor leak into the next one.
    cfg = DataConfig(path=celeba_dir, flip=False, num_workers=1)
    reference = _reference(cfg, 16)
    loaders = [_dali(cfg, 16, batch_size, rank=rank, world_size=world_size) for rank in range(world_size)]
    per_rank = NUM_FACES // world_size // batch_size
    assert all(len(loader) == per_rank for loader in loaders)
    assert all(f"shard {rank} of {world_size})" in loader.describe() for rank, loader in enumerate(loaders))
    epochs = []
    for epoch in range(3):
        seen = torch.cat([_match(_epoch(loader), reference) for loader in loaders]).tolist()
        assert len(set(seen)) == len(seen) == world_size * per_rank * batch_size, f"epoch {epoch}: {sorted(seen)}"
        if NUM_FACES % (world_size * batch_size) == 0:
            assert sorted(seen) == list(range(NUM_FACES)), f"epoch {epoch}: files seen {sorted(seen)}"
        epochs.append(seen)
    assert epochs[0] != epochs[1], "the order must be reshuffled every epoch"
    assert all(loader.epoch == 3 for loader in loaders)


@needs_dali
def test_center_crop_of_mixed_sizes_grayscale_cmyk_png(tmp_path):
    """Sizes, colour spaces, a 16-bit grey PNG and a JPEG whose EXIF orientation turns it: both loaders agree."""
    images = [_face(0, 178, 218), _face(1, 100, 80), _face(2, 64, 64), _face(3, 90, 120), _face(4, 100, 70)]
    images[1] = images[1].convert("L")
    images[2] = images[2].convert("CMYK")
    for i, image in enumerate(images[:4]):
        image.save(tmp_path / f"{i}.{'png' if i == 3 else 'jpg'}", quality=90)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise: 70 wide, 100 high
    images[4].save(tmp_path / "4.jpg", quality=90, exif=exif.tobytes())
    grey = np.asarray(_face(5, 80, 80).convert("L"), dtype=np.uint16) * 257 + np.arange(80, dtype=np.uint16) % 7
    Image.fromarray(grey).save(tmp_path / "5.png")
    cfg = DataConfig(path=str(tmp_path), flip=False, num_workers=1)
    loader = _dali(cfg, 32, 6)
    assert loader.source.kind == "folder"
    batch = next(loader)
    reference = _reference(cfg, 32)
    order = _match(batch, reference)
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4, 5]
    _assert_close_to_torch(batch, reference[order], "center crop, mixed sizes and colour spaces")


@needs_dali
def test_center_crop_of_a_given_size_in_wide_and_tall_images(tmp_path):
    """--crop center --crop-size N: the N x N box at the centre of each image, along its width and its height,
    whichever is the long side."""
    faces = np.random.default_rng().choice(1000, 4, replace=False)
    for i, (face, (width, height)) in enumerate(zip(faces, [(120, 72), (72, 120), (96, 80), (80, 96)], strict=True)):
        _face(int(face), width, height).save(tmp_path / f"{i}.jpg", quality=90)
    cfg = DataConfig(path=str(tmp_path), crop="center", crop_size=64, flip=False, num_workers=1)
    batch = next(_dali(cfg, 32, 4))
    reference = _reference(cfg, 32)
    order = _match(batch, reference)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    _assert_close_to_torch(batch, reference[order], "center crop of 64 px, wide and tall images")


@needs_dali
def test_bad_files_are_skipped_and_counted(celeba_dir, tmp_path):
    for i in range(8):
        _face(i).save(tmp_path / f"good{i}.jpg", quality=90)
    whole = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "not_an_image.jpg").write_text("this is a text file")
    # Whole header and IEND chunk, damaged pixels: DALI's decoder would stop the run on it (it cannot skip a file).
    _face(8).save(tmp_path / "damaged.png")
    png = bytearray((tmp_path / "damaged.png").read_bytes())
    middle = png.index(b"IDAT") + 4 + 100
    png[middle : middle + 8] = bytes(255 - b for b in png[middle : middle + 8])
    (tmp_path / "damaged.png").write_bytes(bytes(png))
    cfg = DataConfig(path=str(tmp_path), flip=True, num_workers=1)
    with pytest.warns(SkippedImagesWarning, match="skipped 3 of 11"):
        loader = _dali(cfg, 16, 4)
    assert "8 images" in loader.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file fails later: the screen caught all three
        batches = [next(loader) for _ in range(3 * len(loader))]
    assert all(torch.isfinite(b).all() and b.abs().max() <= 1 for b in batches)


@needs_dali
def test_bad_arguments_fail_with_one_line(celeba_dir):
    cfg = DataConfig(path=celeba_dir, flip=False, num_workers=1)
    from began_fast.data.dali import DaliLoader

    source = open_source(cfg, 16)
    with pytest.raises(
        DataError, match=f"order is over {len(source) - 1} items, the loader's data set has {len(source)}"
    ):
        DaliLoader(cfg, 16, source, BatchOrder(len(source) - 1, 4, seed=0), device="cpu")
    with pytest.raises(DataError, match="float32, float16 or bfloat16"):
        _dali(cfg, 16, 4, dtype=torch.float64)
    with pytest.raises(DataError, match="builtin"):
        _dali(DataConfig(builtin_count=8), 16, 4)


@needs_dali
def test_dali_threads_are_the_workers_asked_for_at_least_one_else_the_ranks_share_of_the_cores(celeba_dir, monkeypatch):
    """--workers N gives DALI N CPU threads (0, which the torch loader takes as "decode in the main process", is one
    thread); without --workers, this rank's share of the cores as for the torch loader's workers."""
    monkeypatch.setattr("began_fast.distributed.machine_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for workers, threads, said in [(0, 1, "1 thread"), (3, 3, "3 threads"), (None, 4, "4 threads")]:
        loader = _dali(DataConfig(path=celeba_dir, flip=True, num_workers=workers), 16, 4)
        assert loader.num_threads == threads and f", {said}, prefetch" in loader.describe()
        batch = next(loader)
        assert batch.shape == (4, 3, 16, 16) and torch.isfinite(batch).all()


@pytest.fixture
def hdf5_file(tmp_path):
    path = tmp_path / "faces.h5"
    faces = np.stack([np.asarray(_face(i, 64, 64)) for i in range(20)])
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=faces)
    return str(path)


@pytest.fixture(params=["celeba", "hdf5"])
def unresized(request, celeba_dir, hdf5_file):
    """(config, image size) of a source read at its stored size: a 128 px CelebA crop, or 64 px HDF5 rows."""
    if request.param == "celeba":
        return DataConfig(path=celeba_dir, flip=True, num_workers=1), 128
    return DataConfig(path=hdf5_file, flip=True, num_workers=1), 64


@needs_dali
def test_batches_equal_torch_loader_batches(unresized):
    # No resize, so the DALI batch is the torch batch (same order, same flips, the decoders agree), across epoch
    # boundaries (24 faces or 20 rows, batch 8: 3 or 2 batches per epoch).
    cfg, size = unresized
    loader = _dali(cfg, size, 8)
    source = open_source(cfg, size)
    reference = TorchLoader(source, BatchOrder(len(source), 8, seed=0), flip=True, num_workers=0)
    for step in range(7):
        torch.testing.assert_close(next(loader), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")
    assert loader.epoch == 7 // len(loader)


@needs_dali
def test_resume_continues_the_same_batches(unresized):
    cfg, size = unresized
    resumed = _dali(cfg, size, 8, start_step=4)
    source = open_source(cfg, size)
    reference = TorchLoader(source, BatchOrder(len(source), 8, seed=0, start_step=4), flip=True, num_workers=0)
    for step in range(4, 8):
        torch.testing.assert_close(next(resumed), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")
    assert resumed.step == 8


def _break_huffman_table(path: Path) -> None:
    """Damage a JPEG's Huffman table: the file keeps its header and end marker, so it passes the source's scan, but
    neither DALI nor PIL can decode it."""
    data = bytearray(path.read_bytes())
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 25] = b"\xff" * 20
    path.write_bytes(bytes(data))


@pytest.fixture
def breaking_folder(tmp_path):
    """(cfg, source): 12 faces, of which file 3 has a broken Huffman table and file 7 is deleted after the scan."""
    for i in range(12):
        _face(i).save(tmp_path / f"{i:06d}.jpg", quality=90)
    _break_huffman_table(tmp_path / "000003.jpg")
    cfg = DataConfig(path=str(tmp_path), crop="celeba", flip=True, num_workers=1)  # 128 px box: no resize
    source = open_source(cfg, 128)
    (tmp_path / "000007.jpg").unlink()
    return cfg, source


@needs_dali
def test_files_that_fail_during_the_run_are_replaced_as_the_torch_loader_does(breaking_folder):
    """DALI's decoder fails a whole batch on one bad file: the loader finds it, warns once, and rebuilds its pipeline
    at the same step with the file replaced by the next, so its batches stay the torch loader's."""
    cfg, source = breaking_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = _dali(cfg, 128, 4, source=source)
        reference = TorchLoader(source, BatchOrder(len(source), 4, seed=0), flip=True, num_workers=0)
        for step in range(6):  # two epochs: each bad file is met twice
            torch.testing.assert_close(next(loader), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")
    warned = sorted(Path(str(w.message).split()[2]).name for w in caught if "cannot decode" in str(w.message))
    assert warned == ["000003.jpg", "000007.jpg"]  # once between both loaders, which read one folder
    assert loader.step == 6


@needs_dali
@pytest.mark.parametrize("start_step", [0, 5], ids=["run", "resume"])
def test_a_file_dali_cannot_decode_in_the_first_batch_is_replaced_as_in_any_other(tmp_path, start_step):
    """The first batch of a loader, a run's or a resumed run's, is made by its first next(), where a file DALI cannot
    decode is replaced as in a later batch, and not by its constructor, which stopped the run with DALI's
    traceback."""
    faces = np.random.default_rng().choice(1000, 12, replace=False)
    for i, face in enumerate(faces):
        _face(int(face)).save(tmp_path / f"{i:06d}.jpg", quality=90)
    broken = BatchOrder(12, 4, seed=0, start_step=start_step).batch(start_step)[0][1].item()
    _break_huffman_table(tmp_path / f"{broken:06d}.jpg")
    cfg = DataConfig(path=str(tmp_path), crop="celeba", flip=True, num_workers=1)  # 128 px box: no resize
    source = open_source(cfg, 128)
    with pytest.warns(UserWarning, match=rf"cannot decode .*{broken:06d}\.jpg"):
        loader = _dali(cfg, 128, 4, source=source, start_step=start_step)
        reference = TorchLoader(source, BatchOrder(12, 4, seed=0, start_step=start_step), flip=True, num_workers=0)
        for step in range(start_step, start_step + 3):
            torch.testing.assert_close(next(loader), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")
    assert loader.step == start_step + 3


@needs_dali
def test_a_file_dali_cannot_decode_is_looked_for_in_the_batch_that_failed(tmp_path):
    """DALI fails the batch that holds the broken file when the loader comes to it: PIL looks for the file in that
    batch too, not only in those prepared after it (which here do not hold it again)."""
    faces = np.random.default_rng().choice(1000, NUM_FACES, replace=False)
    for i, face in enumerate(faces):
        _face(int(face)).save(tmp_path / f"{i:06d}.jpg", quality=90)
    order = BatchOrder(NUM_FACES, 4, seed=0)
    steps = [order.batch(step)[0].tolist() for step in range(2 * NUM_FACES // 4)]  # two epochs of 6 batches
    broken = next(i for i in steps[2] if not any(i in batch for batch in steps[3:9]))
    _break_huffman_table(tmp_path / f"{broken:06d}.jpg")
    cfg = DataConfig(path=str(tmp_path), crop="celeba", flip=True, num_workers=1)  # 128 px box: no resize
    source = open_source(cfg, 128)
    with pytest.warns(UserWarning, match=rf"cannot decode .*{broken:06d}\.jpg"):
        loader = _dali(cfg, 128, 4, source=source)
        reference = TorchLoader(source, order, flip=True, num_workers=0)
        for step in range(6):
            torch.testing.assert_close(next(loader), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")


@needs_dali
def test_a_file_overwritten_by_one_smaller_than_the_crop_box_is_replaced_as_the_torch_loader_does(tmp_path):
    """DALI cannot cut the CelebA box out of a 100 x 100 image written over a face after the scan, and neither can
    PIL: the file is dropped with a warning and the next one stands in for it, as in the torch loader."""
    faces = np.random.default_rng().choice(1000, 8, replace=False)
    for i, face in enumerate(faces):
        _face(int(face)).save(tmp_path / f"{i:06d}.jpg", quality=90)
    cfg = DataConfig(path=str(tmp_path), crop="celeba", flip=True, num_workers=1)  # 128 px box: no resize
    source = open_source(cfg, 128)
    _face(int(faces[5]), 100, 100).save(tmp_path / "000005.jpg", quality=90)
    with pytest.warns(UserWarning, match=r"cannot decode .*000005\.jpg \(a 100x100 image is smaller than the celeba"):
        loader = _dali(cfg, 128, 4, source=source)
        reference = TorchLoader(source, BatchOrder(len(source), 4, seed=0), flip=True, num_workers=0)
        for step in range(4):  # two epochs
            torch.testing.assert_close(next(loader), next(reference), atol=EXACT_TOL, rtol=0, msg=f"step {step}")


@needs_dali
def test_a_batch_only_dali_cannot_decode_is_one_line(breaking_folder, monkeypatch):
    import began_fast.data.dali as dali

    cfg, source = breaking_folder
    monkeypatch.setattr(dali, "load_image", lambda *args: None)  # as if PIL decoded every file
    with pytest.warns(UserWarning, match="cannot decode .*000007.jpg"):  # deleted: found when its bytes are read
        loader = _dali(cfg, 128, 4, source=source)
        one_line = (
            r"^DALI failed on the batch of step \d+ \(.*\) and PIL decodes each of its files; use --loader torch$"
        )
        with pytest.raises(DataError, match=one_line):
            for _ in range(6):
                next(loader)


@needs_dali
def test_held_out_images_are_never_read(unresized):
    cfg, size = unresized
    loader = _dali(dataclasses.replace(cfg, holdout=4), size, 4)
    everything = _reference(cfg, size)
    order = _match(_epoch(loader), everything)
    assert sorted(order.tolist()) == list(range(len(everything) - 4)), "an epoch is every training image, once"


@needs_dali
def test_hdf5_resized_on_read(hdf5_file):
    cfg = DataConfig(path=hdf5_file, flip=False, num_workers=1)
    loader = _dali(cfg, 32, 8, rank=1, world_size=2)
    source = open_source(cfg, 32)
    reference = TorchLoader(source, BatchOrder(len(source), 8, seed=0, rank=1, world_size=2), flip=False, num_workers=0)
    _assert_close_to_torch(next(loader), next(reference), "hdf5 64px -> 32px")


def test_loader_dali_without_dali_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name.split(".")[0] == "nvidia" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for cuda, extra in [("12.8", "dali"), ("13.0", "dali-cuda13"), (None, "dali")]:  # None: a CPU-only torch
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(DataError, match=rf"--loader dali needs NVIDIA DALI: pip install 'began-fast\[{extra}\]'$"):
            make_batches(DataConfig(loader="dali", builtin_count=8), 16, 4, device="cpu", seed=0)


@needs_dali
@pytest.mark.cuda
def test_mixed_decoder_matches_torch_loader(celeba_dir):
    cfg = DataConfig(path=celeba_dir, flip=False, num_workers=2)
    loader = _dali(cfg, 64, 8, device="cuda")
    assert loader.decoder == "mixed"
    images = _epoch(loader)
    assert images.device.type == "cuda"
    reference = _reference(cfg, 64)
    images = images.cpu()
    _assert_close_to_torch(images, reference[_match(images, reference)], "mixed decoder, 64px")


@needs_dali
@pytest.mark.cuda
def test_hdf5_batches_on_the_gpu_are_the_cpu_pipelines(hdf5_file):
    """HDF5 rows go to the GPU before the resize and the normalisation: the batches are made and returned there."""
    cfg = DataConfig(path=hdf5_file, flip=True, num_workers=2)
    for size in (64, 32):  # stored size, and resized
        batch = next(_dali(cfg, size, 8, device="cuda"))
        assert batch.device.type == "cuda"
        _assert_close_to_torch(batch.cpu(), next(_dali(cfg, size, 8)), f"hdf5 on the GPU, {size}px")


@needs_dali
def test_files_gone_from_under_dali_are_named_up_to_a_few_then_in_one_line(tmp_path):
    """As the torch loader's: a folder emptied mid-run names its first NAMED_FAILURES files, then one line for the
    others, then the error (each of its files was named before); a folder gone is the error at once."""
    from began_fast.data.dali import _EncodedFiles
    from began_fast.data.errors import NAMED_FAILURES

    def folder(root: Path, count: int) -> list[Path]:
        root.mkdir()
        for i in range(count):
            _face(i, 40, 40).save(root / f"{i:06d}.jpg")
        return sorted(root.iterdir())

    files = folder(tmp_path / "emptied", 14)
    encoded = _EncodedFiles(open_source(DataConfig(path=str(tmp_path / "emptied"), crop="center"), 16))
    assert bytes(encoded.read(3)) == files[3].read_bytes()
    for path in files:
        path.unlink()
    with pytest.warns(UserWarning) as warned, pytest.raises(DataError, match="none of the 14 image files can be read"):
        encoded.read(3)
    said = [str(w.message) for w in warned]
    assert len(said) == NAMED_FAILURES + 1 and said[0].startswith(f"cannot decode {files[3]} (")
    assert said[-1].startswith(f"more than {NAMED_FAILURES} image files cannot be decoded")
    folder(tmp_path / "faces", 2)
    gone = _EncodedFiles(open_source(DataConfig(path=str(tmp_path / "faces"), crop="center"), 16))
    shutil.rmtree(tmp_path / "faces")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=rf"^the image folder {tmp_path / 'faces'} is gone \(moved, removed"):
            gone.read(0)
