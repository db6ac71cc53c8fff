"""Data sources and loaders (began_fast.data) on tiny generated fixtures: built-in faces written as CelebA-sized
JPEGs, PNGs, grayscale / CMYK / truncated / fake JPEGs, and HDF5 files in both layouts."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import began_fast.data.hdf5 as hdf5_module
from began_fast import seeds
from began_fast.cli import check_workers, one_line
from began_fast.config import ConfigError, DataConfig
from began_fast.data import (
    BatchOrder,
    DataError,
    GpuResidentSet,
    GpuResidentStream,
    SkippedImagesWarning,
    TorchLoader,
    builtin,
    crop_box,
    default_workers,
    detect_source,
    held_out_images,
    make_batches,
    open_source,
)
from began_fast.data.builtin import BuiltinFaces, draw_faces
from began_fast.data.errors import NAMED_FAILURES
from began_fast.data.gpu_resident import fits
from began_fast.data.images import largest_crop_size
from began_fast.distributed import machine_cores
from tests.scripts import dropped_by_a_finalizer, load_script

ROOT = Path(__file__).resolve().parent.parent
CELEBA_COUNT = 6


def write_celeba_like(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` 178 x 218 JPEGs of built-in faces, named like CelebA's files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, face in enumerate(draw_faces(count, 128, seed)):
        path = folder / f"{i + 1:06d}.jpg"
        Image.fromarray(face).resize((178, 218), Image.Resampling.BILINEAR).save(path, quality=95)
        paths.append(path)
    return paths


def reference_item(path: Path, box: tuple[int, int, int], size: int) -> torch.Tensor:
    """What a source must return for `path`: RGB, cropped to box (left, top, side), Lanczos-resized, CHW."""
    left, top, side = box
    with Image.open(path) as image:
        image = image.convert("RGB").crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    write_celeba_like(root / "img_align_celeba", CELEBA_COUNT, seed=1)
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """4 good images (a PNG in a subfolder, an RGB, a grayscale and a CMYK JPEG) and 3 corrupt files: a truncated
    JPEG, text named .jpg, and a PNG whose pixel data is damaged but whose header and IEND chunk are whole."""
    root = tmp_path_factory.mktemp("mixed")
    faces = draw_faces(4, 48, seed=2)
    (root / "sub").mkdir()
    Image.fromarray(faces[0]).save(root / "sub" / "a.png")
    Image.fromarray(faces[1]).save(root / "b.jpg", quality=95)
    Image.fromarray(faces[2]).convert("L").save(root / "c_gray.jpg", quality=95)
    Image.fromarray(faces[3]).convert("CMYK").save(root / "d_cmyk.jpg", quality=95)
    good = (root / "b.jpg").read_bytes()
    (root / "e_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "f_text.jpg").write_text("not an image at all\n")
    png = bytearray((root / "sub" / "a.png").read_bytes())
    middle = png.index(b"IDAT") + 4 + 100  # inside the compressed pixels
    png[middle : middle + 8] = bytes(255 - b for b in png[middle : middle + 8])
    (root / "g_damaged.png").write_bytes(bytes(png))
    (root / "notes.txt").write_text("ignored: no image extension\n")
    return root


def write_h5(path: Path, data: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=data)
    return path


# --- crop box and detection ---------------------------------------------------------------------------------


def test_crop_box_values():
    assert crop_box(178, 218, None, None) == (25, 50, 128)
    assert crop_box(178, 218, "celeba", None) == (25, 50, 128)
    assert crop_box(178, 218, "celeba", 100) == (39, 64, 100)  # same centre (89, 114)
    assert crop_box(178, 218, "center", None) == (0, 20, 178)
    assert crop_box(178, 218, "center", 64) == (57, 77, 64)
    assert crop_box(300, 200, "center", None) == (50, 0, 200)
    celeba = "the celeba box is placed for the 178x218 aligned CelebA images"
    with pytest.raises(DataError) as refused:
        crop_box(100, 150, "celeba", None)
    assert str(refused.value) == (
        f"a 100x150 image is smaller than the celeba crop box of 128x128 at left 25, top 50: {celeba}; one of at most "
        "23x23 fits this one, as does the centred square (train.py and prepare_celeba.py: --crop-size 23 or less, or "
        "--crop center)"
    )
    with pytest.raises(DataError) as refused:
        crop_box(178, 218, "center", 200)
    assert str(refused.value) == (
        "a 178x218 image is smaller than the center crop box of 200x200 at left -11, top 9; a centred box of at most "
        "178x178 fits it (train.py and prepare_celeba.py: --crop-size 178 or less)"
    )


def test_a_celeba_box_outside_the_image_is_said_to_be_outside_it():
    """The celeba box is placed for CelebA's images: one no larger than the image can lie outside it, where a
    smaller --crop-size need not help. Found by an audit: 60x80 images and --crop-size 10 were said to be smaller
    than the 10x10 box (at left 84, top 109), and a smaller --crop-size advised, which no size follows."""
    celeba = "the celeba box is placed for the 178x218 aligned CelebA images"
    with pytest.raises(DataError) as refused:
        crop_box(60, 80, "celeba", 10)
    assert str(refused.value) == (
        f"the celeba crop box of 10x10 at left 84, top 109 falls outside a 60x80 image: {celeba}, and no celeba box "
        "of any size fits this one; the centred square does (train.py and prepare_celeba.py: --crop center without "
        "--crop-size)"
    )
    with pytest.raises(DataError) as refused:
        crop_box(300, 300, "celeba", 200)  # fits below and to the right, but starts left of the image (black border)
    assert str(refused.value) == (
        f"the celeba crop box of 200x200 at left -11, top 14 falls outside a 300x300 image: {celeba}; one of at most "
        "178x178 fits this one, as does the centred square (train.py and prepare_celeba.py: --crop-size 178 or less, "
        "or --crop center without --crop-size)"
    )
    # The size said is the largest that fits, for every image size and crop.
    for width, height, crop in itertools.product(range(1, 240, 9), range(1, 280, 13), ("celeba", "center")):
        fits = [size for size in range(1, 300) if fits_crop(width, height, crop, size)]
        assert fits == list(range(1, largest_crop_size(width, height, crop) + 1)), (width, height, crop)


def fits_crop(width: int, height: int, crop: str, crop_size: int) -> bool:
    try:
        crop_box(width, height, crop, crop_size)
    except DataError:
        return False
    return True


def test_the_crop_advice_names_the_flags_as_train_and_prepare_celebas(tmp_path):
    """evaluate.py crops a CelebA folder (named img_align_celeba) with the CelebA box, or a run's data with the run's
    crop, and has no --crop or --crop-size: the advice to use them (found by an audit) now names whose they are."""
    celeba = tmp_path / "img_align_celeba"
    celeba.mkdir()
    for i, face in enumerate(draw_faces(3, 64, seed=5)):
        Image.fromarray(face).resize((60, 80)).save(celeba / f"{i:06d}.jpg", quality=95)
    evaluate = load_script("evaluate")
    with pytest.raises(DataError) as refused:
        evaluate.evaluation_images(DataConfig(), str(celeba), num=2, image_size=16)
    assert str(refused.value) == (
        f"{celeba / '000000.jpg'}: a 60x80 image is smaller than the celeba crop box of 128x128 at left 25, top 50: "
        "the celeba box is placed for the 178x218 aligned CelebA images, and no celeba box of any size fits this "
        "one; the centred square does (train.py and prepare_celeba.py: --crop center), or take out of the folder "
        "the 3 of 3 images the box does not fit"
    )


def test_detect_source(tmp_path, celeba_root, mixed_folder):
    assert detect_source(None) == ("builtin", None)
    assert detect_source(str(celeba_root)) == ("celeba", str(celeba_root / "img_align_celeba"))
    assert detect_source(str(celeba_root / "img_align_celeba")) == ("celeba", str(celeba_root / "img_align_celeba"))
    assert detect_source(str(mixed_folder)) == ("folder", str(mixed_folder))
    h5 = write_h5(tmp_path / "x.h5", np.zeros((1, 8, 8, 3), np.uint8))
    assert detect_source(str(h5)) == ("hdf5", str(h5))
    no_suffix = write_h5(tmp_path / "data.bin", np.zeros((1, 8, 8, 3), np.uint8))
    assert detect_source(str(no_suffix)) == ("hdf5", str(no_suffix))
    with pytest.raises(DataError, match="does not exist"):
        open_source(DataConfig(path=str(tmp_path / "missing")), 32)
    with pytest.raises(DataError, match="not HDF5"):
        detect_source(str(mixed_folder / "notes.txt"))
    with pytest.raises(DataError, match="is not a hdf5 source"):
        open_source(DataConfig(path=str(mixed_folder), source="hdf5"), 32)
    with pytest.raises(DataError, match="needs a data path"):
        open_source(DataConfig(source="celeba"), 32)


# --- folder sources -----------------------------------------------------------------------------------------


def test_celeba_source_crops_the_celeba_box(celeba_root):
    source = open_source(DataConfig(path=str(celeba_root)), 32)
    assert source.kind == "celeba" and len(source) == CELEBA_COUNT
    assert [Path(p).name for p in source.files] == [f"{i:06d}.jpg" for i in range(1, CELEBA_COUNT + 1)]
    for i in (0, CELEBA_COUNT - 1):
        item = source[i]
        assert item.dtype == torch.uint8 and item.shape == (3, 32, 32)
        assert torch.equal(item, reference_item(Path(source.files[i]), (25, 50, 128), 32))
    assert "CelebA" in source.describe() and str(CELEBA_COUNT) in source.describe()

    centred = open_source(DataConfig(path=str(celeba_root), crop="center", crop_size=150), 16)
    assert torch.equal(centred[2], reference_item(Path(centred.files[2]), (14, 34, 150), 16))


def test_folder_images_smaller_than_the_model_are_warned_about_once(tmp_path):
    """Upscaled images teach the model blur: one warning names how many (an HDF5 file of small images gets one too)."""
    faces = draw_faces(4, 16, seed=0)
    for i, face in enumerate(faces):
        Image.fromarray(face).resize((8, 8) if i else (16, 16)).save(tmp_path / f"{i}.png")
    with pytest.warns(UserWarning) as warned:
        open_source(DataConfig(path=str(tmp_path), crop="center"), 16)
    assert [str(w.message) for w in warned] == [
        f"3 of 4 images are smaller, once cropped, than the 16x16 they are resized to (first: {tmp_path / '1.png'}): "
        "each is upscaled, so a model trained on them learns blurred images"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_source(DataConfig(path=str(tmp_path), crop="center"), 8)


def test_images_past_pils_pixel_limits_are_warned_about_once_by_name(tmp_path, monkeypatch):
    """PIL warns (without the file's name) on every decode of an image above Image.MAX_IMAGE_PIXELS, and refuses one
    above twice that, as a decompression bomb: the scan warns once about each kind, naming the first, and the refused
    are counted as such, not as files that could not be decoded. Limits lowered here so small images pass them."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    faces = draw_faces(4, 16, seed=0)
    for i, size in enumerate((16, 16, 50, 60)):  # 50 x 50 above the limit, 60 x 60 above twice it
        Image.fromarray(faces[i]).resize((size, size)).save(tmp_path / f"{i}.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning) as warned:
        source = open_source(DataConfig(path=str(tmp_path), crop="center"), 16)
    assert [str(w.message) for w in warned] == [
        f"1 of 3 images have more than 1,600 pixels (first: {tmp_path / '2.png'}, 50x50): each is decoded whole "
        "whenever it is read, which is slow; shrink them",
        f"skipped 1 of 5 image files that have more than 3,200 pixels, PIL's limit (first: {tmp_path / '3.png'}): "
        "shrink them to train on them",
        f"skipped 1 of 5 image files that could not be decoded (first: {tmp_path / 'junk.png'})",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own warning, on each read of the large image, is left out
        assert source[2].shape == (3, 16, 16)
    # ...by a filter set for that image's reads alone: one set on every read made Python forget the warnings it had
    # shown, so that each was shown again after every read (a review helper)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for _ in range(3):
            warnings.warn("a warning shown once", UserWarning, stacklevel=1)
            source[0]
    assert [str(w.message) for w in shown] == ["a warning shown once"]


def test_folder_source_converts_modes_and_skips_corrupt_files(mixed_folder):
    # The warning names the first file (in sorted order) that failed, not the first file.
    said = rf"skipped 3 of 7 image files that could not be decoded \(first: {mixed_folder / 'e_truncated.jpg'}\)"
    with pytest.warns(SkippedImagesWarning, match=said):
        source = open_source(DataConfig(path=str(mixed_folder)), 32)
    assert issubclass(SkippedImagesWarning, UserWarning)  # -W ignore::UserWarning silences it with the others
    assert source.kind == "folder"
    assert sorted(Path(p).name for p in source.files) == ["a.png", "b.jpg", "c_gray.jpg", "d_cmyk.jpg"]
    items = {Path(p).name: source[i] for i, p in enumerate(source.files)}
    assert all(item.shape == (3, 32, 32) and item.dtype == torch.uint8 for item in items.values())
    assert torch.equal(items["a.png"], reference_item(mixed_folder / "sub" / "a.png", (0, 0, 48), 32))
    gray = items["c_gray.jpg"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and gray.float().std() > 5
    # The CMYK file holds face 3: converted back to RGB it is close to the RGB face (JPEG loss only).
    rgb = torch.from_numpy(np.array(Image.fromarray(draw_faces(4, 48, seed=2)[3]).resize((32, 32)))).permute(2, 0, 1)
    assert (items["d_cmyk.jpg"].float() - rgb.float()).abs().mean() < 12


def save_turned(path: Path, image: Image.Image, orientation: int) -> None:
    """Save `image` as a JPEG whose EXIF says to show it turned (orientation 6: turn 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, quality=95, exif=exif.tobytes())


def test_folder_images_are_read_upright_as_8_bit_rgb(tmp_path):
    """EXIF orientation is applied (DALI's decoders do it too); 16-bit grey PNGs are scaled, not clipped."""
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: red left half, blue right half
    stored[:, :20, 0], stored[:, 20:, 2] = 255, 255
    save_turned(tmp_path / "a_turned.jpg", Image.fromarray(stored), 6)  # shown upright: red on top, blue below
    grey16 = np.random.default_rng(0).integers(0, 65536, (24, 24), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "b_grey16.png")
    source = open_source(DataConfig(path=str(tmp_path), crop="center"), 20)
    upright, grey = source[0].float(), source[1].float()
    assert upright[0, :8].mean() > 200 and upright[2, :8].mean() < 50  # top rows red
    assert upright[2, -8:].mean() > 200 and upright[0, -8:].mean() < 50  # bottom rows blue
    eight_bit = np.array(Image.fromarray((grey16 >> 8).astype(np.uint8)).resize((20, 20), Image.Resampling.LANCZOS))
    assert torch.equal(grey[0], torch.from_numpy(eight_bit).float()) and torch.equal(grey[0], grey[2])


def test_a_turned_image_is_checked_against_the_crop_box_upright(tmp_path):
    """A 200 x 160 JPEG shown turned (EXIF orientation 6) is 160 x 200 upright: the CelebA box (left 25, top 50,
    128 px) fits it upright, though not the stored pixels, which are only 160 high."""
    stored = np.random.default_rng(7).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    save_turned(tmp_path / "turned.jpg", Image.fromarray(stored), 6)
    source = open_source(DataConfig(path=str(tmp_path), crop="celeba"), 16)
    with Image.open(tmp_path / "turned.jpg") as image:
        upright = image.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turn 90 degrees clockwise
        assert upright.size == (160, 200)
        upright.save(tmp_path / "upright.png")
    assert torch.equal(source[0], reference_item(tmp_path / "upright.png", (25, 50, 128), 16))


def test_image_extensions_are_matched_whatever_their_case(tmp_path):
    faces = draw_faces(3, 16, seed=6)
    for face, name in zip(faces, ("a.JPG", "b.Png", "c.jpeg"), strict=True):
        Image.fromarray(face).save(tmp_path / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (tmp_path / "d.TXT").write_text("not an image")
    source = open_source(DataConfig(path=str(tmp_path), crop="center"), 16)
    assert [Path(f).name for f in source.files] == ["a.JPG", "b.Png", "c.jpeg"]


def test_a_png_whose_chunk_checksum_is_wrong_is_skipped(tmp_path):
    """PIL decodes a PNG whose IDAT checksum is wrong without a word; DALI's decoder stops on it: the scan leaves
    it out."""
    faces = draw_faces(2, 16, seed=8)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(tmp_path / f"{i}.png")
    png = bytearray((tmp_path / "1.png").read_bytes())
    idat = png.index(b"IDAT")
    crc = idat + 4 + int.from_bytes(png[idat - 4 : idat], "big")  # after the chunk's type and data
    png[crc : crc + 4] = bytes(255 - b for b in png[crc : crc + 4])
    (tmp_path / "1.png").write_bytes(bytes(png))
    with Image.open(tmp_path / "1.png") as image:
        image.load()  # the pixels are whole: only the checksum says the file is damaged
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 2"):
        source = open_source(DataConfig(path=str(tmp_path), crop="center"), 16)
    assert [Path(f).name for f in source.files] == ["0.png"]


def test_whole_images_with_unusual_endings_are_kept(tmp_path):
    """A JPEG with data after its end marker (as some cameras write) and a PNG named .jpg decode, so they stay."""
    faces = draw_faces(3, 16, seed=5)
    Image.fromarray(faces[0]).save(tmp_path / "a_trailer.jpg", quality=95)
    with open(tmp_path / "a_trailer.jpg", "ab") as f:
        f.write(b"camera maker's extra data" * 10)
    Image.fromarray(faces[1]).save(tmp_path / "b_png_named.jpg", format="PNG")
    Image.fromarray(faces[2]).save(tmp_path / "c.jpg", quality=95)
    whole = (tmp_path / "c.jpg").read_bytes()
    (tmp_path / "d_truncated.jpg").write_bytes(whole[: len(whole) // 2] + b"padding")
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 4"):
        source = open_source(DataConfig(path=str(tmp_path), crop="center"), 16)
    assert [Path(f).name for f in source.files] == ["a_trailer.jpg", "b_png_named.jpg", "c.jpg"]
    assert torch.equal(source[1], torch.from_numpy(faces[1]).permute(2, 0, 1))


def test_a_folder_linked_into_itself_is_listed_once(tmp_path):
    write_celeba_like(tmp_path / "faces" / "sub", 3, seed=1)
    (tmp_path / "faces" / "sub" / "parent").symlink_to(tmp_path / "faces")
    (tmp_path / "faces" / "again").symlink_to(tmp_path / "faces" / "sub")
    source = open_source(DataConfig(path=str(tmp_path / "faces"), crop="center"), 16)
    assert len(source) == 3
    # A folder of links to image folders (a data set assembled from several places) is read through its links.
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "faces").symlink_to(tmp_path / "faces" / "sub")
    assert len(open_source(DataConfig(path=str(tmp_path / "links"), crop="center"), 16)) == 3


def test_folder_errors(tmp_path, mixed_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        open_source(DataConfig(path=str(empty)), 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_text("text")
    (broken / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DataError, match="none of the 2 image files could be decoded"):
        open_source(DataConfig(path=str(broken)), 32)
    # Which image does not fit: the one the fewest crop sizes fit (the first, in sorted order, of equals) of the
    # files that passed the scan, whose advice fits them all, and how many do not (one stray thumbnail is better
    # taken out than every image's crop shrunk to its size).
    with pytest.raises(DataError, match=rf"^{mixed_folder / 'b.jpg'}: a 48x48 image is smaller than the celeba crop"):
        open_source(DataConfig(path=str(mixed_folder), crop="celeba"), 32)
    faces = tmp_path / "faces"
    write_celeba_like(faces, 3, seed=3)
    for name, size in (("a_thumbnail.png", 16), ("b_thumbnail.png", 10)):
        Image.fromarray(draw_faces(1, size, seed=0)[0]).save(faces / name)
    with pytest.raises(DataError) as refused:
        open_source(DataConfig(path=str(faces), crop="center", crop_size=100), 32)
    assert str(refused.value) == (
        f"{faces / 'b_thumbnail.png'}: a 10x10 image is smaller than the center crop box of 100x100 at left -45, top "
        "-45; a centred box of at most 10x10 fits it (train.py and prepare_celeba.py: --crop-size 10 or less), or "
        "take out of the folder the 2 of 5 images the box does not fit"
    )
    # Named for the celeba box: the image the fewest sizes of it fit, here not the one with the shortest side (the
    # box is off centre): a 170x170 image holds one of at most 113 px, a 160x300 one, of 143.
    off_centre = tmp_path / "off_centre"
    write_celeba_like(off_centre, 2, seed=3)
    for name, size in (("a_tall.png", (160, 300)), ("b_square.png", (170, 170))):
        Image.fromarray(draw_faces(1, 64, seed=0)[0]).resize(size).save(off_centre / name)
    with pytest.raises(DataError, match=rf"^{off_centre / 'b_square.png'}: .* one of at most 113x113 fits this one"):
        open_source(DataConfig(path=str(off_centre), crop="celeba", crop_size=150), 32)


@contextlib.contextmanager
def denied(*paths: Path):
    """Inside, reading `paths` (folders listed, files opened) fails as it does without read permission. Patched, not
    chmod-ed: root, which tests often run as, reads any file."""
    denied_paths = {str(path) for path in paths}
    scandir, open_image = os.scandir, Image.open

    def refuse(path):
        if str(path) in denied_paths:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", lambda path=".": refuse(path) or scandir(path))
        patch.setattr(Image, "open", lambda path, *args, **kwargs: refuse(path) or open_image(path, *args, **kwargs))
        yield


def test_unreadable_folders_and_files_are_said_to_be_unreadable_not_empty_or_corrupt(tmp_path):
    """A folder without read permission was reported as holding no images, and image files without it as files
    that could not be decoded (found by an audit): each now says it cannot be read, and why."""
    faces, nested = tmp_path / "faces", tmp_path / "nested"
    paths = write_celeba_like(faces, 4, seed=3) + write_celeba_like(faces / "sub", 2, seed=4)
    write_celeba_like(nested / "sub", 2, seed=4)
    with (
        denied(faces),
        pytest.raises(DataError, match=rf"^cannot read the image folder {faces} \(Permission denied\)$"),
    ):
        open_source(DataConfig(path=str(faces)), 16)
    with denied(nested / "sub"), pytest.raises(DataError) as refused:
        open_source(DataConfig(path=str(nested)), 16)
    assert str(refused.value) == (
        f"no images (.jpg, .jpeg, .png, .bmp, .webp) found under {nested}: 1 folder under it cannot be read (first: "
        f"{nested / 'sub'}, Permission denied)"
    )
    # A folder that cannot be read among others that can: its images are left out, as undecodable files are.
    said = rf"^skipped 1 folder under {faces} that cannot be read \(first: {faces / 'sub'}, Permission denied\): "
    with denied(faces / "sub"), pytest.warns(SkippedImagesWarning, match=said + "their images are left out$"):
        assert len(open_source(DataConfig(path=str(faces)), 16)) == 4
    with (
        denied(*paths),
        pytest.raises(DataError, match=rf"^none of the 6 image files could be read \(first: {paths[0]}, "),
    ):
        open_source(DataConfig(path=str(faces)), 16)
    said = rf"^skipped 2 of 6 image files that could not be read or decoded \(first: {paths[1]}, Permission denied\)$"
    with denied(paths[1], paths[2]), pytest.warns(SkippedImagesWarning, match=said):
        assert len(open_source(DataConfig(path=str(faces)), 16)) == 4


def test_a_folder_emptied_or_gone_mid_run_is_said_in_a_few_lines(tmp_path):
    """Files removed from under a run (a folder emptied, a disk unmounted) were each named in a warning before the
    error: 202,599 lines for CelebA (found by a data-path helper). The first NAMED_FAILURES are named, then one line
    stands for the others; a folder gone altogether is the error at once."""
    paths = write_celeba_like(tmp_path / "faces", 14, seed=3)
    # Each failure's count is taken with its mark, under the lock the workers share: two workers cannot both see 11.
    counted = open_source(DataConfig(path=str(tmp_path / "faces")), 16)
    assert [counted._first_failure(i) for i in (5, 5, 7, 0)] == [1, 0, 2, 3]
    source = open_source(DataConfig(path=str(tmp_path / "faces")), 16)
    for path in paths:
        path.unlink()
    with pytest.warns(UserWarning) as warned, pytest.raises(DataError, match="none of the 14 images under .* any more"):
        source[0]
    said = [str(w.message) for w in warned]
    assert len(said) == NAMED_FAILURES + 1 and all(line.startswith("cannot decode") for line in said[:-1])
    assert said[-1] == "more than 10 image files cannot be decoded: the others are skipped without a warning each"
    write_celeba_like(tmp_path / "more", 3, seed=4)
    gone = open_source(DataConfig(path=str(tmp_path / "more")), 16)
    shutil.rmtree(tmp_path / "more")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=rf"^the image folder {tmp_path / 'more'} is gone \(moved, removed or"):
            gone[1]


def test_file_that_breaks_after_the_scan_is_replaced_by_the_next(tmp_path):
    paths = write_celeba_like(tmp_path / "faces", 3, seed=3)
    source = open_source(DataConfig(path=str(tmp_path / "faces")), 16)
    expected = source[1]
    os.remove(paths[0])
    with pytest.warns(UserWarning, match="cannot decode"):
        assert torch.equal(source[0], expected)


def test_file_overwritten_after_the_scan_by_one_smaller_than_the_crop_box_is_replaced_by_the_next(tmp_path):
    """An image that no longer holds the crop box (overwritten mid-run by a smaller one) is one more file that
    cannot be decoded: the next image stands in for it, with a warning, and the run goes on."""
    rng = np.random.default_rng()
    paths = write_celeba_like(tmp_path / "faces", 3, seed=int(rng.integers(1000)))
    source = open_source(DataConfig(path=str(tmp_path / "faces"), crop="celeba"), 16)
    expected = source[2]
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(paths[1], quality=90)
    with pytest.warns(UserWarning, match=r"cannot decode .* \(a 100x100 image is smaller than the celeba crop box"):
        assert torch.equal(source[1], expected)


def test_loader_workers_warn_once_between_them_about_a_file_that_broke(tmp_path):
    """Two worker processes, 4 epochs of 2 batches: each decodes the deleted file, one warning is printed. (In a
    subprocess: under pytest a forked worker's warnings are recorded in that worker and never shown.)"""
    paths = write_celeba_like(tmp_path / "faces", 8, seed=3)
    program = f"""
import os, torch
from began_fast.config import ConfigError, DataConfig
from began_fast.data import BatchOrder, TorchLoader, open_source
source = open_source(DataConfig(path={str(tmp_path / "faces")!r}), 16)
os.remove({str(paths[5])!r})
loader = TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=2)
assert all(torch.isfinite(next(loader)).all() for _ in range(8))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("cannot decode") == 1, done.stderr


# --- HDF5 ---------------------------------------------------------------------------------------------------


def test_hdf5_layouts_and_resize(tmp_path, monkeypatch):
    faces = draw_faces(5, 64, seed=4)
    ours = open_source(DataConfig(path=str(write_h5(tmp_path / "ours.h5", faces))), 64)
    assert ours.kind == "hdf5" and len(ours) == 5
    assert torch.equal(ours[3], torch.from_numpy(faces[3]).permute(2, 0, 1))
    assert torch.equal(ours.as_uint8(), torch.from_numpy(faces).permute(0, 3, 1, 2))

    flat = open_source(DataConfig(path=str(write_h5(tmp_path / "flat.hdf5", faces.reshape(5, -1)))), 64)
    assert torch.equal(flat[2], ours[2]) and "flat" in flat.describe()

    with warnings.catch_warnings():  # downscaled or at the stored size: no warning
        warnings.simplefilter("error")
        resized = open_source(DataConfig(path=str(tmp_path / "ours.h5")), 32)
        assert open_source(DataConfig(path=str(tmp_path / "ours.h5")), 64).describe().endswith("(NHWC)")
    expected = np.array(Image.fromarray(faces[1]).resize((32, 32), Image.Resampling.LANCZOS))
    assert torch.equal(resized[1], torch.from_numpy(expected).permute(2, 0, 1))
    # A file stored at another size is read a chunk at a time (the whole of CelebA at 256 px is 40 GB of host
    # memory), into the same images.
    reads = []
    to_chw = resized._to_chw
    monkeypatch.setattr(hdf5_module, "RESIZE_CHUNK", 2)
    monkeypatch.setattr(resized, "_to_chw", lambda rows: reads.append(len(rows)) or to_chw(rows))
    assert torch.equal(resized.as_uint8(), torch.stack([resized[i] for i in range(5)]))
    assert reads[:3] == [2, 2, 1]
    # Stored smaller than the model's size: upscaled, and said so (a model would learn blurred images unawares).
    with pytest.warns(UserWarning, match=r"ours.h5 stores 64x64 images, smaller than the 128x128 they are resized to"):
        upscaled = open_source(DataConfig(path=str(tmp_path / "ours.h5")), 128)
    assert upscaled[0].shape == (3, 128, 128)

    for crop in (dict(crop="center"), dict(crop_size=40)):  # the file holds cropped images: a crop is a mistake
        with pytest.raises(DataError, match="--crop and --crop-size act on image folders, not on .*ours.h5"):
            open_source(DataConfig(path=str(tmp_path / "ours.h5"), **crop), 64)
    with pytest.raises(DataError, match="not on the built-in faces"):
        open_source(DataConfig(crop="celeba"), 64)

    # The h5py handle opened by a read is not pickled: a worker process reopens the file.
    clone = pickle.loads(pickle.dumps(ours))
    assert torch.equal(clone[4], ours[4])
    # A forked worker inherits the handle, which h5py does not support across a fork: it opens its own.
    inherited = ours._file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "getpid", lambda: -1)  # as in a forked DataLoader worker
        assert torch.equal(ours[2], torch.from_numpy(faces[2]).permute(2, 0, 1)) and ours._file is not inherited
    inherited.close()


@pytest.mark.parametrize(
    "data, message",
    [
        (np.random.rand(2, 8, 8, 3).astype(np.float32), "dtype float32; expected uint8"),
        (np.zeros((2, 8, 8), np.uint8), "shape"),
        (np.zeros((2, 8, 9, 3), np.uint8), "shape"),
        (np.random.randint(1, 256, (2, 8, 8, 4), dtype=np.uint8), r"shape \(2, 8, 8, 4\); expected \(N, S, S, 3\)"),
        (np.zeros((2, 0, 0, 3), np.uint8), "shape"),
        (np.zeros((2, 100), np.uint8), "shape"),
        (np.zeros((0, 8, 8, 3), np.uint8), "holds no images"),
    ],
)
def test_hdf5_bad_layouts(tmp_path, data, message):
    with pytest.raises(DataError, match=message):
        open_source(DataConfig(path=str(write_h5(tmp_path / "bad.h5", data))), 32)


def test_hdf5_without_images_dataset(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("pictures", data=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no dataset 'images'"):
        open_source(DataConfig(path=str(tmp_path / "other.h5")), 32)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="cannot read .* as HDF5"):
        open_source(DataConfig(path=str(tmp_path / "text.h5")), 32)


def test_a_damaged_chunk_of_an_hdf5_file_stops_the_run_in_one_line_naming_the_file_and_rows(tmp_path):
    """Bytes overwritten inside a compressed chunk fail HDF5's decompression, whose message named neither the file
    nor the row ("Can't synchronously read data (filter returned failure during read)", found by an audit). Each
    read of the rows fails the same way, in every loader: the run stops, in one line that says what to do."""
    path = tmp_path / "faces.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=draw_faces(12, 16, seed=6), chunks=(4, 16, 16, 3), compression="gzip")
        chunk = f["images"].id.get_chunk_info(1)  # rows 4 to 7
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(bytes(32))
    # HDF5's reason, without h5py's "Can't synchronously read data" around it: "filter returned failure during read"
    # (HDF5 2.0), "inflate() failed" (1.14).
    damaged = rf"^{path}:images {{}} cannot be read \((filter returned failure during read|inflate\(\) failed)\): "
    damaged += "the file is damaged; "
    damaged += r"re-create it with scripts/prepare_celeba.py$"
    source = open_source(DataConfig(path=str(path)), 16)
    assert source[3].shape == (3, 16, 16) and source[8].shape == (3, 16, 16)  # the other chunks are whole
    with pytest.raises(DataError, match=damaged.format("row 6")):
        source[6]
    with pytest.raises(DataError, match=damaged.format("row 5")):
        source[-7]
    # The whole file at once (the GPU-resident loader's copy), at the stored size and resized a chunk at a time.
    for image_size in (16, 8):
        with pytest.raises(DataError, match=damaged.format("rows 4 to 7")):
            open_source(DataConfig(path=str(path)), image_size).as_uint8()
    # From a DataLoader worker, the error reaches the run as the DataError it was, which the scripts print as one
    # line.
    loader = TorchLoader(source, BatchOrder(len(source), 12, seed=0), num_workers=1)
    try:
        with pytest.raises(DataError) as stopped:
            next(loader)
    finally:
        loader.close()
    assert re.fullmatch(damaged.format("row [4-7]")[1:-1], one_line(stopped.value))


# --- built-in faces -----------------------------------------------------------------------------------------


def test_builtin_faces_are_deterministic_and_varied():
    a = open_source(DataConfig(builtin_count=48, builtin_seed=7), 32)
    assert a.kind == "builtin" and len(a) == 48 and a[0].shape == (3, 32, 32) and a[0].dtype == torch.uint8
    assert torch.equal(a.as_uint8(), BuiltinFaces(48, 32, 7).as_uint8())
    assert torch.equal(a[5], BuiltinFaces(6, 32, 7)[5])  # image i depends on (seed, i) only, not on the count
    other = BuiltinFaces(48, 32, 8).as_uint8().float()
    images = a.as_uint8().float()
    assert (images - other).abs().mean() > 20
    # Variety: mean colours differ across faces, and no two faces are near-identical.
    assert images.mean(dim=(2, 3)).std(dim=0).min() > 10
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    assert distances[~torch.eye(48, dtype=torch.bool)].min() > 10
    # Faces: the centre (skin) differs from the corners (background) in most images.
    centre = images[:, :, 12:20, 12:20].mean(dim=(1, 2, 3))
    corners = images[:, :, :4, :4].mean(dim=(1, 2, 3))
    assert ((centre - corners).abs() > 5).float().mean() > 0.6


def test_every_face_of_every_seed_is_its_own():
    """Face i of set s comes from a stream seeded with (s, i): faces far apart in one set, and neighbouring faces of
    neighbouring seeds, are different faces (no stream seeded with s + i, none wrapping around)."""
    seed = int(torch.randint(0, 2**31, ()))
    far_apart = torch.stack([BuiltinFaces(1, 16, seed, first=i)[0] for i in (3, 1003, 10_003, 65_539)]).float()
    neighbours = torch.stack([BuiltinFaces(2, 16, seed + k)[1 - k] for k in (0, 1)]).float()
    for faces in (far_apart, neighbours):
        flat = faces.flatten(1)
        distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
        assert distances[~torch.eye(len(faces), dtype=torch.bool)].min() > 10


def test_builtin_faces_are_supersampled_at_least_4x_below_64_px_and_2x_from_it(monkeypatch):
    """Drawn on a canvas of max(128, 2 S) pixels and reduced: that supersampling is the antialiasing."""
    canvases = []
    draw_face = builtin.draw_face
    monkeypatch.setattr(builtin, "draw_face", lambda rng, canvas: canvases.append(canvas) or draw_face(rng, canvas))
    monkeypatch.setattr(builtin, "_drawn", {})
    for size in (16, 32, 64, 96):
        assert BuiltinFaces(1, size, seed=1)[0].shape == (3, size, size)
    assert canvases == [128, 128, 128, 192]


def test_a_few_faces_are_drawn_here_without_forking(monkeypatch):
    """Forking pays only for FACES_PER_PROCESS faces or more per process: fewer are drawn in this process."""
    monkeypatch.setattr(builtin, "_drawn", {})
    monkeypatch.setattr(builtin, "FACES_PER_PROCESS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    drawn_here = []
    draw_face = builtin.draw_face
    monkeypatch.setattr(builtin, "draw_face", lambda *args: drawn_here.append(1) or draw_face(*args))
    draw_faces(7, 16, seed=4)  # 7 // 4: one process's worth, drawn here
    assert len(drawn_here) == 7
    draw_faces(12, 16, seed=4, first=7)  # three processes' worth: drawn on them
    assert len(drawn_here) == 7


def test_builtin_faces_are_drawn_when_first_read_and_alike_in_any_order(monkeypatch):
    """A run does not wait for its 10,000 faces: each is drawn when it is first read, the same face whatever was
    read before it, and kept for the next read."""
    monkeypatch.setattr(builtin, "_drawn", {})
    faces = open_source(DataConfig(builtin_seed=5), 16)
    assert len(faces) == 10_000 and not builtin._drawn
    read = [faces[i] for i in (9_999, 2, -1, 0, 1, 3)]
    assert sorted(builtin._drawn[16, 5]) == [0, 1, 2, 3, 9_999]
    assert torch.equal(read[0], read[2]) and read[0].is_contiguous()
    monkeypatch.setattr(builtin, "_drawn", {})  # drawn again from nothing, in order
    assert torch.equal(torch.stack([read[3], read[4], read[1], read[5]]), BuiltinFaces(4, 16, 5).images)
    assert torch.equal(read[0], BuiltinFaces(1, 16, 5, first=9_999)[0])
    with pytest.raises(IndexError):
        faces[10_000]


def test_faces_drawn_on_several_processes_are_the_faces_drawn_here_and_kept_here(monkeypatch):
    """The GPU-resident loader's copy draws every face at once, on forked processes; a face is the same wherever it
    is drawn, and those drawn elsewhere are kept here as if drawn here."""
    monkeypatch.setattr(builtin, "_drawn", {})
    here = draw_faces(24, 16, seed=3, first=5, processes=1)
    drawn_here = []
    draw_face = builtin.draw_face
    monkeypatch.setattr(builtin, "draw_face", lambda *args: drawn_here.append(1) or draw_face(*args))
    monkeypatch.setattr(builtin, "_drawn", {})  # nothing drawn yet here
    monkeypatch.setattr(builtin, "FACES_PER_PROCESS", 4)
    elsewhere = draw_faces(24, 16, seed=3, first=5, processes=3)
    assert drawn_here == []  # all on the other processes (their draws of draw_face are counted there)
    assert np.array_equal(here, elsewhere)
    assert sorted(builtin._drawn[16, 3]) == list(range(5, 29))
    assert np.array_equal(builtin.draw_face_at(7, 16, 3), here[2]) and drawn_here == []  # kept


def failing_second_fork(fork):
    calls = []

    def fork_once():
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return fork()

    return fork_once


def dying_draw(indices, image_size, seed):
    os._exit(3)  # a drawing process killed (out of memory, say)


@pytest.mark.parametrize("failure", ["second-fork", "child-killed"])
def test_faces_whose_processes_fail_are_drawn_here_with_a_warning_and_no_process_left(monkeypatch, failure):
    """By default on the rank's share of the cores; a fork that fails after another succeeded, or a drawing process
    that dies, costs only the time: the faces are drawn here, and no forked process is left waiting for work."""
    monkeypatch.setattr(builtin, "_drawn", {})
    monkeypatch.setattr(builtin, "FACES_PER_PROCESS", 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 2 of the 8 cores
    if failure == "second-fork":
        monkeypatch.setattr(os, "fork", failing_second_fork(os.fork))
        said = r"on 2 processes failed \(\[Errno 11\] Resource temporarily unavailable\)"
    else:
        monkeypatch.setattr(builtin, "_draw_some", dying_draw)
        said = r"on 2 processes failed \(A process in the process pool was terminated abruptly"
    with pytest.warns(UserWarning, match=said):
        faces = draw_faces(40, 16, seed=3)  # 10 processes' worth: the share caps them
    assert multiprocessing.active_children() == []
    monkeypatch.setattr(builtin, "_drawn", {})
    assert np.array_equal(faces, draw_faces(40, 16, seed=3, processes=1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_drawing_processes_end_with_the_process_that_forked_them(tmp_path):
    """torchrun ends a job's ranks with a signal: a rank killed while drawing must not leave drawing processes
    behind, which would hold its GPU's files (and its memory) open."""
    script = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from began_fast.data import builtin

def slow_face(rng, canvas):
    open(os.path.join({str(tmp_path)!r}, str(os.getpid())), "w").close()
    time.sleep(120)

builtin.draw_face = slow_face
builtin.FACES_PER_PROCESS = 2
builtin.draw_faces(8, 16, seed=0, processes=2)
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    children = []
    try:
        deadline = time.monotonic() + 120
        while len(children) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            children = [int(name) for name in os.listdir(tmp_path)]
        assert len(children) == 2, children  # both drawing
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 30
        while any(map(alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, children)), children
    finally:
        parent.kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, ended but not yet reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- batch order --------------------------------------------------------------------------------------------


def test_batch_order_resumes_exactly():
    full = BatchOrder(50, 4, seed=3)
    from_zero = [b for b, _ in zip(full, range(30), strict=False)]
    resumed = BatchOrder(50, 4, seed=3, start_step=7)
    for (idx, flips), (ref_idx, ref_flips) in zip(resumed, from_zero[7:], strict=False):
        assert torch.equal(idx, ref_idx) and torch.equal(flips, ref_flips)
    assert from_zero[0][0].dtype == torch.long and from_zero[0][1].dtype == torch.bool
    different_seed = BatchOrder(50, 4, seed=4).batch(0)[0]
    assert not torch.equal(different_seed, from_zero[0][0])
    all_flips = torch.cat([f for _, f in from_zero])
    assert 0.3 < all_flips.float().mean() < 0.7


@pytest.mark.parametrize("start_step", [3, 4, 7])  # one epoch of 10 images is 3 batches of 3
def test_batch_order_started_past_its_first_epoch_from_the_step_alone(start_step):
    """A start at a step of a later epoch with no saved position (a checkpoint without one, an API user) takes the
    epoch and offset from the step: every test started inside epoch 0, where an epoch length off by one agrees."""
    full, resumed = BatchOrder(10, 3, seed=5), BatchOrder(10, 3, seed=5, start_step=start_step)
    for step in range(start_step, start_step + 4):
        for got, want in zip(resumed.batch(step), full.batch(step), strict=True):
            assert torch.equal(got, want), step


def test_batch_order_epochs_are_permutations():
    order = BatchOrder(10, 3, seed=0)
    assert order.batches_per_epoch == 3  # the 10th item of each epoch is the dropped partial batch
    epochs = [torch.cat([order.batch(e * 3 + j)[0] for j in range(3)]) for e in range(3)]
    for indices in epochs:
        assert len(set(indices.tolist())) == 9 and indices.min() >= 0 and indices.max() < 10
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_order_streams_of_neighbouring_seeds_do_not_collide():
    """Each (seed, epoch) and (seed, step) seeds its own stream: the seed s + 1 of another run does not replay run s's
    next epoch, nor its flips of the step after."""
    seed = int(torch.randint(0, 2**31, ()))
    order, neighbour = BatchOrder(60, 4, seed=seed), BatchOrder(60, 4, seed=seed + 1)
    assert not torch.equal(order.permutation(1), neighbour.permutation(0))
    flips = [torch.cat([o.batch(s)[1] for s in steps]) for o, steps in ((order, range(1, 40)), (neighbour, range(39)))]
    assert not torch.equal(*flips)


def test_every_stream_tag_seeds_a_64_bit_stream_of_its_own():
    """seeds.py: each tag (permutations, flips, noise, its restart, the fixed z, sampling) of a seed gets its own
    derived 64-bit seed and draws its own numbers; 18 seeds all below 2**32 would have a chance of 2**-576."""
    tags = (seeds.PERMUTATION, seeds.FLIPS, seeds.NOISE_RESTART, seeds.NOISE, seeds.FIXED_Z, seeds.SAMPLING)
    derived = [seeds.derived_seed(seed, tag) for seed in (0, 1, 2**62) for tag in tags]
    assert len(set(derived)) == len(derived)
    assert all(0 <= d < 2**64 for d in derived) and max(derived) >= 2**32
    draws = {tuple(torch.rand(4, generator=seeds.generator(5, tag)).tolist()) for tag in tags}
    assert len(draws) == len(tags)


def test_batch_order_resumed_with_another_global_batch_finishes_its_epoch():
    """4 ranks of batch 2 take 3 global batches of 8 of the 50 items; one process of batch 4 resumed from that
    position takes the rest of the epoch without a repeat (6 batches of 4, items 24 to 47: a seventh would pass its
    end), then whole epochs of its own batch size."""
    four_ranks = [BatchOrder(50, 2, seed=3, rank=r, world_size=4) for r in range(4)]
    taken = [i for step in range(3) for order in four_ranks for i in order.batch(step)[0].tolist()]
    assert four_ranks[0].position(3) == (0, 24)
    one = BatchOrder(50, 4, seed=3, start_step=3, start_position=(0, 24))
    taken += [i for step in range(3, 9) for i in one.batch(step)[0].tolist()]
    assert taken == four_ranks[0].permutation(0)[:48].tolist()  # the epoch's order, every item once
    assert [one.position(step) for step in (8, 9, 10, 21)] == [(0, 44), (1, 0), (1, 4), (2, 0)]
    assert torch.equal(one.batch(9)[0], BatchOrder(50, 4, seed=3).batch(12)[0])  # epoch 1's first batch
    # The same global batch: the position the step gives, so the order is an uninterrupted run's.
    assert BatchOrder(50, 4, seed=3, start_step=20, start_position=(1, 32)).batch(25)[0].tolist() == (
        BatchOrder(50, 4, seed=3).batch(25)[0].tolist()
    )
    assert one.continued_at(8).batch(9)[0].tolist() == one.batch(9)[0].tolist()
    for position in ((0, -4), (0, -1), (-1, 8)):
        with pytest.raises(DataError, match="both >= 0"):
            BatchOrder(50, 4, seed=3, start_position=position)
    # Before the start there is no position to go back to (it would slice the permutation at a negative offset).
    with pytest.raises(ValueError, match="step 2 comes before the start, step 3"):
        one.batch(2)
    with pytest.raises(DataError, match="start_step >= 0, got 4 and -1"):
        BatchOrder(50, 4, seed=3, start_step=-1)


def test_batch_order_resumed_on_a_shrunk_data_set_starts_its_next_epoch_whole():
    """A checkpoint's position past the end of a data set that has since shrunk: the resume goes on with the next
    epoch from its first batch, as an uninterrupted run on the smaller set would, skipping none of it."""
    seed = int(torch.randint(0, 2**31, ()))
    resumed = BatchOrder(40, 4, seed=seed, start_step=17, start_position=(0, 48))  # 48 taken of what were 50 items
    assert [resumed.position(step) for step in (17, 18, 26, 27)] == [(1, 0), (1, 4), (1, 36), (2, 0)]
    fresh = BatchOrder(40, 4, seed=seed)
    assert resumed.batch(17)[0].tolist() == fresh.batch(10)[0].tolist()  # epoch 1's first batch


def test_batch_order_sharding():
    world = 3
    single = BatchOrder(40, 4 * world, seed=5)
    ranks = [BatchOrder(40, 4, seed=5, rank=r, world_size=world) for r in range(world)]
    for step in (0, 2, 6):
        parts = [r.batch(step) for r in ranks]
        indices = torch.cat([p[0] for p in parts])
        assert len(set(indices.tolist())) == 4 * world  # disjoint
        assert torch.equal(indices, single.batch(step)[0])  # together: the global batch
        assert torch.equal(torch.cat([p[1] for p in parts]), single.batch(step)[1])
    assert [r.batches_per_epoch for r in ranks] == [single.batches_per_epoch] * world == [3] * world  # global batches
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchOrder(10, 4, seed=0, world_size=3)
    with pytest.raises(DataError, match="rank"):
        BatchOrder(40, 4, seed=0, rank=3, world_size=3)
    # A data set that --holdout leaves smaller than a batch says so: "the data set has 8 images" read as the file's.
    held_out = DataConfig(builtin_count=20, holdout=12, num_workers=0)
    with pytest.raises(DataError) as refused:
        make_batches(held_out, 16, 16, device="cpu", seed=0)
    assert str(refused.value) == (
        "the data set has 8 training images once --holdout 12 are held out, fewer than one global batch of 16 "
        "(batch 16 x 1 rank)"
    )


# --- loaders ------------------------------------------------------------------------------------------------


def test_torch_loader_batches_and_flips():
    source = BuiltinFaces(20, 16, seed=1)
    flipped = TorchLoader(source, BatchOrder(len(source), 4, seed=2), num_workers=0)
    plain = TorchLoader(source, BatchOrder(len(source), 4, seed=2), flip=False, num_workers=0)
    order = BatchOrder(20, 4, seed=2)
    seen = set()
    for step in range(5):
        x, y = next(flipped), next(plain)
        assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16) and x.device.type == "cpu"
        assert x.min() >= -1 and x.max() <= 1
        indices, flips = order.batch(step)
        assert torch.equal(y, source.as_uint8()[indices].float() / 127.5 - 1)
        for k in range(4):
            assert torch.equal(x[k], torch.flip(y[k], dims=[-1]) if flips[k] else y[k])
            seen.add(bool(flips[k]))
    assert seen == {True, False}
    resumed = TorchLoader(source, BatchOrder(len(source), 4, seed=2, start_step=3), flip=False, num_workers=0)
    replay = TorchLoader(source, BatchOrder(len(source), 4, seed=2), flip=False, num_workers=0)
    expected = [next(replay) for _ in range(4)][3]
    assert torch.equal(next(resumed), expected)
    assert "torch DataLoader" in plain.describe() and "builtin" in plain.describe()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_leaves_the_torch_loaders_workers_to_the_training_loop(signum):
    """Ctrl-C reaches the whole process group, a scheduler's SIGTERM every process of the job: the workers go on
    (the training loop finishes its step and writes its checkpoint) instead of dying, which would make the loader
    raise in the middle of the step or of the checkpoint's write."""
    source = BuiltinFaces(16, 16, seed=0)
    before = set(multiprocessing.active_children())
    loader, reference = (
        TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=2),
        TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=0),
    )
    for _ in range(2):  # one batch from each worker: both have started
        assert torch.equal(next(loader), next(reference))
    workers = [child for child in multiprocessing.active_children() if child not in before]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    for _ in range(6):
        assert torch.equal(next(loader), next(reference))


def test_close_ends_the_torch_loaders_workers_even_one_that_does_not_answer():
    """The workers ignore SIGTERM (above), so close() cannot leave a stuck one to the terminate() that PyTorch's
    shutdown falls back on: one stopped (SIGSTOP) is killed."""
    source = BuiltinFaces(16, 16, seed=0)
    before = set(multiprocessing.active_children())
    loader = TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=2)
    next(loader)
    workers = [child for child in multiprocessing.active_children() if child not in before]
    os.kill(workers[0].pid, signal.SIGSTOP)
    closing = threading.Thread(target=loader.close, daemon=True)  # on a failure, the test ends all the same
    closing.start()
    closing.join(timeout=60)
    for worker in workers:
        if closing.is_alive():
            worker.kill()
    assert not closing.is_alive() and not any(worker.is_alive() for worker in workers)
    assert workers[0].exitcode == -signal.SIGKILL and workers[1].exitcode == 0  # the other ended in order
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_a_torch_loader_dropped_without_close_ends_its_workers():
    """The loaders left open are tracked for the interpreter's exit without being held: one that is dropped (a
    train() call that returned, in a notebook or a sweep of runs in one process) ends its workers then, as PyTorch's
    iterator does when it goes, rather than leaving them decoding for nothing until the process exits."""
    source = BuiltinFaces(16, 16, seed=0)
    before = set(multiprocessing.active_children())
    loader = TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=2)
    next(loader)
    workers = [child for child in multiprocessing.active_children() if child not in before]
    assert len(workers) == 2
    del loader
    gc.collect()
    for worker in workers:
        worker.join(timeout=10)
    assert [worker.exitcode for worker in workers] == [0, 0]  # ended in order, not killed


@pytest.mark.parametrize("ending", ["done", "uncaught-error"])
def test_a_process_ends_with_a_torch_loader_it_left_open(ending):
    """At the exit of a process that still holds a loader (a module global; the frames of an uncaught error),
    multiprocessing terminates the workers with SIGTERM, which they ignore, and waits for them: the loader is closed
    before that, so the process ends instead of hanging."""
    program = f"""
import torch
from began_fast.data import BatchOrder, TorchLoader
from began_fast.data.builtin import BuiltinFaces
source = BuiltinFaces(16, 16, seed=0)
loader = TorchLoader(source, BatchOrder(len(source), 4, seed=0), num_workers=2)
assert torch.isfinite(next(loader)).all()
if {ending!r} == "uncaught-error":
    raise ValueError("a bug")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stderr.strip().splitlines()[-1:]) == (
        (0, []) if ending == "done" else (1, ["ValueError: a bug"])
    ), done.stderr


@pytest.mark.parametrize(
    ("cores", "ranks_here", "workers"), [(16, None, 8), (16, "2", 8), (16, "8", 2), (4, "8", 1), (3, "1", 3)]
)
def test_default_decoding_workers_are_the_ranks_share_of_the_cores(monkeypatch, cores, ranks_here, workers):
    """8 ranks on a 16-core machine start 2 workers (or DALI threads) each, not 8 each."""
    monkeypatch.setattr("began_fast.distributed.machine_cores", lambda: cores)
    if ranks_here is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    assert default_workers("folder") == default_workers("hdf5") == workers
    assert default_workers("builtin") == 0


def test_torch_loader_workers_read_hdf5(tmp_path):
    path = write_h5(tmp_path / "faces.h5", draw_faces(12, 16, seed=6))
    source = open_source(DataConfig(path=str(path)), 16)
    with_workers = TorchLoader(source, BatchOrder(len(source), 3, seed=1), num_workers=2)
    in_process = TorchLoader(source, BatchOrder(len(source), 3, seed=1), num_workers=0)
    for _ in range(5):
        assert torch.equal(next(with_workers), next(in_process))


def test_gpu_resident_set_on_cpu():
    source = BuiltinFaces(8, 16, seed=3)
    images = GpuResidentSet(source, "cpu")
    assert images.images.shape == (8, 3, 16, 16) and images.images.dtype == torch.uint8
    indices, flips = torch.tensor([5, 0, 5, 7]), torch.tensor([True, False, False, True])
    out = torch.full((4, 3, 16, 16), 7.0)
    images.gather_into(out, indices, flips)
    originals = source.as_uint8().float() / 127.5 - 1
    expected = torch.where(flips[:, None, None, None], originals[indices].flip(-1), originals[indices])
    assert torch.equal(out, expected) and not torch.equal(out[0], out[2])  # image 5, mirrored and not

    nhwc = GpuResidentSet(source.as_uint8().permute(0, 2, 3, 1).numpy(), "cpu")
    assert torch.equal(nhwc.images, source.as_uint8())
    with pytest.raises(DataError, match="uint8"):
        GpuResidentSet(torch.rand(2, 3, 8, 8), "cpu")
    assert fits(10, 32, "cpu") and not fits(10**12, 256, "cpu")


def test_gpu_resident_set_of_a_plain_dataset_and_a_stream_without_flips():
    """A source without as_uint8 (an image folder) is stacked item by item, every item; a run with flips off
    (DataConfig.flip False) gets its images unmirrored, whatever BatchOrder's flips say; an empty set is refused."""
    pixels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(pixels)

        def __getitem__(self, index):
            return pixels[index]

    images = GpuResidentSet(Items(), "cpu")
    assert torch.equal(images.images, pixels)
    stream, order = GpuResidentStream(images, BatchOrder(6, 2, seed=3), flip=False), BatchOrder(6, 2, seed=3)
    flipped = 0
    for step in range(9):
        indices, flips = order.batch(step)
        flipped += int(flips.sum())
        assert torch.equal(next(stream), pixels[indices].float() / 127.5 - 1)
    assert flipped > 0  # the order's flips were there to ignore
    with pytest.raises(DataError, match="non-empty set of square images"):
        GpuResidentSet(torch.empty(0, 3, 16, 16, dtype=torch.uint8), "cpu")
    for shape in [(2, 3, 16, 12), (2, 12, 16, 3)]:  # NCHW and NHWC, 12 wide and 16 high
        with pytest.raises(DataError, match="non-empty set of square images"):
            GpuResidentSet(torch.randint(0, 256, shape, dtype=torch.uint8), "cpu")


def test_gpu_resident_images_may_take_half_the_free_memory(monkeypatch):
    """On the CPU the free memory is the available pages: 1000 of 4 KiB, half of it 2,048,000 bytes, 2666 images of
    16 x 16 x 3 bytes and not 2667."""
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert fits(2666, 16, "cpu") and not fits(2667, 16, "cpu")
    pages["SC_AVPHYS_PAGES"] = 3  # half of it 6144 bytes: exactly 8 images, which fit
    assert fits(8, 16, "cpu") and not fits(9, 16, "cpu")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_gpu_resident_stream_gives_the_torch_loaders_batches(world_size):
    """Each rank's batches are, byte for byte, the torch loader's for that rank (BatchOrder's epochs and flips),
    across an epoch's end, so world_size ranks of batch B share each global batch of one process of batch
    world_size*B; a stream started later (a resume) goes on alike, and stage() then sample_into() (a CUDA graph's
    replay) gathers what next() gives."""
    source = BuiltinFaces(29, 16, seed=4)
    images = GpuResidentSet(source, "cpu")
    streams = [
        GpuResidentStream(images, BatchOrder(len(images), 4, seed=9, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    loaders = [
        TorchLoader(source, BatchOrder(len(source), 4, seed=9, rank=r, world_size=world_size), num_workers=0)
        for r in range(world_size)
    ]
    one = GpuResidentStream(images, BatchOrder(len(images), 4 * world_size, seed=9))
    steps = 2 * (29 // (4 * world_size)) + 1  # into a third epoch
    batches = [[next(stream) for stream in streams] for _ in range(steps)]
    for shards in batches:
        assert all(torch.equal(shard, next(loader)) for shard, loader in zip(shards, loaders, strict=True))
        assert torch.equal(torch.cat(shards), next(one))
    resumed = GpuResidentStream(
        images, BatchOrder(len(images), 4, seed=9, start_step=steps - 2, rank=world_size - 1, world_size=world_size)
    )
    assert torch.equal(next(resumed), batches[-2][-1]) and torch.equal(next(resumed), batches[-1][-1])
    replayed, out = (
        GpuResidentStream(images, BatchOrder(len(images), 4, seed=9, world_size=world_size)),
        torch.empty(4, 3, 16, 16),
    )
    for shards in batches[:3]:
        replayed.stage()
        replayed.sample_into(out)
        assert torch.equal(out, shards[0])
    assert one.describe().startswith("cpu-side gather (batch") and "over cpu-resident uint8" in one.describe()
    assert "share" not in one.describe()  # one process: no rank's share to name
    if world_size > 1:
        assert "rank 1's share of a" in streams[1].describe()


def test_a_loader_refuses_an_order_over_another_number_of_images():
    """An order drawn for another data set would skip some of its images or index past its end."""
    source = BuiltinFaces(12, 16, seed=0)
    for make in (
        lambda order: TorchLoader(source, order),
        lambda order: GpuResidentStream(GpuResidentSet(source, "cpu"), order),
    ):
        with pytest.raises(DataError, match="order is over 13 items, the loader's data set has 12"):
            make(BatchOrder(13, 4, seed=0))


def test_make_batches_picks_the_loader(monkeypatch):
    cfg = DataConfig(builtin_count=16, num_workers=0)
    auto = make_batches(cfg, 16, 4, device="cpu", seed=0)
    assert isinstance(auto, TorchLoader) and next(auto).shape == (4, 3, 16, 16)
    gpu = make_batches(DataConfig(builtin_count=16, loader="gpu"), 16, 4, device="cpu", seed=0)
    x = next(gpu)
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and "resident" in gpu.describe()
    monkeypatch.setattr("began_fast.data.fits", lambda num_images, image_size, device: num_images < 16)
    with pytest.raises(DataError, match=r"--loader gpu: the 16 images need 0\.0 GiB, more than 50% of the free"):
        make_batches(DataConfig(builtin_count=16, loader="gpu"), 16, 4, device="cpu", seed=0)
    with pytest.raises(DataError, match=r"--loader gpu: the 2097152 images need 1\.5 GiB, more than 50% of the free"):
        make_batches(DataConfig(builtin_count=2**21, loader="gpu"), 16, 4, device="cpu", seed=0)  # 768 bytes each
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs NVIDIA DALI"):
            make_batches(DataConfig(loader="dali"), 16, 4, device="cpu", seed=0)


def test_auto_loader_on_cuda_asks_once_whether_the_images_fit(monkeypatch):
    """--loader auto on a GPU keeps the built-in and HDF5 sources in device memory when they fit, and reads the free
    memory once to decide (no GPU here: the resident set and the memory reading are stand-ins)."""
    readings = []
    monkeypatch.setattr("began_fast.data.GpuResidentSet", lambda source, device: ("resident", len(source), device))
    monkeypatch.setattr("began_fast.data.GpuResidentStream", lambda images, order, flip: images)
    for room, expected in [(True, ("resident", 16, torch.device("cuda"))), (False, TorchLoader)]:
        readings.clear()
        monkeypatch.setattr(
            "began_fast.data.fits", lambda num_images, image_size, device, room=room: readings.append(1) or room
        )
        monkeypatch.setattr("began_fast.data.TorchLoader", lambda source, order, **kwargs: TorchLoader)
        batches = make_batches(DataConfig(builtin_count=16), 16, 4, device="cuda", seed=0)
        assert batches == expected and len(readings) == 1


def test_auto_loader_chooses_by_device_source_and_dali(monkeypatch, tmp_path, celeba_root):
    """--loader auto: DALI for CelebA and image folders on a GPU when it is installed, the GPU-resident set for
    HDF5 files and the built-in faces on a GPU when they fit, the torch loader otherwise; an explicit --loader is
    taken as given. The loader gets the run's device, workers and order (no GPU here, and DALI may be missing: the
    loaders, the memory reading and DALI's presence are stand-ins)."""
    rng = np.random.default_rng()
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    h5 = write_h5(tmp_path / "faces.h5", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    installed, room = [True], [True]
    monkeypatch.setattr("began_fast.data.dali_installed", lambda: installed[0])
    monkeypatch.setattr("began_fast.data.fits", lambda num_images, image_size, device: room[0])
    monkeypatch.setattr("began_fast.data.GpuResidentSet", lambda source, device: device)
    monkeypatch.setattr("began_fast.data.GpuResidentStream", lambda device, order, flip: ("gpu", device, order))
    monkeypatch.setattr(
        "began_fast.data.TorchLoader",
        lambda source, order, flip, num_workers, device: ("torch", device, order, num_workers),
    )
    fake_dali = type(sys)("began_fast.data.dali")
    fake_dali.DaliLoader = lambda cfg, image_size, source, order, device: ("dali", device, order)
    monkeypatch.setitem(sys.modules, "began_fast.data.dali", fake_dali)
    cases = [  # (data settings, device, DALI installed, the images fit) -> loader
        (dict(path=str(folder)), "cuda", True, True, "dali"),
        (dict(path=str(folder), source="folder"), "cuda", True, True, "dali"),
        (dict(path=str(celeba_root), source="celeba"), "cuda:1", True, True, "dali"),
        (dict(path=str(celeba_root)), "cuda", True, True, "dali"),
        (dict(path=str(folder)), "cpu", True, True, "torch"),
        (dict(path=str(folder)), "cuda", False, True, "torch"),
        (dict(path=str(folder), loader="dali"), "cpu", True, True, "dali"),
        (dict(path=str(folder), loader="torch"), "cuda", True, True, "torch"),
        (dict(path=str(h5)), "cuda", True, True, "gpu"),
        (dict(path=str(h5)), "cuda", True, False, "torch"),
        (dict(path=str(h5)), "cpu", True, True, "torch"),
        (dict(builtin_count=6), "cuda", False, True, "gpu"),
        (dict(builtin_count=6), "cuda", True, False, "torch"),
    ]
    for settings, device, installed[0], room[0], expected in cases:
        cfg = DataConfig(num_workers=3, **settings)
        chosen = make_batches(
            cfg, 16, 2, device=device, seed=5, start_step=3, start_position=(0, 2), rank=1, world_size=2
        )
        assert chosen[:2] == (expected, torch.device(device)), (settings, device, installed[0], room[0])
        order = chosen[2]
        assert (order.start_step, order.start_position, order.rank, order.world_size) == (3, (0, 2), 1, 2)
        assert chosen[3:] == ((3,) if expected == "torch" else ())


@pytest.mark.parametrize("loader", ["torch", "gpu"])
def test_make_batches_reads_the_ranks_share_from_the_resumed_position_unmirrored_without_flips(loader):
    """make_batches hands the loader the run's rank, start step, data position (a resume on another number of
    ranks goes on from it, not from the step's place) and flip setting: with --no-flip no image is mirrored."""
    seed = int(torch.randint(0, 2**31, ()))
    cfg = DataConfig(builtin_count=14, builtin_seed=seed, flip=False, loader=loader, num_workers=0)
    batches = make_batches(
        cfg, 16, 2, device="cpu", seed=seed, start_step=3, start_position=(0, 8), rank=1, world_size=2
    )
    images = open_source(cfg, 16).as_uint8().float() / 127.5 - 1
    order = BatchOrder(14, 2, seed, 3, start_position=(0, 8), rank=1, world_size=2)
    flipped = 0
    for step in range(3, 10):  # into the next epoch: (0, 8) leaves one global batch of 4 in epoch 0
        indices, flips = order.batch(step)
        flipped += int(flips.sum())
        assert torch.equal(next(batches), images[indices]), f"step {step}"
    assert flipped > 0  # the order's flips were there to ignore


# --- held-out images ------------------------------------------------------------------------------------------


@pytest.fixture(params=["folder", "hdf5"])
def numbered_source(request, tmp_path) -> tuple[str, torch.Tensor]:
    """(path, images): ten random 16 px images as PNG files 000.png ... 009.png or as HDF5 rows, in that order;
    images is (10, 3, 16, 16) uint8."""
    images = np.random.default_rng(3).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    if request.param == "hdf5":
        path = str(write_h5(tmp_path / "images.h5", images))
    else:
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
        path = str(tmp_path)
    return path, torch.from_numpy(images).permute(0, 3, 1, 2)


def test_holdout_keeps_the_last_images_out_of_training(numbered_source):
    path, images = numbered_source
    training = open_source(DataConfig(path=path, holdout=3), 16)
    assert len(training) == 7 and "the last 3 held out" in training.describe()
    # DALI's readers take the file list: the held-out files are not in the training set's (an HDF5 file has none).
    assert training.files == open_source(DataConfig(path=path), 16).files[:7]
    assert torch.equal(torch.stack([training[i] for i in range(7)]), images[:7])
    assert torch.equal(training.as_uint8(), images[:7])  # what the GPU-resident set reads
    with pytest.raises(IndexError):
        training[7]
    assert torch.equal(pickle.loads(pickle.dumps(training))[6], images[6])  # as spawned DataLoader workers get it
    with pytest.raises(AttributeError):  # what Python 3.10's pickle reads (3.11's finds object.__getstate__ first)
        training.__getattr__("__getstate__")
    # The loader reads only the training images: one batch of 7 is an epoch.
    batch = next(TorchLoader(training, BatchOrder(len(training), 7, seed=0), flip=False, num_workers=0))
    read = ((batch + 1) * 127.5).round().to(torch.uint8)
    assert sorted(map(bytes, read.flatten(1).numpy())) == sorted(map(bytes, images[:7].flatten(1).numpy()))
    assert torch.equal(held_out_images(training, 5), images[7:])  # all three held out, fewer than asked for
    assert torch.equal(held_out_images(training, 2), images[7:9])
    assert held_out_images(open_source(DataConfig(path=path), 16), 4) is None  # nothing held out
    with pytest.raises(DataError, match="--holdout 10 must leave training images: the data set holds 10"):
        open_source(DataConfig(path=path, holdout=10), 16)


def test_a_broken_image_is_replaced_within_its_own_side_of_the_holdout(tmp_path):
    """6 files, the last 2 held out; the last training file and the last held-out file break after the scan: each
    is replaced by the first image of its own range, never by one from the other side."""
    paths = write_celeba_like(tmp_path / "faces", 6, seed=2)
    whole = open_source(DataConfig(path=str(tmp_path / "faces")), 16)
    expected = [whole[i] for i in range(6)]
    training = open_source(DataConfig(path=str(tmp_path / "faces"), holdout=2), 16)
    os.remove(paths[3])
    os.remove(paths[5])
    with pytest.warns(UserWarning, match="cannot decode"):
        assert torch.equal(training[3], expected[0])
    with pytest.warns(UserWarning, match="cannot decode"):
        held_out = held_out_images(training, 2)
    assert torch.equal(held_out[0], expected[4]) and torch.equal(held_out[1], expected[4])


def test_builtin_faces_after_the_training_set_are_held_out():
    training = open_source(DataConfig(builtin_count=12, builtin_seed=3), 16)
    assert torch.equal(held_out_images(training, 4), BuiltinFaces(16, 16, 3).images[12:])
    fewer = open_source(DataConfig(builtin_count=12, builtin_seed=3, holdout=2), 16)
    assert len(fewer) == 10 and torch.equal(held_out_images(fewer, 4), BuiltinFaces(14, 16, 3).images[10:])
    assert "faces 12 to 15" in BuiltinFaces(4, 16, 3, first=12).describe()
    # A set that starts further on (through the Python API): its held-out faces are those after its own last face.
    later = BuiltinFaces(5, 16, 3, first=20)
    assert torch.equal(held_out_images(later, 3), BuiltinFaces(28, 16, 3).images[25:])
    with pytest.raises(DataError, match="--holdout 12 must leave training images"):
        open_source(DataConfig(builtin_count=12, holdout=12), 16)


# --- scripts/prepare_celeba.py ------------------------------------------------------------------------------


def run_prepare(*args) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "prepare_celeba.py"
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)  # a hang fails, not stalls


def test_prepare_celeba_end_to_end(tmp_path, celeba_root, mixed_folder):
    out = tmp_path / "celeba32.h5"
    done = run_prepare(celeba_root, out, "--size", 32, "--workers", 2)
    assert done.returncode == 0, done.stderr
    prepared = open_source(DataConfig(path=str(out)), 32)
    folder = open_source(DataConfig(path=str(celeba_root)), 32)
    assert prepared.kind == "hdf5" and torch.equal(prepared.as_uint8(), torch.stack(list(folder)))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    mixed_out = tmp_path / "mixed.h5"
    done = run_prepare(mixed_folder, mixed_out, "--size", 16, "--workers", 1)
    assert done.returncode == 0, done.stderr
    assert "skipped 3 of 7" in done.stderr and len(open_source(DataConfig(path=str(mixed_out)), 16)) == 4


def test_prepare_celeba_replaces_an_existing_file_only_when_told(tmp_path, celeba_root):
    out = tmp_path / "celeba16.h5"
    out.write_bytes(b"an earlier data set")
    done = run_prepare(celeba_root, out, "--size", 16, "--workers", 1)
    assert (
        done.returncode == 2
        and done.stderr == f"error: {out} already exists; give --overwrite to replace it, or choose another output\n"
    )
    assert out.read_bytes() == b"an earlier data set"
    assert run_prepare(celeba_root, out, "--size", 16, "--workers", 1, "--overwrite").returncode == 0
    assert len(open_source(DataConfig(path=str(out)), 16)) == CELEBA_COUNT


def test_prepare_celeba_refuses_an_output_it_cannot_write_before_opening_the_folder(tmp_path, celeba_root, monkeypatch):
    """Opening the folder reads every file's header (a minute for CelebA's 202,599): an output that cannot be written
    is said first, not after that minute."""
    prepare_celeba = load_script("prepare_celeba")
    opened = []
    monkeypatch.setattr(prepare_celeba, "open_source", lambda *args: opened.append(args))
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "celeba16.h5"
    args = prepare_celeba.parse_args([str(celeba_root), str(out), "--size", "16", "--workers", "1"])
    with pytest.raises(ConfigError, match=f"^the output {re.escape(str(out))}: .*a_file is a file, not a folder$"):
        prepare_celeba.prepare(args)
    assert opened == []
    # An output in folders yet to be made, from a source then refused: none are made.
    monkeypatch.undo()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    args = prepare_celeba.parse_args([str(tmp_path / "notes"), str(tmp_path / "new" / "sub" / "x.h5"), "--size", "16"])
    with pytest.raises(DataError, match="no images"):
        prepare_celeba.prepare(args)
    assert not (tmp_path / "new").exists()


def test_prepare_celeba_syncs_before_renaming_and_removes_a_killed_runs_temporary(tmp_path, celeba_root, monkeypatch):
    prepare_celeba = load_script("prepare_celeba")
    out = tmp_path / "celeba16.h5"
    killed = subprocess.Popen([sys.executable, "-c", ""])
    killed.wait()
    stale = tmp_path / f".celeba16.h5.{killed.pid}.tmp"  # its writer is gone
    running = tmp_path / f".celeba16.h5.{os.getppid()}.tmp"  # another process still writing the same file
    for temporary in (stale, running):
        temporary.write_bytes(b"half an HDF5 file")
    events = []
    fsync, replace = os.fsync, os.replace
    synced = lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))  # noqa: E731
    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b)))
    args = prepare_celeba.parse_args([str(celeba_root), str(out), "--size", "16", "--workers", "1"])
    assert prepare_celeba.prepare(args) == (CELEBA_COUNT, 0)
    ours = str(tmp_path / f".celeba16.h5.{os.getpid()}.tmp")
    # The data reaches the disk before the new name does, and the name before the function returns.
    assert events == [("fsync", ours), ("replace", ours, str(out)), ("fsync", str(tmp_path))]
    assert not stale.exists() and running.exists() and len(open_source(DataConfig(path=str(out)), 16)) == CELEBA_COUNT


def _said(capsys) -> list[str]:
    """prepare_celeba's lines on stderr, less Python 3.12's warning of a fork() in a process with threads, as
    pytest's is by now (a command line's is not)."""
    return [line for line in capsys.readouterr().err.splitlines() if "is multi-threaded, use of fork()" not in line]


def test_prepare_celeba_stops_on_a_signal_with_one_line_and_keeps_the_earlier_file(
    tmp_path, celeba_root, monkeypatch, capsys, sigterm_recorded
):
    """SIGTERM (`timeout`, a scheduler) ends it as Ctrl-C does: one line, status 143, the earlier file as it was, no
    temporary file. It ended at once, silently, its temporary file left behind and its workers' tracebacks printed;
    here the signal comes while the images are written (the workers' part: they end with the pool)."""
    prepare_celeba = load_script("prepare_celeba")
    out = tmp_path / "faces.h5"
    out.write_bytes(b"an earlier data set")

    def progress_then_sigterm(images, **kwargs):
        for i, image in enumerate(images):
            if i == 2:
                signal.raise_signal(signal.SIGTERM)
            yield image

    monkeypatch.setattr(prepare_celeba, "tqdm", progress_then_sigterm)
    args = [str(celeba_root), str(out), "--size", "16", "--workers", "1", "--overwrite"]
    assert prepare_celeba.main(args) == 143
    assert _said(capsys) == [f"error: stopped by SIGTERM; {out} left as it was"]
    assert out.read_bytes() == b"an earlier data set" and sorted(p.name for p in tmp_path.iterdir()) == ["faces.h5"]
    assert sigterm_recorded == []


@pytest.mark.parametrize("after", [2, CELEBA_COUNT], ids=["a-few-images", "all-images"])
def test_prepare_celeba_stops_at_a_signal_that_a_finalizer_dropped(
    tmp_path, celeba_root, monkeypatch, capsys, sigterm_recorded, after
):
    """A SIGTERM (or Ctrl-C) that Python dropped in a finalizer (h5py's objects free themselves in them) stops the
    prepare at the next image, not after decoding the whole folder, and before the earlier file is replaced (it was,
    with status 0): one line, status 143, the earlier file as it was, no temporary file."""
    prepare_celeba = load_script("prepare_celeba")
    out = tmp_path / "faces.h5"
    out.write_bytes(b"an earlier data set")
    yielded = []

    def progress_then_a_dropped_sigterm(images, **kwargs):
        for image in images:
            yielded.append(image)
            yield image
            if len(yielded) == after:  # the image is written
                dropped_by_a_finalizer(signal.SIGTERM)

    monkeypatch.setattr(prepare_celeba, "tqdm", progress_then_a_dropped_sigterm)
    args = [str(celeba_root), str(out), "--size", "16", "--workers", "1", "--overwrite"]
    assert prepare_celeba.main(args) == 143
    assert _said(capsys) == [f"error: stopped by SIGTERM; {out} left as it was"]
    assert len(yielded) == min(after + 1, CELEBA_COUNT) and sigterm_recorded == []
    assert out.read_bytes() == b"an earlier data set" and sorted(p.name for p in tmp_path.iterdir()) == ["faces.h5"]


# h5py's errors for a full disk name the temporary file, with a time stamp, a C buffer's address and offsets.
H5PY_FULL_DISK = (
    "(file write failed: time = Thu Jan  1 00:00:00 2026, filename = '/data/.faces.h5.4242.tmp', file descriptor = 5, "
    "errno = 28, error message = 'No space left on device', buf = 0x55d0c3a0, total write size = 4096, bytes this "
    "sub-write = 4096, bytes already written = 0, file offset = 8192)"
)


@pytest.mark.parametrize("failing", ["create", "flush", "close"])
def test_prepare_celeba_names_the_output_in_one_line_when_h5py_cannot_write(
    tmp_path, celeba_root, monkeypatch, capsys, failing
):
    """A full disk when h5py creates the file (an OSError), or flushes or closes it (a RuntimeError without an errno,
    the reason only in its text), ends with one line naming the output and the system's reason, status 2, the
    earlier file as it was and no temporary file: not h5py's message about the temporary file, nor a traceback."""
    prepare_celeba = load_script("prepare_celeba")
    out = tmp_path / "faces.h5"
    out.write_bytes(b"an earlier data set")
    if failing == "create":
        error = OSError(errno.ENOSPC, f"Unable to synchronously create file {H5PY_FULL_DISK}")
        monkeypatch.setattr(h5py, "File", lambda *args, **kwargs: (_ for _ in ()).throw(error))
    elif failing == "flush":
        error = RuntimeError(f"Unable to synchronously flush file {H5PY_FULL_DISK}")
        monkeypatch.setattr(h5py.File, "flush", lambda file: (_ for _ in ()).throw(error))
    else:
        close, error = h5py.File.close, RuntimeError(f"Can't decrement id ref count {H5PY_FULL_DISK}")
        monkeypatch.setattr(h5py.File, "close", lambda file: (close(file), (_ for _ in ()).throw(error)))
    monkeypatch.setattr(prepare_celeba, "tqdm", lambda images, **kwargs: images)  # no progress bar on stderr
    args = [str(celeba_root), str(out), "--size", "16", "--workers", "1", "--overwrite"]
    assert prepare_celeba.main(args) == 2
    when = f" after {CELEBA_COUNT} of {CELEBA_COUNT} images" if failing == "flush" else ""
    assert _said(capsys) == [f"error: [Errno 28] cannot write {out}{when}: No space left on device"]
    assert out.read_bytes() == b"an earlier data set" and sorted(p.name for p in tmp_path.iterdir()) == ["faces.h5"]


def _stop_signal_handlers() -> list:
    return [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]


def test_prepare_celeba_workers_leave_stop_signals_to_the_main_process():
    """Ctrl-C reaches the whole process group, a scheduler's SIGTERM every process of the job: the decoding workers
    ignore both, and the main process ends the pool in order and says its one line. A worker they killed printed a
    traceback, and one killed while it sent its result kept the result queue's lock: the pool hung."""
    prepare_celeba = load_script("prepare_celeba")
    pool = multiprocessing.Pool(1, prepare_celeba._init_worker, (16, "center", None, frozenset()))
    try:
        assert pool.apply(_stop_signal_handlers) == [signal.SIG_IGN, signal.SIG_IGN]
    finally:
        pool.close()
        pool.join()


def test_prepare_celeba_queues_two_windows_of_files_at_a_time():
    """The files go to the pool a window at a time, the next queued while this one is written: the workers do not
    wait for the writer, and a prepare that stops early (a full disk, a stop signal) waits, as it ends its pool,
    for at most two windows' decoding, not for the whole folder's (an hour of CelebA)."""
    prepare_celeba = load_script("prepare_celeba")

    class Pool:
        queued: list[str] = []

        def imap(self, decode, files, chunksize):
            assert decode is prepare_celeba._decode and chunksize == 2
            self.queued = [*self.queued, *files]
            return iter(files)

    pool, files, read = Pool(), [f"{i:02d}.png" for i in range(10)], []
    for name in prepare_celeba._decoded(pool, files, chunk=2, window=3):
        read.append(name)
        assert len(pool.queued) == min(len(files), 3 * ((len(read) - 1) // 3 + 2)), read
    assert read == files == pool.queued


@pytest.mark.parametrize(
    "ending, status, what",
    [("done", 0, None), ("stopped", 143, "stopped by SIGTERM"), ("stopped-as-the-pool-ends", 130, "interrupted")],
)
def test_prepare_celeba_ends_its_pool_in_order_holding_stop_signals(
    tmp_path, celeba_root, monkeypatch, capsys, sigterm_recorded, ending, status, what
):
    """The pool is closed and joined (the workers decode what is queued and exit), with stop signals held meanwhile,
    before the `with`'s terminate, which then finds no worker; on success, after a stop, and with a Ctrl-C as the
    pool ends. terminate holds the task queue's lock and ends the workers with SIGTERM, which they ignore: a worker
    yet to read its end then waits for ever, and the prepare with it (every prepare on Python 3.12; 1 of 5 on 3.11
    with a Ctrl-C as the pool ended, where close raised it and join was skipped). Here a terminate out of turn ends
    the pool in order first, so that the test fails and does not hang."""
    prepare_celeba = load_script("prepare_celeba")
    out, calls = tmp_path / "faces.h5", []
    out.write_bytes(b"an earlier data set")
    close, join, terminate = (getattr(multiprocessing.pool.Pool, name) for name in ("close", "join", "terminate"))

    def recorded_close(pool):
        calls.append("close")
        close(pool)
        if ending == "stopped-as-the-pool-ends":
            signal.raise_signal(signal.SIGINT)

    def recorded_terminate(pool):
        calls.append("terminate")
        if calls != ["close", "join", "terminate"]:
            close(pool)
            join(pool)
        terminate(pool)

    def progress_then_sigterm(images, **kwargs):
        for i, image in enumerate(images):
            if i == 2 and ending == "stopped":
                signal.raise_signal(signal.SIGTERM)
            yield image

    monkeypatch.setattr(multiprocessing.pool.Pool, "close", recorded_close)
    monkeypatch.setattr(multiprocessing.pool.Pool, "join", lambda pool: calls.append("join") or join(pool))
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", recorded_terminate)
    monkeypatch.setattr(prepare_celeba, "tqdm", progress_then_sigterm)
    args = [str(celeba_root), str(out), "--size", "16", "--workers", "2", "--overwrite"]
    assert prepare_celeba.main(args) == status
    assert calls == ["close", "join", "terminate"] and sigterm_recorded == []
    if what is None:
        assert len(open_source(DataConfig(path=str(out)), 16)) == CELEBA_COUNT
    else:
        assert _said(capsys) == [f"error: {what}; {out} left as it was"]
        assert out.read_bytes() == b"an earlier data set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.h5"]


def test_prepare_celeba_on_a_full_disk_ends_with_one_line_and_keeps_the_earlier_file(tmp_path):
    """A write that fails (here past the file size limit, EFBIG; a full disk's ENOSPC takes the same way) ends with
    one line naming the output, and status 2; the earlier file stays, and no temporary file. HDF5 crashed the
    process (status -11, after h5py's tracebacks) when it freed the objects of a file it could not write."""
    images = tmp_path / "images"
    images.mkdir()
    for i, face in enumerate(draw_faces(40, 64, seed=0)):
        Image.fromarray(face).save(images / f"{i:02d}.png")
    out = tmp_path / "faces.h5"
    out.write_bytes(b"an earlier data set")

    # The limit set in a process that then becomes the script (exec keeps both), not by preexec_fn: that can hang
    # the fork of a process with threads, as pytest's is by now. 40 images of 64 px: 490 kB.
    limited = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", limited, sys.executable, str(ROOT / "scripts" / "prepare_celeba.py")]
    command += [str(images), str(out), "--size", "64", "--workers", "1", "--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    said = done.stderr.strip().splitlines()[-1]
    expected = f"error: \\[Errno 27\\] cannot write {re.escape(str(out))} after \\d+ of 40 images: File too large"
    assert re.fullmatch(expected, said), said
    assert out.read_bytes() == b"an earlier data set" and sorted(p.name for p in tmp_path.iterdir()) == [
        "faces.h5",
        "images",
    ]


def test_prepare_celeba_ends_with_its_error_after_the_warnings_of_files_it_skipped(celeba_root, tmp_path, capsys):
    """Files it could not decode, then a failure (here a full disk on the third image written): the skipped files'
    warning comes first, and the last line is the error that says why it stopped."""
    prepare_celeba = load_script("prepare_celeba")
    root = shutil.copytree(celeba_root, tmp_path / "celeba")  # the module's folder stays whole for the other tests
    names = sorted(root.rglob("*.jpg"))
    names[0].write_bytes(names[0].read_bytes()[:200])  # cut short: skipped with a warning
    writes = []

    def full_disk_on_the_third(images, **kwargs):
        for image in images:
            writes.append(image)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield image

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_celeba, "tqdm", full_disk_on_the_third)
        status = prepare_celeba.main([str(root), str(tmp_path / "faces.h5"), "--size", "16", "--workers", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines[-1].startswith("error: ") and "No space left on device" in lines[-1], lines
    assert any(line.startswith("warning: ") and "could not be decoded" in line for line in lines[:-1]), lines


def test_prepare_celeba_workers_count_the_cores_this_process_may_run_on(tmp_path, celeba_root, monkeypatch, capsys):
    """Under taskset or a scheduler's CPU affinity the default --workers and its cap (4 per core) count the cores
    the process may run on, as train.py's do: they counted the machine's (os.cpu_count()), so a job given 1 core of
    64 started 64 decoding processes on it."""
    prepare_celeba = load_script("prepare_celeba")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert prepare_celeba.parse_args([str(celeba_root), str(tmp_path / "x.h5")]).workers == 1
    assert prepare_celeba.main([str(celeba_root), str(tmp_path / "x.h5"), "--workers", "5"]) == 2
    assert capsys.readouterr().err == "error: --workers must be in [1, 4] (4 per core), got 5\n"
    assert not (tmp_path / "x.h5").exists()


def test_workers_are_capped_by_the_ranks_share_of_the_machines_cores(monkeypatch):
    """Each torchrun rank starts its own --workers: the cap counted the machine's cores for every rank, so 8 ranks on
    16 cores could start 512 decoding processes (found by a torchrun data-audit helper)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_workers(8, fewest=0)
    with pytest.raises(ConfigError) as refused:
        check_workers(9, fewest=0)
    assert str(refused.value) == (
        "--workers must be in [0, 8] (4 per core of this rank's 2, its share of the 4 it may run on), got 9"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_workers(16, fewest=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "{tmp}/x.h5"], "does not exist"),
        (["{celeba}", "{tmp}/x.txt"], "must be an .h5 or .hdf5 file"),
        (["{celeba}", "{tmp}/x.h5", "--size", "33"], "--size must be an image size the model trains at, one of (16,"),
        (["{celeba}", "{tmp}/x.h5", "--workers", "0"], f"--workers must be in [1, {4 * machine_cores()}] (4 per core)"),
        (["{celeba}", "{tmp}/x.h5", "--workers", "100000"], "got 100000"),  # each a process: more exhaust memory
        (["{celeba}", "{tmp}/folder.h5", "--overwrite"], "the output {tmp}/folder.h5 is a folder"),  # before decoding
        (["{celeba}", "{tmp}/a_file/x.h5"], "the output {tmp}/a_file/x.h5: {tmp}/a_file is a file, not a folder"),
        (["{celeba}", ""], "argument out: is empty (an unset shell variable?); give a path"),
        (["{celeba}", "{tmp}/x.h5", "--crop-size", "0"], "--crop-size must be >= 1, got 0"),
        # Not opened first: its images, stored at 16 px, would be warned about as smaller than the --size.
        (["{tmp}/small.h5", "{tmp}/x.h5"], "{tmp}/small.h5 is not an image folder (it is a hdf5 source)"),
    ],
)
def test_prepare_celeba_bad_input(tmp_path, celeba_root, args, message):
    (tmp_path / "folder.h5").mkdir()
    (tmp_path / "a_file").write_text("")
    write_h5(tmp_path / "small.h5", draw_faces(4, 16, seed=0))
    message = message.format(tmp=tmp_path)
    done = run_prepare(*[a.format(tmp=tmp_path, celeba=celeba_root) for a in args])
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
