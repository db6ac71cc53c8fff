"""Configuration dataclasses and the named presets.

Every value is checked when the dataclass is built, so a bad value fails at once with one line that says
what was wrong and what is expected (`ConfigError`), never deep inside a training step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

IMAGE_SIZES = (16, 32, 64, 128, 256)
# A batch draws its images from the data set without repeats, so it is at most the data set's size: this is five times
# CelebA's 202,599, and keeps a mistyped batch from sizing tensors past what torch can allocate (2**62 overflows).
MAX_BATCH_SIZE = 2**20
# The positive normal float32 numbers, which the lr is held in (a tensor, so that CUDA graphs see its decay)
FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)
LR_SCALINGS = ("none", "linear", "sqrt")


class ConfigError(ValueError):
    """A configuration value is out of range; the message is one line meant for the user."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_integers(config, ranges: dict[str, tuple[int, int | None]], optional: tuple[str, ...] = ()) -> None:
    """Each field named in `ranges` of the frozen dataclass `config` must be an integer in [low, high] (high None: no
    bound), and is stored as a Python int: a NumPy integer (a sweep's np.arange) is one; a float is not (steps=1e5 would
    reach range() as a float, deep in the loop), nor a bool (True is an int to Python, not a number of filters). The
    `optional` fields may be None."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not (ok and low <= value and (high is None or value <= high)):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{name} must be {'None or ' * (name in optional)}an integer {bounds}, got {value!r}")
        object.__setattr__(config, name, int(value))


def _require_bools(config, names: tuple[str, ...]) -> None:
    """Each named field must be True or False (a string "no" would be true)."""
    for name in names:
        value = getattr(config, name)
        _require(isinstance(value, bool), f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The BEGAN architecture (docs/DESIGN.md section 2).

    image_size: S in {16, 32, 64, 128, 256}; the networks work on `num_scales = log2(S/8) + 1` scales.
    n: filters per conv (the encoder's scale i has n*(i+1)). h: embedding size. z_dim: noise size (h if None).
    skip: the paper's skip connections from the decoder's 8x8 tensor to every scale.
    vanishing_residual: blend each shape-preserving ELU conv with its input, the input's weight going from
    1 to 0 over `carry_steps` steps.
    """

    image_size: int = 64
    n: int = 128
    h: int = 64
    z_dim: int | None = None
    skip: bool = False
    vanishing_residual: bool = False
    carry_steps: int = 16000

    def __post_init__(self) -> None:
        _require_integers(self, {"image_size": (IMAGE_SIZES[0], IMAGE_SIZES[-1])})  # 64.0 is in IMAGE_SIZES too
        _require(
            self.image_size in IMAGE_SIZES,
            f"image_size must be a power of two in 16..256 (one of {IMAGE_SIZES}), got {self.image_size}",
        )
        _require_integers(self, {name: (1, None) for name in ("n", "h", "z_dim", "carry_steps")}, optional=("z_dim",))
        _require_bools(self, ("skip", "vanishing_residual"))

    @property
    def z_size(self) -> int:
        return self.h if self.z_dim is None else self.z_dim

    @property
    def num_scales(self) -> int:
        return (self.image_size // 8).bit_length()

    def describe(self) -> str:
        """One line for a run's start: "64 px, n 128, h 64, z 64, no skips[, vanishing residual over N steps]"."""
        line = f"{self.image_size} px, n {self.n}, h {self.h}, z {self.z_size}, {'skips' if self.skip else 'no skips'}"
        return line + (f", vanishing residual over {self.carry_steps} steps" if self.vanishing_residual else "")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: Adam for G and D, the k_t balance, and the lr decay on a stalled M.

    The lr is multiplied by `lr_decay_factor` when the mean of M over the last `lr_decay_window` steps is
    no lower than the best such window mean seen so far; it never goes below `lr_floor`. The run folder keeps
    `latest.pt` (rewritten every `checkpoint_every` steps) and a snapshot every `snapshot_every` steps (which also
    rewrites latest.pt).
    """

    batch_size: int = 16  # per rank; the global batch is batch_size * world_size
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gamma: float = 0.5
    lambda_k: float = 0.001
    lr_decay_window: int = 3000
    lr_decay_factor: float = 0.5
    lr_floor: float = 2e-5
    steps: int = 450_000
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 5000
    snapshot_every: int = 50_000
    lr_scaling: str = "none"  # lr rule for data-parallel runs: "none", "linear" or "sqrt" in the number of ranks
    eval_every: int = 0  # steps between SWD evaluations (0: never)
    eval_images: int = 512

    def __post_init__(self) -> None:
        counts = ("lr_decay_window", "steps", "log_every", "sample_every", "checkpoint_every", "snapshot_every")
        ranges = {"batch_size": (1, MAX_BATCH_SIZE), "seed": (0, None), "eval_every": (0, None)}
        _require_integers(self, ranges | {name: (1, None) for name in (*counts, "eval_images")})
        _require(self.seed < 2**63 - 1, f"seed must be in [0, 2**63 - 1), got {self.seed}")
        _require(0 < self.lr < math.inf, f"lr must be a finite number > 0, got {self.lr}")
        _require(
            FLOAT32_RANGE[0] <= self.lr <= FLOAT32_RANGE[1],
            f"lr must be in [1.2e-38, 3.4e38], the range of the float32 it is held in, got {self.lr}",
        )
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas}",
        )
        _require(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        _require(0 <= self.lambda_k < math.inf, f"lambda_k must be a finite number >= 0, got {self.lambda_k}")
        _require(0 < self.lr_decay_factor <= 1, f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")
        _require(0 <= self.lr_floor <= self.lr, f"lr_floor must be in [0, lr={self.lr}], got {self.lr_floor}")
        _require(self.lr_scaling in LR_SCALINGS, f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")


CROPS = ("celeba", "center")
SOURCES = ("auto", "builtin", "celeba", "hdf5", "folder")
LOADERS = ("auto", "torch", "gpu", "dali")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are cropped and delivered.

    path: None for the built-in procedural faces, else a CelebA folder, an image folder or an HDF5 file.
    crop: "celeba" takes the 128x128 box at top 50, left 25 of the 178x218 aligned faces (as
    carpedm20/BEGAN-tensorflow); "center" takes a centred square of `crop_size` (the short side if None);
    None takes the source's own default (the CelebA box for a CelebA folder, the centre crop elsewhere).
    Then an antialiased (Lanczos) resize to the model's image size.
    holdout: the last N images of the data set are never trained on; evaluations measure D's reconstruction
    error on them (data/holdout.py). The built-in faces need none: the faces after builtin_count are held out.
    """

    path: str | None = None
    source: str = "auto"
    crop: str | None = None
    crop_size: int | None = None
    flip: bool = True
    # DataLoader workers (DALI threads); None: none for the in-memory built-in set, else up to 8, the rank's core share
    num_workers: int | None = None
    loader: str = "auto"
    builtin_count: int = 10_000
    builtin_seed: int = 0
    holdout: int = 0

    def __post_init__(self) -> None:
        _require(self.source in SOURCES, f"data source must be one of {SOURCES}, got {self.source!r}")
        _require(self.crop is None or self.crop in CROPS, f"crop must be one of {CROPS} or None, got {self.crop!r}")
        _require(self.loader in LOADERS, f"loader must be one of {LOADERS}, got {self.loader!r}")
        ranges = {"crop_size": (1, None), "num_workers": (0, None), "builtin_count": (1, None), "holdout": (0, None)}
        _require_integers(self, ranges | {"builtin_seed": (0, None)}, optional=("crop_size", "num_workers"))
        _require_bools(self, ("flip",))


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    # The paper's setting at 64x64: h=z=64, Adam 1e-4, gamma 0.5, with carpedm20/BEGAN-tensorflow's n=128 and batch
    # 16 (README: what is the paper's and what is a choice). The paper trained on faces of its own, not CelebA.
    "paper64": Preset(ModelConfig(image_size=64, n=128, h=64), TrainConfig(batch_size=16, lr=1e-4, gamma=0.5)),
    # The paper's hyper-parameters at 128x128, in carpedm20's layer layout (G 2.0 M, D 23.2 M parameters).
    "paper128": Preset(ModelConfig(image_size=128, n=128, h=64), TrainConfig(batch_size=16, lr=1e-4, gamma=0.5)),
    # A GPU default for a first run: the paper's model at 64 px with gamma 0.7, the most diverse of the gammas the paper
    # shows (gamma trades diversity for quality), for 50,000 steps. At gamma 0.5 (paper64) G collapsed to one face for
    # the first 10k steps on the built-in faces (README, Results); on a 32 px version on the CPU, gamma 0.7 spread the
    # samples over z 2.4x wider than gamma 0.5 at step 1500, and 0.11 against the data's 0.34 at step 3000.
    "gpu64": Preset(
        ModelConfig(image_size=64, n=128, h=64),
        TrainConfig(gamma=0.7, steps=50_000),
    ),
    # Small enough that a 2-core CPU shows faces forming within minutes (6000 steps: about 10 minutes on this
    # project's 2-core machines, README Results): 32 px, n=16, with the paper's skip connections, which sharpen
    # early samples, a higher lr and gamma 0.7 for diverse faces early on.
    "demo": Preset(
        ModelConfig(image_size=32, n=16, h=32, skip=True),
        TrainConfig(
            batch_size=16,
            lr=5e-4,
            gamma=0.7,
            steps=6000,
            lr_decay_window=1000,
            log_every=50,
            sample_every=500,
            checkpoint_every=1000,
            snapshot_every=2000,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def replace(cfg, **changes):
    """dataclasses.replace that skips None values (unset command-line flags) and re-validates."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
