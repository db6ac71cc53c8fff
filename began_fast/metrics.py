"""Sample quality: the multi-scale sliced Wasserstein distance (SWD) and the evaluation of a trained G and D.

SWD is the method of Karras et al. 2018, "Progressive Growing of GANs" (their metrics/sliced_wasserstein.py):
each image set is decomposed into a Laplacian pyramid (5-tap binomial filter, mirror borders, as cv2.pyrDown /
pyrUp) from the full resolution down to 16x16; at every level random 7x7x3 patches ("descriptors") are cut out,
each set's descriptors are normalised per channel by that set's own mean and std, and the two descriptor clouds
are compared by the sliced Wasserstein distance: project both on random unit directions, sort each projection
and average |a - b| (the 1-D Wasserstein-1 distance of the projections). Reported x1e3 per level (finest
first, keyed by the level's resolution) and their average. Lower is better: the finest level measures
fine detail, the coarsest the layout. The per-channel normalisation makes SWD blind, at every level, to a change of
a channel's brightness or contrast (a tint, a washed-out set), as the published method is: FID sees those.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from began_fast.fid import fid
from began_fast.reports import from_uint8, to_uint8
from began_fast.seeds import SAMPLING, generator, uniform_z

PATCH_SIZE = 7
MIN_RESOLUTION = 16


class MetricError(ValueError):
    """Images handed to a metric have the wrong shape, dtype or count; the message is one line for the user."""


def _as_pixels(images: torch.Tensor, name: str) -> torch.Tensor:
    """(N, 3, S, S) uint8 or float in [-1, 1] -> the same images as uint8 (the scale the published code uses).
    Float images outside [-1, 1] are refused (0..255 floats would otherwise be read as nearly black and white), and
    float images with no value below 0 (most likely [0, 1] images) get a warning; G's output, which has no squashing
    activation, goes through `generated_pixels` instead."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise MetricError(f"{name} must be a (N, 3, S, S) tensor of square RGB images, got {shape}")
    if images.shape[0] < 1 or images.shape[2] < MIN_RESOLUTION:
        raise MetricError(f"{name} must hold >= 1 image of size >= {MIN_RESOLUTION}, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise MetricError(f"{name} must be uint8 or a float tensor in [-1, 1], got {images.dtype}")
    low, high = images.min().item(), images.max().item()
    if not -1 <= low <= high <= 1:  # NaN fails this too
        raise MetricError(
            f"{name}: float images must lie in [-1, 1], got values in [{low:g}, {high:g}] (pass 0..255 pixels as uint8)"
        )
    if low >= 0:
        # Real photographs in [-1, 1] all but always hold pixels darker than mid-grey; a set with none is most likely
        # [0, 1] images, which would be scored as washed out (FID sees that; SWD, normalised per set, barely does).
        warnings.warn(
            f"{name}: every value lies in [0, 1], but float images are read as [-1, 1] (-1 black, 1 white); "
            "if these are [0, 1] images, pass x * 2 - 1",
            stacklevel=3,
        )
    return to_uint8(images)


def generated_pixels(images: torch.Tensor) -> torch.Tensor:
    """G's output as the uint8 images a saved sample would hold: clamped to [-1, 1] and rounded. NaN or inf (a
    diverged G) is refused rather than scored."""
    if not torch.isfinite(images).all():
        raise MetricError("G(z) holds NaN or inf: the generator has diverged, there is nothing to evaluate")
    return to_uint8(images)


def pyramid_resolutions(image_size: int) -> list[int]:
    """The Laplacian pyramid's level sizes, finest first: as many levels as the published code takes (S, S // 2,
    ... while >= 16), each the size of its level's image (pyrDown rounds an odd size up)."""
    sizes, floor = [image_size], image_size // 2
    while floor >= MIN_RESOLUTION:
        sizes.append((sizes[-1] + 1) // 2)
        floor //= 2
    return sizes


BINOMIAL_TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _binomial_blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial filter ([1 4 6 4 1]/16 outer itself) x gain, with mirror (reflect-101) borders.

    Written as five shifted, weighted sums per axis: on the CPU that is several times a depthwise conv2d.
    """
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    h, w = x.shape[-2] - 4, x.shape[-1] - 4
    x = sum(t * x[..., i : i + w] for i, t in enumerate(BINOMIAL_TAPS))
    return gain * sum(t * x[..., i : i + h, :] for i, t in enumerate(BINOMIAL_TAPS))


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur then keep every second pixel (cv2.pyrDown)."""
    return _binomial_blur(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-interleave to twice the size, blur with gain 4 (the zeros carry 3/4 of the pixels), crop to `size`."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _binomial_blur(up, gain=4.0)[:, :, : size[0], : size[1]]


def laplacian_level(x: torch.Tensor, level: int, num_levels: int) -> torch.Tensor:
    """Level `level` of x's Laplacian pyramid: the Gaussian level minus the upsampled next one; the coarsest
    level (num_levels - 1) is the Gaussian level itself. x: (N, 3, S, S) float."""
    for _ in range(level):
        x = pyr_down(x)
    if level < num_levels - 1:
        x = x - pyr_up(pyr_down(x), x.shape[-2:])
    return x


def _descriptors(
    pixels: torch.Tensor, level: int, num_levels: int, corners: torch.Tensor, chunk: int, device: torch.device
) -> torch.Tensor:
    """The PATCH_SIZE^2 x 3 patches of one pyramid level at `corners` (N, P, 2: top, left), normalised per channel
    over the whole set -> (N * P, 3 * PATCH_SIZE^2) float32."""
    offsets = torch.arange(PATCH_SIZE, device=device)
    parts = []
    for start in range(0, pixels.shape[0], chunk):
        x = laplacian_level(pixels[start : start + chunk].to(device, torch.float32), level, num_levels)
        c = corners[start : start + chunk]
        rows = (c[..., 0, None] + offsets).unsqueeze(-1)  # (n, P, 7, 1)
        cols = (c[..., 1, None] + offsets).unsqueeze(-2)  # (n, P, 1, 7)
        image = torch.arange(x.shape[0], device=device).view(-1, 1, 1, 1)
        patches = x[image, :, rows, cols]  # (n, P, 7, 7, 3): the advanced indices come first
        # (channel, column, row), the published code's component order (its np.ogrid names the column axis x).
        parts.append(patches.permute(0, 1, 4, 3, 2).reshape(-1, 3, PATCH_SIZE, PATCH_SIZE))
    desc = torch.cat(parts)
    # Each set by its own statistics, as the published code. The floor only matters for a constant image set,
    # whose descriptors would otherwise be 0/0.
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), correction=0, keepdim=True).clamp_min(1e-8)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, dirs_per_repeat: int, dir_repeats: int, generator: torch.Generator
) -> float:
    """Mean over `dir_repeats` x `dirs_per_repeat` random unit directions of the 1-D Wasserstein-1 distance
    between the projections of the point clouds a and b, both (M, D) with the same M."""
    distances = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=generator)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
        # (directions, M): each direction's projections contiguous, the axis sorted.
        proj_a, proj_b = _sorted_rows((a @ dirs).T), _sorted_rows((b @ dirs).T)
        distances.append((proj_a - proj_b).abs().mean().item())
    return sum(distances) / len(distances)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Sort each row of a 2-D float tensor. On the CPU numpy's vectorised sort is about 10x torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return torch.sort(x.contiguous(), dim=1).values


