"""SWD (Karras et al. 2018) and the evaluation of a trained G and D: the method against a transcription of the
published code, its behaviour as a distance (a small floor on identical sets, growing with the corruption, small
between two draws of one distribution), determinism, and FID's one-line error when its weights are missing or wrong."""

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from began_fast import metrics
from began_fast.config import ModelConfig
from began_fast.data.builtin import BuiltinFaces
from began_fast.fid import (
    INCEPTION_STATE_KEY,
    INCEPTION_WEIGHTS_FILE,
    FIDUnavailableError,
    fid,
    inception_weights_path,
    require_fid,
)
from began_fast.metrics import (
    MetricError,
    evaluate_models,
    laplacian_level,
    pyr_down,
    pyr_up,
    pyramid_resolutions,
    sliced_wasserstein,
    swd,
)
from began_fast.model import Discriminator, Generator
from began_fast.seeds import SAMPLING, generator

# The published code's 5x5 Gaussian (cv2.pyrDown's), outer product of [1 4 6 4 1] / 16.
GAUSSIAN_5X5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float32) / 256


@pytest.fixture(scope="module")
def faces():
    """Two independent draws of the built-in faces at 32 px, (64, 3, 32, 32) uint8 each."""
    return BuiltinFaces(64, 32, seed=0).images, BuiltinFaces(64, 32, seed=1).images


