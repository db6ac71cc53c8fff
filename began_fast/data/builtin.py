"""Built-in procedural faces: a CelebA-like data set that needs no download.

Each face is drawn with PIL ImageDraw from parameters drawn by a numpy Generator seeded with (seed, index), so
image i is the same at every resolution and in every process. Shapes are laid out in unit coordinates, drawn on
a canvas at least 4x (2x from 64 px up) the output size and reduced with a Lanczos filter: that supersampling is
the antialiasing. What varies: background gradient, face shape (ellipse aspect), skin tone, hair colour and style,
eyes (spacing, size, iris colour), eyebrows, nose, mouth (width, smile), clothing, pose (tilt, offset).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from PIL import Image, ImageDraw

from began_fast.data.images import resize_square
from began_fast.distributed import cores_per_rank
from began_fast.wording import counted

SKIN_TONES = np.array(
    [(255, 224, 196), (241, 194, 167), (224, 172, 135), (198, 134, 96), (160, 102, 66), (111, 69, 45), (80, 50, 35)],
    dtype=np.float64,
)
HAIR_COLOURS = np.array(
    [(20, 15, 12), (60, 38, 24), (110, 70, 40), (170, 120, 60), (225, 195, 130), (150, 60, 30), (140, 140, 140)],
    dtype=np.float64,
)
IRIS_COLOURS = ((70, 45, 25), (40, 90, 150), (70, 120, 70), (110, 90, 50), (30, 30, 30))
HAIR_STYLES = ("short", "long", "fringe", "side_part", "bald", "bun")


def _colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> tuple[int, int, int]:
    # A random blend of two neighbouring palette entries plus a little per-channel noise.
    i = rng.integers(len(palette) - 1)
    c = palette[i] + rng.random() * (palette[i + 1] - palette[i]) + rng.normal(0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * factor)) for c in colour)


def _background(rng: np.random.Generator, canvas: int) -> Image.Image:
    # A vertical gradient between two muted random colours: CelebA backgrounds are mostly smooth and dull.
    grey = rng.uniform(40, 220, (2, 1))
    top, bottom = 0.6 * grey + 0.4 * rng.uniform(0, 255, (2, 3))
    t = np.linspace(0.0, 1.0, canvas)[:, None, None]
    rows = (top * (1 - t) + bottom * t).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(rows, (canvas, canvas, 3)).copy(), "RGB")


def draw_face(rng: np.random.Generator, canvas: int) -> Image.Image:
    """One face as a canvas x canvas RGB PIL image, all parameters drawn from `rng`."""
    image = _background(rng, canvas)
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def box(cx, cy, rx, ry):
        return [(cx - rx) * canvas, (cy - ry) * canvas, (cx + rx) * canvas, (cy + ry) * canvas]

    def pts(*xy):
        return [(x * canvas, y * canvas) for x, y in xy]

    skin, hair = _colour(rng, SKIN_TONES, 8), _colour(rng, HAIR_COLOURS, 10)
    cloth = tuple(int(v) for v in rng.uniform(20, 230, 3))
    style = HAIR_STYLES[rng.integers(len(HAIR_STYLES))]
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.02, 0.04)
    rx, ry = rng.uniform(0.24, 0.3), rng.uniform(0.3, 0.36)

    if style == "long":  # hair that falls behind the face to the shoulders
        draw.rounded_rectangle(box(cx, cy + 0.12, rx * 1.3, ry * 1.25), radius=0.2 * canvas, fill=hair)
    if style == "bun":
        draw.ellipse(box(cx, cy - ry * 1.15, rx * 0.45, ry * 0.32), fill=hair)
    draw.ellipse(box(cx, 1.1, 0.45, 0.2), fill=cloth)  # shoulders
    draw.rectangle(box(cx, cy + ry + 0.06, rx * 0.45, 0.1), fill=_shade(skin, 0.85))  # neck
    for side in (-1, 1):  # ears
        draw.ellipse(box(cx + side * rx * 0.98, cy + 0.01, 0.035, 0.06), fill=_shade(skin, 0.93))
    if style == "bald":
        draw.ellipse(box(cx, cy, rx, ry), fill=skin)
        draw.chord(box(cx, cy - ry * 0.05, rx * 1.04, ry * 1.04), 195, 345, fill=_shade(skin, 0.9))
    else:
        # Hair cap: the top of a slightly larger ellipse. Then the face below a hairline, drawn as the chord of
        # the face ellipse under the horizontal line hairline_y (PIL angles run clockwise from 3 o'clock),
        # with a rounded forehead bulging up into the hair.
        draw.chord(box(cx, cy - ry * 0.04, rx * 1.07, ry * 1.08), 180, 360, fill=hair)
        lift = rng.uniform(0.45, 0.7)
        angle = float(np.degrees(np.arcsin(-lift)))
        draw.chord(box(cx, cy, rx, ry), angle, 180 - angle, fill=skin)
        hairline_y, half_width = cy - lift * ry, rx * np.sqrt(1 - lift**2)
        draw.chord(box(cx, hairline_y, half_width * 0.9, ry * 0.12), 180, 360, fill=skin)
        if style in ("long", "fringe", "side_part"):  # hair down the temples
            for side in (-1, 1):
                draw.ellipse(box(cx + side * rx * 0.93, cy - ry * 0.25, rx * 0.13, ry * 0.4), fill=hair)
        if style == "fringe":
            draw.ellipse(box(cx, hairline_y + ry * 0.04, half_width * 1.05, ry * 0.2), fill=hair)
        if style == "side_part":
            side = rng.choice((-1, 1))
            draw.polygon(
                pts(
                    (cx - side * rx, hairline_y - 0.02),
                    (cx + side * rx * 0.2, hairline_y + ry * 0.25),
                    (cx + side * rx, hairline_y + 0.05),
                    (cx + side * rx, hairline_y - 0.05),
                ),
                fill=hair,
            )

    eye_y, eye_dx = cy - ry * rng.uniform(0.02, 0.16), rx * rng.uniform(0.36, 0.46)
    eye_rx, eye_ry = rx * rng.uniform(0.16, 0.22), ry * rng.uniform(0.06, 0.09)
    iris = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
    brow_lift, brow_tilt = ry * rng.uniform(0.13, 0.22), rng.uniform(-0.02, 0.02)
    brow_width = max(1, int(canvas * rng.uniform(0.012, 0.025)))
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse(box(ex, eye_y, eye_rx, eye_ry), fill=(245, 245, 240))
        draw.ellipse(box(ex, eye_y, eye_ry * 0.95, eye_ry * 0.95), fill=iris)
        draw.ellipse(box(ex, eye_y, eye_ry * 0.45, eye_ry * 0.45), fill=(10, 10, 10))
        inner, outer = ex - side * eye_rx, ex + side * eye_rx * 1.1
        by = eye_y - brow_lift
        draw.line(pts((inner, by + brow_tilt), (ex, by - 0.012), (outer, by + 0.008)), fill=hair, width=brow_width)

    nose_y = cy + ry * rng.uniform(0.2, 0.32)
    nose_w = rx * rng.uniform(0.12, 0.2)
    draw.polygon(pts((cx, eye_y + 0.02), (cx - nose_w, nose_y), (cx + nose_w, nose_y)), fill=_shade(skin, 0.88))
    for side in (-1, 1):
        draw.ellipse(box(cx + side * nose_w * 0.5, nose_y, nose_w * 0.3, 0.008), fill=_shade(skin, 0.55))

    mouth_y, mouth_w = cy + ry * rng.uniform(0.48, 0.6), rx * rng.uniform(0.3, 0.5)
    smile = rng.uniform(-0.01, 0.05)
    lips = _shade((200, 90, 90), rng.uniform(0.6, 1.0))
    if rng.random() < 0.5:  # an open smile: a chord showing teeth
        opening = rng.uniform(0.015, 0.045)
        draw.chord(box(cx, mouth_y - opening * 0.5, mouth_w, opening), 0, 180, fill=lips)
        draw.chord(box(cx, mouth_y - opening * 0.5, mouth_w * 0.8, opening * 0.6), 0, 180, fill=(240, 235, 225))
    else:  # closed lips, curved by the smile
        draw.line(
            pts((cx - mouth_w, mouth_y - smile), (cx, mouth_y + 0.005), (cx + mouth_w, mouth_y - smile)),
            fill=lips,
            width=max(1, int(canvas * 0.02)),
            joint="curve",
        )

    # Pose: a small tilt about the chin; the layer rotates over a fixed background.
    layer = layer.rotate(
        rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, center=(cx * canvas, (cy + ry) * canvas)
    )
    image.paste(layer, (0, 0), layer)
    return image


# Faces drawn so far in this process, by (image size, seed) and then by index: the loader, the loop's pictures and
# its evaluation read the same faces, and a run that stops after a few steps needs only those it read. Drawing is
# deterministic, so a face drawn twice (by two DataLoader workers, say) is the same face.
_drawn: dict[tuple[int, int], dict[int, np.ndarray]] = {}
# draw_faces draws on several processes where each gets at least this many faces: drawing one takes 1.5 to 4 ms, so
# that is about a second each, well above what forking a process and sending its faces back cost.
FACES_PER_PROCESS = 500
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _draw_new(index: int, image_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed % 2**64, index])
    return resize_square(draw_face(rng, max(128, 2 * image_size)), image_size)


def draw_face_at(index: int, image_size: int, seed: int) -> np.ndarray:
    """Face `index` of the set `seed`: an (S, S, 3) uint8 array (HWC), shared by all callers (kept): copy it
    before writing."""
    faces = _drawn.setdefault((image_size, seed % 2**64), {})
    if index not in faces:
        faces[index] = _draw_new(index, image_size, seed)
    return faces[index]


def _draw_some(indices: list[int], image_size: int, seed: int) -> list[np.ndarray]:
    return [_draw_new(index, image_size, seed) for index in indices]  # kept by the process that asked, not here


def _end_with(parent: int) -> None:
    """A drawing process's start: it is killed when the process that forked it ends (Linux's PR_SET_PDEATHSIG), so
    that a rank killed while drawing (torchrun ending a job) leaves no process behind holding its GPU's files."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before prctl
        os._exit(1)


