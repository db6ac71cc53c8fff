"""Pictures of a run, each written atomically into the run folder so a viewer never sees half a file.

Image grids (samples, D's reconstructions), the fixed-z samples over time (one strip and an animated GIF, built
from the run's samples/step_XXXXXXX.png) and the convergence plot (M, k_t, the lr and, when evaluated, SWD).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from began_fast.atomic_files import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> the uint8 pixels a saved picture holds (clamped, rounded), on the same device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] on `device`, x = u8 / 127.5 - 1 (the data loaders' convention)."""
    return images.to(device, torch.float32) / 127.5 - 1


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) floats in [-1, 1] -> (B, S, S, 3) uint8."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def _pixels(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8: images as to_uint8_hwc makes them, or already made (a thread without torch ops)."""
    return images if isinstance(images, np.ndarray) else to_uint8_hwc(images)


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (B, 3, S, S) images in [-1, 1], or their (B, S, S, 3) uint8 pixels, into one RGB picture, `nrow` per row
    (about square by default)."""
    tiles = _pixels(images)
    b, s = tiles.shape[0], tiles.shape[1]
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (s + pad) + pad, nrow * (s + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[pad + r * (s + pad) : pad + r * (s + pad) + s, pad + c * (s + pad) : pad + c * (s + pad) + s] = tile
    return Image.fromarray(grid)


def save_png(image: Image.Image, path: str | Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None) -> None:
    save_png(image_grid(images, nrow), path)


def read_stats(path: str | Path, *, warn: bool = False) -> list[dict]:
    """The rows of a run's stats.jsonl: one JSON object per logging window, with its "step". A line that is not one
    (the torn last line of a crash mid-write, or bytes damaged on disk) is skipped; with `warn`, one warning counts
    the skipped lines other than a torn last one (no newline after it: a crash's, or a row being written)."""
    rows, damaged = [], []
    path = Path(path)
    if not path.exists():
        return rows
    text = path.read_bytes()
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
            row = None
        if isinstance(row, dict) and type(row.get("step")) is int:
            rows.append(row)
        elif line.strip() and not (number == len(lines) and not text.endswith(b"\n")):
            damaged.append(number)
    if warn and damaged:
        which = f"{len(damaged)} lines that are not stats rows (first: line {damaged[0]})"
        which = which if damaged[1:] else f"line {damaged[0]}, not a stats row"
        warnings.warn(f"{path}: skipped {which}", stacklevel=2)
    return rows


def finite_number(value) -> bool:
    """Whether a stats value is a finite number (a hand-edited or damaged row may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_rows(stats: list[dict]) -> list[dict]:
    """The rows that log a training window: those with a finite M (evaluation rows carry none)."""
    return [row for row in stats if finite_number(row.get("m"))]


def save_reconstruction_grid(
    real: torch.Tensor | np.ndarray,
    reconstructed: torch.Tensor | np.ndarray,
    path: str | Path,
    pairs_per_row: int | None = None,
) -> None:
    """Real images next to D's reconstructions: (B, 3, S, S) each in [-1, 1] (or their uint8 pixels, as image_grid),
    tiled as pairs (x, D(x)), `pairs_per_row` pairs per row (about square by default)."""
    if real.shape != reconstructed.shape:
        raise ValueError(f"real {tuple(real.shape)} and reconstructed {tuple(reconstructed.shape)} images differ")
    real, reconstructed = _pixels(real), _pixels(reconstructed)
    pairs = np.stack([real, reconstructed], axis=1).reshape(-1, *real.shape[1:])
    pairs_per_row = pairs_per_row or math.ceil(math.sqrt(real.shape[0]))
    save_png(image_grid(pairs, nrow=2 * pairs_per_row), path)


SAMPLE_NAME = re.compile(r"step_(\d+)\.png")
LABEL_HEIGHT = 14


def sample_frames(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's fixed-z sample grids samples/step_XXXXXXX.png as (step, path), by step."""
    folder = Path(run_dir) / "samples"
    found = [(SAMPLE_NAME.fullmatch(p.name), p) for p in folder.glob("step_*.png")] if folder.is_dir() else []
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _evenly_spaced(frames: list, count: int) -> list:
    """At most `count` of frames, evenly spaced, always the first and the last."""
    if len(frames) <= count:
        return frames
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [frames[i] for i in sorted(set(picks.tolist()))]


def _labelled_frame(path: Path, step: int, height: int) -> Image.Image:
    """The grid at `path` scaled to `height` pixels (aspect kept), under a white band reading "step N"."""
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
        width = max(1, round(grid.width * height / grid.height))
        grid = grid.resize((width, height), Image.Resampling.LANCZOS)
    frame = Image.new("RGB", (width, height + LABEL_HEIGHT), "white")
    frame.paste(grid, (0, LABEL_HEIGHT))
    ImageDraw.Draw(frame).text((2, 1), f"step {step}", fill="black")
    return frame


def progress_strip(frames: list[tuple[int, Path]], max_frames: int = 10, height: int = 256, gap: int = 4):
    """The fixed-z grids over time side by side (at most `max_frames`, evenly spaced), each labelled with its step."""
    tiles = [_labelled_frame(p, step, height) for step, p in _evenly_spaced(frames, max_frames)]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height + LABEL_HEIGHT), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return strip