@pytest.mark.parametrize("size", [32, 33, 31])
def test_pyramid_matches_the_published_numpy_code(size):
    """Odd sizes, which the published code does not take (its pyr_up doubles 17 to 34, not 33), as cv2 does, whose
    pyrDown / pyrUp the published code says it matches: pyrDown rounds the size up, and pyrUp(dstsize) equals the
    doubled image cropped. OpenCV 5.0's pyrDown and pyrUp(dstsize) gave our pyr_down and pyr_up exactly at 17, 31,
    32, 33 and 63 px (checked once by hand; OpenCV is not a dependency)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, size, size)).astype(np.float32)
    # Karras et al.'s pyr_down / pyr_up: scipy convolve with mode="mirror", zero-interleaved upsampling x4 gain.
    down = ndimage.convolve(x, GAUSSIAN_5X5[None, None], mode="mirror")[:, :, ::2, ::2]
    interleaved = np.zeros((2, 3, 2 * down.shape[2], 2 * down.shape[3]), np.float32)
    interleaved[:, :, ::2, ::2] = down
    up = ndimage.convolve(interleaved, 4 * GAUSSIAN_5X5[None, None], mode="mirror")[:, :, :size, :size]
    np.testing.assert_allclose(pyr_down(torch.from_numpy(x)).numpy(), down, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(pyr_up(torch.from_numpy(down), (size, size)).numpy(), up, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(laplacian_level(torch.from_numpy(x), 0, 2).numpy(), x - up, atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(laplacian_level(torch.from_numpy(x), 1, 2).numpy(), down, atol=1e-4, rtol=1e-5)


def test_pyramid_levels_go_down_to_16():
    assert pyramid_resolutions(16) == [16]
    assert pyramid_resolutions(64) == [64, 32, 16]
    assert pyramid_resolutions(256) == [256, 128, 64, 32, 16]
    # Odd sizes: the published code's level count (halving rounded down while >= 16), pyrDown's sizes (rounded up).
    assert pyramid_resolutions(31) == [31] and pyramid_resolutions(63) == [63, 32]
    assert pyramid_resolutions(100) == [100, 50, 25]


def test_sliced_wasserstein_is_the_mean_1d_wasserstein_of_the_projections():
    stats = pytest.importorskip("scipy.stats")
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 6, generator=rng), torch.randn(500, 6, generator=rng) * 1.5 + 0.3
    got = sliced_wasserstein(a, b, dirs_per_repeat=3, dir_repeats=2, generator=torch.Generator().manual_seed(7))
    dirs_rng = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(2):
        dirs = torch.randn(6, 3, generator=dirs_rng)
        dirs = dirs / dirs.norm(dim=0)
        expected += [stats.wasserstein_distance((a @ d).numpy(), (b @ d).numpy()) for d in dirs.T]
    assert got == pytest.approx(np.mean(expected), rel=1e-4)


def _published_swd(a: np.ndarray, b: np.ndarray, corners: list, directions: list) -> dict:
    """Karras et al.'s metrics/sliced_wasserstein.py (generate_laplacian_pyramid, get_descriptors_for_minibatch,
    finalize_descriptors, sliced_wasserstein, the x1e3 and the mean), transcribed with its random draws replaced
    by given ones: corners[level] = (a's, b's) top-left patch corners (N, P, 2: row, column) and
    directions[level] = the unit directions of each repeat."""
    ndimage = pytest.importorskip("scipy.ndimage")

    def pyr_down(m):
        return ndimage.convolve(m, GAUSSIAN_5X5[None, None], mode="mirror")[:, :, ::2, ::2]

    def pyr_up(m):
        r = np.zeros((m.shape[0], m.shape[1], m.shape[2] * 2, m.shape[3] * 2), m.dtype)
        r[:, :, ::2, ::2] = m
        return ndimage.convolve(r, GAUSSIAN_5X5[None, None] * 4.0, mode="mirror")

    def laplacian_pyramid(minibatch, num_levels):
        pyramid = [np.float32(minibatch)]
        for _ in range(1, num_levels):
            pyramid.append(pyr_down(pyramid[-1]))
            pyramid[-2] -= pyr_up(pyramid[-1])
        return pyramid

    def descriptors(minibatch, corner):  # the published draw was x, y = randint(3, S - 3): patch centres
        s, per_image = minibatch.shape, corner.shape[1]
        nhood, chan, x, y = np.ogrid[0 : corner.shape[0] * per_image, 0:3, -3:4, -3:4]
        img = nhood // per_image
        x = x + corner[..., 1].reshape(-1, 1, 1, 1) + 3
        y = y + corner[..., 0].reshape(-1, 1, 1, 1) + 3
        desc = minibatch.flat[((img * s[1] + chan) * s[2] + y) * s[3] + x]
        desc -= np.mean(desc, axis=(0, 2, 3), keepdims=True)
        desc /= np.std(desc, axis=(0, 2, 3), keepdims=True)
        return desc.reshape(desc.shape[0], -1)

    levels = len(corners)
    dist = []
    for level, (pa, pb) in enumerate(zip(laplacian_pyramid(a, levels), laplacian_pyramid(b, levels), strict=True)):
        da, db = descriptors(pa, corners[level][0]), descriptors(pb, corners[level][1])
        results = [np.mean(np.abs(np.sort(da @ d, axis=0) - np.sort(db @ d, axis=0))) for d in directions[level]]
        dist.append(np.mean(results) * 1e3)
    return dist + [np.mean(dist)]


@pytest.mark.parametrize(
    ("size", "settings"),
    [
        (32, {"descriptors_per_image": 16, "dirs_per_repeat": 32, "dir_repeats": 3}),
        (64, {}),  # swd's defaults, which must be the published ones; three levels, so a middle one
        # One level (the Gaussian level itself), one patch per image: 24 x 49 values per channel, so normalising by
        # the sample std (n - 1) rather than the published population std (n) is 4e-4 off.
        (16, {"descriptors_per_image": 1, "dirs_per_repeat": 16, "dir_repeats": 2}),
    ],
)
def test_swd_matches_the_published_code_given_its_random_draws(size, settings):
    """swd() against a transcription of the published numpy code, fed the same patch corners and directions
    (swd's documented draw order from its seed): pins the pyramid, the patch orientation, the per-set
    normalisation, the projections, the level order and the x1e3 scale, not only SWD's behaviour as a distance."""
    a, b, seed = BuiltinFaces(24, size, seed=0).images, BuiltinFaces(24, size, seed=1).images, 11
    published = {"descriptors_per_image": 128, "dirs_per_repeat": 128, "dir_repeats": 4} | settings
    per_image, dirs, repeats = published.values()
    generator = torch.Generator().manual_seed(seed)
    corners, directions = [], []
    for resolution in pyramid_resolutions(size):
        shape = (a.shape[0], per_image, 2)
        corners.append([torch.randint(0, resolution - 6, shape, generator=generator).numpy() for _ in range(2)])
        repeat_dirs = [torch.randn(3 * 7 * 7, dirs, generator=generator) for _ in range(repeats)]
        directions.append([(d / d.norm(dim=0, keepdim=True)).numpy() for d in repeat_dirs])
    want = _published_swd(a.numpy().astype(np.float32), b.numpy().astype(np.float32), corners, directions)
    got = swd(a, b, seed=seed, **settings)
    assert list(got) == [*map(str, pyramid_resolutions(size)), "avg"] and len(got) == {16: 2, 32: 3, 64: 4}[size]
    np.testing.assert_allclose(list(got.values()), want, rtol=1e-4)


def test_swd_of_a_set_against_itself_is_the_small_sampling_floor(faces):
    """Each set is cut at its own random patches (as published), so a set against itself is not exactly 0 but
    far below any real difference."""
    a = faces[0]
    itself = swd(a, a.clone(), seed=3, descriptors_per_image=64)
    assert set(itself) == {"32", "16", "avg"}
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert 0 < itself["avg"] < 0.2 * swd(a, noise, seed=3, descriptors_per_image=64)["avg"]  # 27 against 202
    assert itself["avg"] < 0.7 * swd(a, faces[1], seed=3, descriptors_per_image=64)["avg"]  # against 48


def test_swd_of_odd_sized_images_takes_patches_from_each_levels_own_size():
    """At 33 px the levels are 33 and 17 px (pyrDown rounds up): each level's patches come from its own image, whole,
    and the distances still tell a set from noise."""
    a, b = (BuiltinFaces(32, 33, seed=seed).images for seed in (0, 1))
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    two_draws, against_noise = (swd(a, other, seed=1, descriptors_per_image=32) for other in (b, noise))
    assert set(two_draws) == {"33", "17", "avg"}
    assert 0 < two_draws["avg"] < 0.5 * against_noise["avg"]  # 75 against 211


def test_swd_of_a_flat_image_set_is_a_number(faces):
    """A set of flat images (a collapsed G's, say) has descriptors of no spread: each set normalised by its own
    std would be 0/0, so the std is floored. Two flat sets of other greys are alike to SWD (0: normalised per set),
    and a flat set is far from faces, by a finite distance."""
    greys = torch.randint(0, 256, (2,), generator=torch.Generator().manual_seed(4)).tolist()
    flat, other_grey = (torch.full_like(faces[0], grey) for grey in greys)
    assert swd(flat, other_grey, seed=2, descriptors_per_image=16) == {"32": 0.0, "16": 0.0, "avg": 0.0}
    far = swd(flat, faces[0], seed=2, descriptors_per_image=16)
    assert all(np.isfinite(list(far.values())))
    assert far["avg"] > 3 * swd(faces[1], faces[0], seed=2, descriptors_per_image=16)["avg"]


def test_swd_grows_with_added_noise(faces):
    x = faces[0].float() / 127.5 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = [swd(x, (x + sigma * noise).clamp(-1, 1), descriptors_per_image=64) for sigma in (0.02, 0.08, 0.3)]
    avgs, finest = [r["avg"] for r in results], [r["32"] for r in results]
    assert 0 < avgs[0] < avgs[1] < avgs[2], avgs
    assert 0 < finest[0] < finest[1] < finest[2], finest


def test_swd_between_two_draws_is_far_below_swd_to_another_distribution(faces):
    a, b = faces
    rng = torch.Generator().manual_seed(0)
    same = swd(a, b)["avg"]
    # The same pixels with the spatial structure destroyed; the same faces in other colours; uniform noise.
    pixels_shuffled = b.flatten(2)[:, :, torch.randperm(32 * 32, generator=rng)].view_as(b)
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=rng)
    assert same < 0.4 * swd(a, pixels_shuffled)["avg"]
    assert same < 0.7 * swd(a, b[:, [2, 0, 1]])["avg"]
    assert same < 0.3 * swd(a, noise)["avg"]