def draw_faces(count: int, image_size: int, seed: int, first: int = 0, processes: int | None = None) -> np.ndarray:
    """Faces first .. first+count-1 of the set `seed`: a new (count, S, S, 3) uint8 array (NHWC).

    The faces not drawn yet in this process are drawn on forked processes at once, one per FACES_PER_PROCESS faces
    and at most `processes` (default: this rank's share of the CPU cores), and kept here as if drawn here (a face
    is the same whoever draws it); where fork is not there, or fails (with a warning), one after another here.
    10,000 faces at 64 px: 12.2 s on one core of a 2-core AMD EPYC, 6.7 s on both.
    """
    faces = _drawn.setdefault((image_size, seed % 2**64), {})
    missing = [index for index in range(first, first + count) if index not in faces]
    processes = min(cores_per_rank() if processes is None else processes, len(missing) // FACES_PER_PROCESS)
    if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: a child starts at once, without importing torch again, and draws with numpy and PIL only (never
        # CUDA, which a fork may not use). Four parts per process even out the parts' times.
        parts = [part.tolist() for part in np.array_split(missing, 4 * processes)]
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_end_with, initargs=(os.getpid(),))
        try:
            drawn = pool.map(_draw_some, parts, itertools.repeat(image_size), itertools.repeat(seed))
            for part, part_faces in zip(parts, drawn, strict=True):
                faces.update(zip(part, part_faces, strict=True))
        except BaseException as e:
            # The processes forked so far would wait for work for ever (a fork that failed after others, Ctrl-C),
            # and this process at its exit for them: end them (Python 3.14's terminate_workers).
            for child in list((pool._processes or {}).values()):
                child.terminate()
            if not isinstance(e, OSError | BrokenProcessPool):  # no fork allowed, a child killed (out of memory)
                raise
            message = f"drawing the built-in faces on {processes} processes failed ({e}); drawing them here"
            warnings.warn(message, stacklevel=2)
        finally:
            pool.shutdown(cancel_futures=True)
    return np.stack([draw_face_at(first + k, image_size, seed) for k in range(count)])


class BuiltinFaces(torch.utils.data.Dataset):
    """`count` procedural faces at S x S: faces first .. first+count-1 of the set `seed`. A run trains on faces
    0 .. count-1, so the faces after them are held-out images, as many as wanted (data.holdout.held_out_images).

    A face is drawn when it is first read (about 1.5 ms), so a run starts at once and a short one draws only the
    faces it reads; `images` and as_uint8() draw every face (the GPU-resident loader's copy), on several processes
    (draw_faces). A DataLoader worker forked after faces were drawn shares them.
    """

    kind = "builtin"
    files: list[str] = []

    def __init__(self, count: int, image_size: int, seed: int, first: int = 0):
        self.count, self.image_size, self.seed, self.first = count, image_size, seed, first
        self._all: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        """Face `index` of this set (negative: from its end), a (3, S, S) uint8 tensor (CHW)."""
        face = draw_face_at(self.first + range(self.count)[index], self.image_size, self.seed)
        return torch.from_numpy(face).permute(2, 0, 1).contiguous()

    @property
    def images(self) -> torch.Tensor:
        """All images, (N, 3, S, S) uint8 (drawn on first use, then kept)."""
        if self._all is None:
            faces = draw_faces(self.count, self.image_size, self.seed, self.first)
            self._all = torch.from_numpy(faces).permute(0, 3, 1, 2).contiguous()
        return self._all

    def as_uint8(self) -> torch.Tensor:
        """All images, (N, 3, S, S) uint8."""
        return self.images

    def describe(self) -> str:
        last = self.first + self.count - 1
        faces = counted(self.count, "image") if self.first == 0 else f"faces {self.first} to {last}"
        return f"builtin faces: {faces} at {self.image_size}px, seed {self.seed}"
