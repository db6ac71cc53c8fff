"""Pictures of a run: image grids and the convergence plot, each written atomically into the run folder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from began_fast.checkpoint import atomic_write


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) floats in [-1, 1] -> (B, S, S, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (B, 3, S, S) images in [-1, 1] into one RGB picture, `nrow` per row (about square by default)."""
    tiles = to_uint8_hwc(images)
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


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    save_png(image_grid(images, nrow), path)


def read_stats(path: str | Path) -> list[dict]:
    """The rows of a run's stats.jsonl (a row per logging window); a torn last line (a crash mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_convergence(stats: list[dict], path: str | Path, title: str = "BEGAN convergence") -> None:
    """M (the paper's convergence measure) and k_t against the step, with the learning rate when it is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in stats]
    fig, (ax_m, ax_k) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax_m.plot(steps, [r["m"] for r in stats], color="tab:blue", label="M")
    ax_m.set_ylabel("M (convergence)")
    ax_m.grid(alpha=0.3)
    if stats and "lr" in stats[0]:
        ax_lr = ax_m.twinx()
        ax_lr.plot(steps, [r["lr"] for r in stats], color="tab:gray", linestyle="--", label="lr")
        ax_lr.set_ylabel("learning rate")
    ax_k.plot(steps, [r["k"] for r in stats], color="tab:red")
    ax_k.set_ylabel("k_t")
    ax_k.set_xlabel("step")
    ax_k.grid(alpha=0.3)
    ax_m.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