def test_swd_is_deterministic_by_seed_and_reads_uint8_and_float_alike(faces):
    a, b = faces[0][:32], faces[1][:32]
    first = swd(a, b, seed=5, descriptors_per_image=32)
    assert swd(a, b, seed=5, descriptors_per_image=32) == first
    assert swd(a.float() / 127.5 - 1, b.float() / 127.5 - 1, seed=5, descriptors_per_image=32) == first
    other_seed = swd(a, b, seed=6, descriptors_per_image=32)
    assert other_seed != first
    # A different draw of patches and directions measures the same distance up to sampling noise.
    assert other_seed["avg"] == pytest.approx(first["avg"], rel=0.5)


def test_swd_cut_into_chunks_is_the_swd_of_the_whole_sets(faces):
    """evaluate_models' 2048 images go through the pyramid 256 at a time: each chunk must take its own images'
    patch corners, whatever the chunk size (here 64 images in chunks of 5: a last, partial chunk too)."""
    a, b = faces
    whole = swd(a, b, seed=4, descriptors_per_image=16)
    chunked = swd(a, b, seed=4, descriptors_per_image=16, chunk=5)
    assert list(chunked) == list(whole)
    np.testing.assert_allclose(list(chunked.values()), list(whole.values()), rtol=1e-5)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(5, 3, 32, 32) * 2 - 1, "same shape"),
        (torch.zeros(4, 1, 32, 32), torch.zeros(4, 1, 32, 32), r"\(N, 3, S, S\)"),
        (torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), "size >= 16"),
        (torch.empty(0, 3, 16, 16, dtype=torch.uint8), torch.empty(0, 3, 16, 16, dtype=torch.uint8), ">= 1 image"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.int32), torch.zeros(4, 3, 16, 16, dtype=torch.int32), "uint8 or"),
        (torch.full((4, 3, 16, 16), 200.0), torch.zeros(4, 3, 16, 16), r"\[-1, 1\], got values in \[200, 200\]"),
        (torch.rand(4, 3, 16, 16) * 2 - 1, torch.full((4, 3, 16, 16), float("nan")), r"must lie in \[-1, 1\]"),
        # Just outside, on either side: G's unclamped output is refused here, not clamped unseen (generated_pixels).
        (
            torch.rand(4, 3, 16, 16) * 2 - 1,
            torch.rand(4, 3, 16, 16) * 2.2 - 1,
            r"must lie in \[-1, 1\], got .*, 1\.\d+\]",
        ),
        (
            torch.rand(4, 3, 16, 16) * 2.2 - 1.2,
            torch.rand(4, 3, 16, 16) * 2 - 1,
            r"must lie in \[-1, 1\], got values in \[-1\.\d+",
        ),
    ],
)
def test_swd_rejects_bad_input_with_one_line(a, b, match):
    with pytest.raises(MetricError, match=match):
        swd(a, b)