def swd(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    seed: int = 0,
    descriptors_per_image: int = 128,
    dirs_per_repeat: int = 128,
    dir_repeats: int = 4,
    chunk: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance x1e3 between two image sets of the same shape.

    images_a, images_b: (N, 3, S, S), uint8 or float in [-1, 1], S >= 16; the same N (the sorted projections
    are matched one to one). Runs on `device` (default: images_a's), `chunk` images at a time through the
    pyramid. Deterministic given `seed`: patch positions and directions come from one CPU torch.Generator, drawn
    per level in this order: a's patch corners, b's, then the directions. As in the published code, each set is
    cut at its own random positions, so two identical sets give the method's sampling floor, not 0.
    Returns {"<resolution>": distance per level, finest first, ..., "avg": their mean}.
    """
    a, b = _as_pixels(images_a, "images_a"), _as_pixels(images_b, "images_b")
    if a.shape != b.shape:
        raise MetricError(f"SWD compares sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    device = torch.device(device) if device is not None else a.device
    generator = torch.Generator().manual_seed(seed)
    resolutions = pyramid_resolutions(a.shape[-1])
    result = {}
    for level, resolution in enumerate(resolutions):
        # Top-left corners of whole patches: the published code's centres in [3, res - 3) shifted by 3.
        corners_a, corners_b = (
            torch.randint(0, resolution - PATCH_SIZE + 1, (a.shape[0], descriptors_per_image, 2), generator=generator)
            for _ in range(2)
        )
        desc_a = _descriptors(a, level, len(resolutions), corners_a.to(device), chunk, device)
        desc_b = _descriptors(b, level, len(resolutions), corners_b.to(device), chunk, device)
        distance = sliced_wasserstein(
            desc_a, desc_b, dirs_per_repeat=dirs_per_repeat, dir_repeats=dir_repeats, generator=generator
        )
        result[str(resolution)] = 1e3 * distance
    result["avg"] = sum(result.values()) / len(resolutions)
    return result


def _real_images(real: Dataset | torch.Tensor, indices: range) -> torch.Tensor:
    if torch.is_tensor(real):
        return real[indices.start : indices.stop]
    return torch.stack([real[i] for i in indices])


def check_image_count(num: int, available: int, *, with_fid: bool = False) -> None:
    """MetricError unless `num` images can be compared: at least one (two for FID, whose covariance of one image is
    undefined), and no more than the `available` real ones."""
    if num < 1 or with_fid and num < 2:
        least = "2 for FID (the covariance of its features)" if with_fid else "1"
        raise MetricError(f"the number of images to compare must be >= {least}, got {num}")
    if available < num:
        raise MetricError(f"{num} images to compare, but the real images are only {available}; compare fewer")


@torch.no_grad()
def evaluate_models(
    G: torch.nn.Module,
    D: torch.nn.Module,
    real: Dataset | torch.Tensor,
    *,
    num: int = 2048,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    held_out: torch.Tensor | None = None,
    with_fid: bool = False,
    inception_weights: str | None = None,
) -> dict:
    """Quality of a trained BEGAN: SWD (and FID) of `num` samples of G against `num` real images, and D's
    reconstruction error mean|x - D(x)|. G and D run under the caller's autocast, if any.

    real: a Dataset of (3, S, S) uint8 images or an (N, 3, S, S) uint8 / [-1, 1] float tensor; SWD and FID use
    its first `num` images. held_out: images D never trained on (data.held_out_images), on which the
    reconstruction error is measured; None measures it on the same `num` real images. z ~ U(-1, 1) from `seed`;
    samples are rounded to uint8 like a saved image before they are compared.
    Returns {"num", "image_size", "swd": {per level..., "avg"}, "recon_l1"[, "fid"]}.
    """
    size = G.cfg.image_size
    check_image_count(num, len(real), with_fid=with_fid)
    # The inputs are checked before G and D run.
    reals = _as_pixels(_real_images(real, range(num)), "real images")
    held_out = reals if held_out is None else _as_pixels(held_out, "held-out images")
    for name, images in (("real images", reals), ("held-out images", held_out)):
        if images.shape[-1] != size:
            raise MetricError(f"{name} are {images.shape[-1]}x{images.shape[-1]}, the model makes {size}x{size}")
    device = torch.device(device)
    noise = generator(seed, SAMPLING)  # not torch.manual_seed(seed)'s stream, which drew a run's initial weights
    fakes = []
    for start in range(0, num, batch_size):
        z = uniform_z(min(batch_size, num - start), G.cfg.z_size, noise)
        fakes.append(generated_pixels(G(z.to(device))).cpu())
    fake = torch.cat(fakes)
    errors = []
    for start in range(0, held_out.shape[0], batch_size):
        x = from_uint8(held_out[start : start + batch_size], device)
        errors.append((x - D(x).float()).abs().flatten(1).mean(1).cpu())
    recon_l1 = torch.cat(errors).mean().item()
    if not math.isfinite(recon_l1):
        raise MetricError("D's reconstructions hold NaN or inf: the checkpoint's D has diverged")
    # G and D ran in the caller's precision (a training run's autocast); the metrics are float32 whatever it is.
    with torch.autocast(device.type, enabled=False):
        result = {
            "num": num,
            "image_size": size,
            "swd": swd(fake, reals, seed=seed, device=device),
            "recon_l1": recon_l1,
        }
        if with_fid:
            result["fid"] = fid(fake, reals, weights=inception_weights, device=device, batch_size=batch_size)
            if not math.isfinite(result["fid"]):
                raise MetricError(f"torch-fidelity's FID of {num} images came out {result['fid']}")
    return result
