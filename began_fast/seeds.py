"""A run's random streams, each seeded apart so that no two of them draw the same numbers.

The run's seed s seeds torch's global generator, which draws G's and D's initial weights (torch.manual_seed(s) just
before the networks are built). Every other stream of a run, and the z of evaluations and samples, seeds its own
generator with derived_seed(s, its tag, ...): a generator seeded with s itself would, on the CPU, be the same
Mersenne Twister in the same state as the one that drew the weights, and would draw them again (the step's z would
each be a rescaled row of G's first layer). SWD's patch positions and directions, which never reach a network, keep
a generator seeded with the evaluation's seed.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream tags: the data order's permutations (per epoch) and flips (per step); the step's noise z, and its restart
# where a checkpoint's generator cannot go on (per step); the fixed z of the sample grids; the z of evaluations and
# of scripts/sample.py.
PERMUTATION, FLIPS, NOISE_RESTART, NOISE, FIXED_Z, SAMPLING = range(6)


def derived_seed(*key: int) -> int:
    """One 64-bit seed for the tuple `key`: SeedSequence hashes the whole tuple, so (seed, epoch) pairs never
    collide the way seed + epoch would."""
    return int(np.random.SeedSequence([k % 2**64 for k in key]).generate_state(1, np.uint64)[0])


def uniform_z(rows: int, z_size: int, generator: torch.Generator, **factory) -> torch.Tensor:
    """The paper's noise, z ~ U(-1, 1), (rows, z_size), drawn from `generator` (factory: torch.rand's device and
    dtype)."""
    return torch.rand(rows, z_size, generator=generator, **factory) * 2 - 1


def generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with derived_seed(*key)."""
    return torch.Generator(device=device).manual_seed(derived_seed(*key))