def test_swd_warns_of_float_images_that_look_like_0_to_1(faces):
    a, b = (x.float() / 255 for x in faces)
    with pytest.warns(UserWarning, match=r"images_a: every value lies in \[0, 1\].*x \* 2 - 1"):
        result = swd(a, b * 2 - 1, seed=1, descriptors_per_image=8)
    assert result["avg"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swd(a * 2 - 1, b * 2 - 1, seed=1, descriptors_per_image=8)


@pytest.mark.cuda
def test_swd_on_cuda_matches_cpu(faces):
    a, b = faces
    cpu = swd(a, b, seed=2)
    gpu = swd(a.cuda(), b.cuda(), seed=2)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def _tiny_models():
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, n=4, h=4)
    return Generator(cfg, impl="torch").eval(), Discriminator(cfg, impl="torch").eval()


def _recon_l1(D, images):
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        return (x - D(x)).abs().mean().item()


def test_evaluate_models_reports_swd_and_the_reconstruction_error_on_the_held_out_images():
    G, D = _tiny_models()
    real, held_out = BuiltinFaces(24, 16, seed=0), BuiltinFaces(6, 16, seed=0, first=24).images
    result = evaluate_models(G, D, real, num=10, seed=1, batch_size=4, held_out=held_out)
    assert result["num"] == 10 and result["image_size"] == 16 and "fid" not in result
    assert set(result["swd"]) == {"16", "avg"} and result["swd"]["avg"] > 0
    # D's error on all six held-out images, in [-1, 1]; without them, on the ten real images SWD compared with.
    assert result["recon_l1"] == pytest.approx(_recon_l1(D, held_out), rel=1e-5)
    without = evaluate_models(G, D, real, num=10, seed=1, batch_size=4)
    assert without["recon_l1"] == pytest.approx(_recon_l1(D, real.images[:10]), rel=1e-5)
    assert without["swd"] == result["swd"]
    # Real images as a tensor (of more than num): its first num images, as the Dataset's.
    assert evaluate_models(G, D, real.images, num=10, seed=1, batch_size=4) == without
    assert evaluate_models(G, D, real, num=10, seed=1, batch_size=7, held_out=held_out) == result
    assert evaluate_models(G, D, real, num=10, seed=2, batch_size=4)["swd"] != result["swd"]


