"""Training statistics kept on the device and read rarely.

Each step adds its statistics to device-side sums (one small tensor op, no host sync); the loop reads the means
every `log_every` steps with one copy, which is the only point a step's numbers reach the host.
"""

from __future__ import annotations

import torch

STAT_NAMES = ("l_real", "l_fake", "l_d", "l_g", "k", "m")


def accumulate(total: torch.Tensor, count: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None) -> None:
    """total += value and count += 1 in place, on the device; with `valid` (a 0-dim bool tensor) False, a skipped
    step (an fp16 overflow), neither moves."""
    if valid is None:
        total.add_(value)
        count.add_(1)
    else:
        total.add_(torch.where(valid, value, 0.0))
        count.add_(valid.float())


class RunningStats:
    """Sums of STAT_NAMES over the current logging window, on `device`."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """values: (len(STAT_NAMES),) float32 on the device, in STAT_NAMES order. valid: a 0-dim bool tensor, False
        for a step that was skipped (an fp16 overflow), whose values are left out of the means."""
        accumulate(self.sums, self.count, values, valid)

    def read_and_reset(self) -> dict[str, float]:
        """The window's means as floats (one device-to-host copy), then start a new window."""
        means = (self.sums / self.count.clamp(min=1)).cpu().tolist()
        self.sums.zero_()
        self.count.zero_()
        return dict(zip(STAT_NAMES, means, strict=True))


class MStallDecay:
    """The paper's lr schedule: decay the lr when the convergence measure M stalls.

    M is summed on the device over windows of `window` steps; at a window's end, if its mean is no lower than the
    best window mean so far, lr <- max(lr * factor, floor). Everything, the window's step count included, stays in
    device tensors (the lr tensor is the one the optimizers read), so the decision needs no host sync and the same
    ops run every step: they can live inside a CUDA graph.
    """

    def __init__(self, lr: torch.Tensor, window: int, factor: float, floor: float):
        self.lr, self.window, self.factor, self.floor = lr, window, factor, floor
        self.m_sum = torch.zeros((), dtype=torch.float32, device=lr.device)
        self.count = torch.zeros((), dtype=torch.float32, device=lr.device)
        self.best = torch.full((), float("inf"), dtype=torch.float32, device=lr.device)

    def update(self, m: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add this step's M (0-dim float32); at a window's end, decide the decay. Only device ops.
        valid: a 0-dim bool tensor, False for a skipped step, which then does not count."""
        accumulate(self.m_sum, self.count, m, valid)
        at_end = self.count >= self.window
        mean = self.m_sum / self.window
        decayed = torch.clamp(self.lr * self.factor, min=self.floor)
        self.lr.copy_(torch.where(at_end & (mean >= self.best), decayed, self.lr))
        self.best.copy_(torch.where(at_end, torch.minimum(self.best, mean), self.best))
        keep = (~at_end).float()
        self.m_sum.mul_(keep)
        self.count.mul_(keep)

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in ("lr", "m_sum", "count", "best")}

    def load_state_dict(self, state: dict) -> None:
        for name in ("lr", "m_sum", "count", "best"):
            getattr(self, name).copy_(state[name])