def save_progress_gif(
    frames: list[tuple[int, Path]], path: str | Path, max_frames: int = 60, height: int = 256, frame_ms: int = 250
) -> None:
    """An animated GIF of the fixed-z grids over time (at most `max_frames`, evenly spaced); the last frame holds
    four times as long, then it loops."""
    images = [_labelled_frame(p, step, height) for step, p in _evenly_spaced(frames, max_frames)]
    size = images[0].size
    # Each frame gets its own 256-colour palette by the fast octree quantiser: PIL's default for RGB frames is
    # about a hundred times slower, which matters when the loop regenerates the GIF at every sample grid.
    images = [
        (im if im.size == size else im.resize(size)).quantize(256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        for im in images
    ]
    durations = [frame_ms] * (len(images) - 1) + [4 * frame_ms]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def update_progress(run_dir: str | Path) -> list[Path]:
    """Regenerate progress.png (the strip) and progress.gif in the run folder from its sample grids; returns the
    files written (none before the first sample grid exists)."""
    run_dir = Path(run_dir)
    frames = sample_frames(run_dir)
    if not frames:
        return []
    save_png(progress_strip(frames), run_dir / "progress.png")
    save_progress_gif(frames, run_dir / "progress.gif")
    return [run_dir / "progress.png", run_dir / "progress.gif"]


class BackgroundWriter:
    """Runs picture jobs on one background thread, so that the training loop goes on while PNGs, the GIF and the
    plot are encoded (about 0.85 s of CPU at 60 sample grids, every sample step). One job at a time, in the order
    given: a new job first waits for the one before it. A job's error is raised by the next submit() or wait().

    Jobs get pixels, not tensors: a torch CPU op on a second thread starts a second OpenMP thread team, which then
    competes with the training thread's for the cores (1000 steps of `demo` on 2 cores: 76 s, 111 s with it)."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="began-fast-pictures")
        self._pending: concurrent.futures.Future | None = None

    def submit(self, job, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(job, *args)

    def wait(self) -> None:
        """Return once the job in flight is done; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let the job in flight finish, without raising its error (the caller is leaving on an error of its own, or
        has called wait()), and end the thread."""
        self._pool.shutdown(wait=True)


def swd_points(stats: list[dict]) -> list[tuple[int, float]]:
    """(step, SWD) of the stats rows that carry an evaluation ("swd": the average over the levels, x1e3)."""
    points = []
    for row in stats:
        value = row.get("swd")
        if finite_number(value):
            points.append((row["step"], float(value)))
    return points


def plot_convergence(stats: list[dict], path: str | Path, title: str = "BEGAN convergence") -> None:
    """Write convergence_figure(stats) to `path` (PNG)."""
    _save_figure(convergence_figure(stats, title), path)


def convergence_figure(stats: list[dict], title: str = "BEGAN convergence"):
    """M (the paper's convergence measure) with the learning rate, k_t and, when the rows carry evaluations,
    SWD, against the step. Rows without "m" (evaluation rows) only feed the SWD panel."""
    plt = _pyplot()
    train_rows = training_rows(stats)
    swd = swd_points(stats)
    panels = 3 if swd else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.75 * panels), sharex=True)
    ax_m, ax_k = axes[0], axes[1]
    steps = [r["step"] for r in train_rows]
    # A line of one point draws nothing: the first picture of a run that samples before it logs twice showed empty
    # panels. A lone point gets a marker.
    lone = "o" if len(steps) == 1 else None
    (m_line,) = ax_m.plot(steps, [r["m"] for r in train_rows], color="tab:blue", label="M", marker=lone)
    ax_m.set_ylabel("M (convergence)")
    ax_m.grid(alpha=0.3)
    lr_rows = [r for r in train_rows if "lr" in r]
    if lr_rows:
        ax_lr = ax_m.twinx()
        lr_steps = [r["step"] for r in lr_rows]
        (lr_line,) = ax_lr.plot(
            lr_steps, [r["lr"] for r in lr_rows], color="tab:gray", linestyle="--", label="learning rate", marker=lone
        )
        ax_lr.set_ylabel("learning rate (dashed)")
        ax_m.legend(handles=[m_line, lr_line], loc="upper right", fontsize="small")
    ax_k.plot(steps, [r["k"] for r in train_rows], color="tab:red", marker=lone)
    ax_k.set_ylabel("k_t")
    ax_k.grid(alpha=0.3)
    if swd:
        ax_swd = axes[2]
        ax_swd.plot(*zip(*swd, strict=True), color="tab:green", marker="o")
        ax_swd.set_ylabel("SWD x1e3 (lower is better)")
        ax_swd.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    ax_m.set_title(title)
    return fig


def plot_runs(stats_by_run: dict[str, list[dict]], path: str | Path, title: str = "BEGAN runs compared") -> None:
    """Write runs_figure(stats_by_run) to `path` (PNG)."""
    _save_figure(runs_figure(stats_by_run, title), path)


def runs_figure(stats_by_run: dict[str, list[dict]], title: str = "BEGAN runs compared"):
    """The M curves of several runs overlaid (name -> stats rows) and, when any run was evaluated, their SWD."""
    plt = _pyplot()
    with_swd = any(swd_points(stats) for stats in stats_by_run.values())
    fig, axes = plt.subplots(2 if with_swd else 1, 1, figsize=(7, 2.75 * (2 if with_swd else 1)), sharex=True)
    axes = list(axes) if with_swd else [axes]
    for i, (name, stats) in enumerate(stats_by_run.items()):
        rows = training_rows(stats)
        colour = f"C{i}"  # a run's colour in both panels, whichever runs were evaluated
        axes[0].plot([r["step"] for r in rows], [r["m"] for r in rows], color=colour, label=name)
        if with_swd and swd_points(stats):
            axes[1].plot(*zip(*swd_points(stats), strict=True), color=colour, marker="o", label=name)
    axes[0].set_ylabel("M (convergence)")
    axes[0].legend()
    if with_swd:
        axes[1].set_ylabel("SWD x1e3 (lower is better)")
        axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    return fig


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