def test_evaluate_models_draws_its_z_from_its_seed():
    """The samples' z comes from the evaluation's seed: SWD's projections take the seed too, so a z that ignored it
    still changed the score with the seed, and passed the test above."""
    G, D = _tiny_models()
    real = BuiltinFaces(24, 16, seed=0)
    drawn = []
    G.register_forward_hook(lambda module, inputs, output: drawn.append(inputs[0].clone()))

    def z_of(seed):
        drawn.clear()
        evaluate_models(G, D, real, num=10, seed=seed, batch_size=4)
        return torch.cat(drawn)

    assert torch.equal(z_of(1), z_of(1))
    assert not torch.equal(z_of(1), z_of(2))


def test_evaluate_models_records_no_autograd_graph():
    """evaluate.py calls it with autograd on: the graph kept with each batch's reconstruction errors held D's
    activations until the end (paper64 in float32: 15 MiB per image, 61 GiB at --num 4096)."""
    G, D = _tiny_models()
    grad_modes = []
    for network in (G, D):
        network.register_forward_hook(lambda module, inputs, output: grad_modes.append(torch.is_grad_enabled()))
    evaluate_models(G, D, BuiltinFaces(24, 16, seed=0), num=10, seed=1, batch_size=4)
    assert grad_modes and not any(grad_modes)


def test_evaluation_noise_is_not_the_stream_that_draws_a_runs_weights():
    """torch.manual_seed(seed) drew the initial weights of a run of that seed: z from a generator seeded alike
    would be rescaled rows of G's first layer (each sample's h0 spiking in one unit)."""
    G, D = _tiny_models()
    zs = []
    G.register_forward_pre_hook(lambda module, args: zs.append(args[0].clone()))
    evaluate_models(G, D, BuiltinFaces(8, 16, seed=0), num=8, seed=3)
    weights_stream = torch.rand(8, G.cfg.z_size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.cat(zs).shape == weights_stream.shape and not torch.allclose(torch.cat(zs), weights_stream, atol=1e-3)
    # z ~ U(-1, 1), the prior G was trained on: not U(0, 1).
    z = torch.cat(zs)
    assert -1 <= z.min() < -0.5 and 0.5 < z.max() <= 1


def test_evaluate_models_scores_in_float32_under_the_callers_autocast_with_its_seed():
    """A training run with --amp evaluates under its autocast: G and D run in it, but SWD must be the float32 SWD
    (drawn from the evaluation's seed) of the samples G made, not one projected and sorted in bfloat16."""
    G, D = _tiny_models()
    real = BuiltinFaces(12, 16, seed=0).images
    outputs = []
    G.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = evaluate_models(G, D, real, num=12, seed=5, batch_size=8)
    fake = torch.cat([(output.clamp(-1, 1) + 1).mul(127.5).round().to(torch.uint8) for output in outputs])
    assert fake.shape == real.shape
    assert result["swd"] == swd(fake, real, seed=5)


def test_evaluate_models_rejects_a_too_small_or_mismatched_real_set():
    G, D = _tiny_models()
    with pytest.raises(MetricError, match="10 images to compare, but the real images are only 5; compare fewer"):
        evaluate_models(G, D, BuiltinFaces(5, 16, seed=0), num=10)
    with pytest.raises(MetricError, match="6 images to compare, but the real images are only 5; compare fewer"):
        evaluate_models(G, D, BuiltinFaces(5, 16, seed=0).images, num=6)
    with pytest.raises(MetricError, match="real images are 32x32, the model makes 16x16"):
        evaluate_models(G, D, BuiltinFaces(4, 32, seed=0).images, num=4)
    held_out = BuiltinFaces(4, 32, seed=1).images
    with pytest.raises(MetricError, match="held-out images are 32x32, the model makes 16x16"):
        evaluate_models(G, D, BuiltinFaces(4, 16, seed=0).images, num=4, held_out=held_out)


@pytest.mark.parametrize(
    "network, message", [("G", r"G\(z\) holds NaN or inf"), ("D", "D's reconstructions hold NaN or inf")]
)
def test_evaluate_models_refuses_a_diverged_network(network, message):
    G, D = _tiny_models()
    with torch.no_grad():
        {"G": G, "D": D}[network].decoder.fc.bias.fill_(float("nan"))
    with pytest.raises(MetricError, match=message):
        evaluate_models(G, D, BuiltinFaces(4, 16, seed=0).images, num=4)


def _stand_in_weights(tmp_path):
    """A weights file that passes require_fid's check (a state dict with the Inception's first conv), for the tests
    whose torch-fidelity is a stand-in that never reads it."""
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(_inception_like(), weights)
    return weights


AUX_LOGITS = {"AuxLogits.fc.weight": torch.zeros(1)}  # torchvision's Inception's auxiliary classifier


def _inception_like(classes: int = 1008, **more) -> dict:
    """A state dict with the keys check_inception_weights reads, of their shapes (a stored element, expanded)."""
    return {INCEPTION_STATE_KEY: torch.zeros(1), "fc.weight": torch.zeros(1).expand(classes, 2048), **more}


def _stand_in_torch_fidelity(monkeypatch, calculate_metrics, key):
    fake = types.ModuleType("torch_fidelity")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None)
    fake.calculate_metrics, fake.KEY_METRIC_FID = calculate_metrics, key
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)


def test_fid_without_weights_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(FIDUnavailableError) as error:
        fid(images, images)
    message = str(error.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--inception-weights" in message and "\n" not in message
    with pytest.raises(FIDUnavailableError, match="is not a file"):
        inception_weights_path(tmp_path / "missing.pth")


def test_fid_finds_the_weights_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILE).write_bytes(b"")
    assert inception_weights_path() == tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILE


def test_fid_without_torch_fidelity_says_how_to_install(tmp_path):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed")
    with pytest.raises(FIDUnavailableError, match=r"^FID needs torch-fidelity and torchvision: pip install"):
        require_fid(_stand_in_weights(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot be read by torch.load (EOFError)"),
        (b"not weights", "cannot be read by torch.load (UnpicklingError)"),
        (torch.zeros(3), f"are not torch-fidelity's Inception state dict (no {INCEPTION_STATE_KEY})"),
        ({"G": {"decoder.fc.weight": torch.zeros(1)}}, "are not torch-fidelity's Inception state dict"),  # a checkpoint
        # torchvision's ImageNet Inception: the same first conv, 1000 classes and an auxiliary classifier.
        (_inception_like(1000, **AUX_LOGITS), "are not the FID network's (its fc.weight is 1000 x 2048, the FID"),
        (_inception_like(**AUX_LOGITS), "are not the FID network's (its fc.weight is 1008 x 2048, the FID"),
        ({INCEPTION_STATE_KEY: torch.zeros(1)}, "are not the FID network's (its fc.weight is none"),
    ],
)
def test_fid_refuses_a_weights_file_that_is_not_torch_fidelitys_inception(tmp_path, monkeypatch, content, message):
    """Checked up front, in one line: torch-fidelity would end in a traceback from torch.load, or from its strict
    load_state_dict (torchvision's Inception), after the SWD."""
    _stand_in_torch_fidelity(monkeypatch, None, "fid")
    weights = tmp_path / "w.pth"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    else:
        torch.save(content, weights)
    with pytest.raises(FIDUnavailableError) as error:
        require_fid(weights)
    assert str(error.value).startswith(f"the Inception weights {weights} {message}") and "\n" not in str(error.value)
    assert INCEPTION_WEIGHTS_FILE in str(error.value)
    assert require_fid(_stand_in_weights(tmp_path)) == tmp_path / INCEPTION_WEIGHTS_FILE


unpickled = []


def _run_on_load():
    unpickled.append(1)
    return torch.zeros(1)


class _CodeOnLoad:
    """An object whose unpickling runs a function: what a malicious weights file would hold."""

    def __reduce__(self):
        return _run_on_load, ()


def test_fid_reads_the_weights_file_without_running_what_it_holds(tmp_path, monkeypatch):
    """The weights file is a download from the internet: it is read with torch.load(weights_only=True), which
    refuses to unpickle anything but tensors and plain containers, never running code it holds."""
    _stand_in_torch_fidelity(monkeypatch, None, "fid")
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(_inception_like(**{INCEPTION_STATE_KEY: _CodeOnLoad()}), weights)
    unpickled.clear()
    with pytest.raises(FIDUnavailableError, match=r"cannot be read by torch.load \(UnpicklingError\)"):
        require_fid(weights)
    assert unpickled == []


def test_fid_without_weights_or_torch_fidelity_says_both_at_once(tmp_path, monkeypatch):
    """Not one, then after the user mends it, the other."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else find_spec(name, *a)
    )
    with pytest.raises(FIDUnavailableError) as error:
        require_fid()
    message = str(error.value)
    assert INCEPTION_WEIGHTS_FILE in message and "pip install torch-fidelity torchvision" in message
    assert "\n" not in message


def test_fid_hands_torch_fidelity_uint8_image_datasets_and_the_weights(tmp_path, monkeypatch):
    calls = {}

    def calculate_metrics(**kwargs):
        calls.update(kwargs)
        return {"frechet_inception_distance": 12.5}

    _stand_in_torch_fidelity(monkeypatch, calculate_metrics, "frechet_inception_distance")
    weights = _stand_in_weights(tmp_path)
    a = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert fid(a, b, weights=weights, batch_size=5) == 12.5
    assert calls["fid"] and calls["feature_extractor_weights_path"] == str(weights) and not calls["cuda"]
    assert calls["batch_size"] == 5  # evaluate.py's --batch-size bounds torch-fidelity's memory too
    assert len(calls["input1"]) == 3 and torch.equal(calls["input1"][2], a[2]) and torch.equal(calls["input2"][0], b[0])


def test_fid_runs_torch_fidelity_on_the_cuda_device_it_is_given(tmp_path, monkeypatch):
    """torch-fidelity's cuda=True means the current CUDA device: --device cuda:1 must be made the current one while
    it runs, not leave it on cuda:0 (a stand-in for torch.cuda.device records it; no GPU is needed)."""
    current, seen = [], []

    @contextlib.contextmanager
    def cuda_device(device):
        current.append(device)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    _stand_in_torch_fidelity(
        monkeypatch, lambda **kwargs: seen.append((list(current), kwargs["cuda"])) or {"f": 1}, "f"
    )
    images, weights = torch.zeros(2, 3, 16, 16, dtype=torch.uint8), _stand_in_weights(tmp_path)
    for device in ("cuda:1", "cpu"):
        assert fid(images, images, weights=weights, device=device) == 1
    assert seen == [([torch.device("cuda:1")], True), ([], False)]


def test_evaluate_models_refuses_fid_of_one_image_and_a_non_finite_fid(tmp_path, monkeypatch):
    """One image has no covariance (torch-fidelity then fails inside numpy, or returns NaN): refused before G runs;
    a FID that still comes out NaN is one line, not a NaN written into the JSON report."""
    _stand_in_torch_fidelity(monkeypatch, lambda **kwargs: {"fid": float("nan")}, "fid")
    weights = _stand_in_weights(tmp_path)
    G, D = _tiny_models()
    real, fid_args = BuiltinFaces(4, 16, seed=0).images, {"with_fid": True, "inception_weights": str(weights)}
    with pytest.raises(MetricError, match="must be >= 2 for FID"):
        evaluate_models(G, D, real, num=1, **fid_args)
    assert "fid" not in evaluate_models(G, D, real, num=1)  # SWD alone takes one image
    with pytest.raises(MetricError, match="FID of 4 images came out nan"):
        evaluate_models(G, D, real, num=4, **fid_args)


def test_evaluate_models_hands_fid_and_swd_its_samples_and_the_real_images(tmp_path, monkeypatch):
    """FID and SWD each get G's samples (rounded to uint8 as a saved image) against the first `num` real images: an
    evaluation that passed torch-fidelity the real images twice scored 0 and passed every other test here. The
    samples are recomputed here from z ~ U(-1, 1) drawn from the evaluation's seed."""
    compared = {}

    def calculate_metrics(**kwargs):
        compared["fid"] = kwargs["input1"], kwargs["input2"]
        return {"f": 3.0}

    def recorded_swd(a, b, **kwargs):
        compared["swd"] = a, b
        return swd(a, b, **kwargs)

    _stand_in_torch_fidelity(monkeypatch, calculate_metrics, "f")
    monkeypatch.setattr(metrics, "swd", recorded_swd)
    G, D = _tiny_models()
    real = BuiltinFaces(24, 16, seed=0)
    fid_args = {"with_fid": True, "inception_weights": str(_stand_in_weights(tmp_path))}
    assert evaluate_models(G, D, real, num=10, seed=5, batch_size=4, **fid_args)["fid"] == 3.0
    z = torch.rand(10, G.cfg.z_size, generator=generator(5, SAMPLING)) * 2 - 1
    with torch.no_grad():
        samples = ((G(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    fid_fake, fid_real = (torch.stack([dataset[i] for i in range(len(dataset))]) for dataset in compared["fid"])
    assert torch.equal(fid_fake, samples) and torch.equal(fid_real, real.images[:10])
    assert torch.equal(compared["swd"][0], samples) and torch.equal(compared["swd"][1], real.images[:10])


def test_fid_through_torch_fidelity_is_a_distance_on_stand_in_weights(tmp_path, monkeypatch, faces):
    """The whole FID path through the real library (skipped where began-fast[fid] is not installed). The standard
    weights may not be at hand, so the network is He-initialised at random: its FID cannot be compared with
    published numbers, but it is still a distance between the sets' feature statistics."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:  # the network's shapes without loading any weights
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr(torch, "load", lambda *args, **kwargs: {})
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(value.shape, generator=generator) * (2 / value[0].numel()) ** 0.5
        if value.dim() == 4
        else value
        for name, value in network.state_dict().items()
    }
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(state, weights)
    draw_a, draw_b = faces
    noise = torch.randint(0, 256, draw_a.shape, dtype=torch.uint8, generator=generator)
    itself, two_draws, against_noise = (fid(draw_a, other, weights=weights) for other in (draw_a, draw_b, noise))
    assert abs(itself) < 1e-4 * against_noise
    assert 0 < two_draws < 0.1 * against_noise
