"""BEGAN training steps.

`ReferenceStep` is the specification of one step (docs/DESIGN.md section 3): eager float32, plain autograd, G and D
updated simultaneously from the same forward pass (as carpedm20/BEGAN-tensorflow's grouped optimizers), L_D's
gradient applied to D only and L_G's to G only. The fast step (fast_step.py) is checked against it.

A step keeps everything it updates on the device: k_t, the learning rate, the lr-decay window and the running
statistics. It never reads a number back to the host; the loop does that every `log_every` steps.

Under torchrun a step holds `collectives` (distributed.py) and calls them at two fixed points: the gradients are
averaged over the ranks after backward and before the optimizers, and k_t, M and the statistics come from the
losses averaged over the ranks. With collectives=None (a single process) the step is exactly the one-GPU step.
"""

from __future__ import annotations

import contextlib

import torch

from began_fast.config import TrainConfig
from began_fast.distributed import Collectives, lr_factor
from began_fast.model import Discriminator, Generator, carry_at
from began_fast.reference import BalanceResult, began_objective
from began_fast.seeds import NOISE, NOISE_RESTART, derived_seed, generator, uniform_z
from began_fast.stats import MStallDecay, RunningStats


def balance_stats(res: BalanceResult, k: torch.Tensor) -> torch.Tensor:
    """The values RunningStats sums, in STAT_NAMES order (k is k_t, the value this step used)."""
    return torch.stack([res.l_real, res.l_fake, res.l_d, res.l_g, k, res.m]).detach().float()


@contextlib.contextmanager
def ieee_float32():
    """PyTorch's float32 convolutions and matmuls in IEEE float32 inside the block. By default PyTorch lets cuDNN's
    float32 convolutions round their inputs to TF32 (10 mantissa bits) on Ampere and later GPUs: a float32 step
    would not be one. Under bf16 / fp16 autocast the layers run in half precision and this changes nothing.
    Through PyTorch's fp32_precision settings, and the older matmul precision too where it can be read: PyTorch
    refuses to read a TF32 setting when the two disagree (a user's allow_tf32 = True or set_float32_matmul_precision
    ("high") against the newer setting made here), as its TunableOp GEMMs do, and `torch.backends.cuda.matmul.
    allow_tf32` in a hook. torch.backends.cudnn.allow_tf32 cannot be read inside the block (PyTorch 2.11 to 2.13
    refuse to): code run in a float32 step must read the fp32_precision settings instead."""
    backends = torch.backends.cudnn.conv, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = [backend.fp32_precision for backend in backends]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user's settings already mix the two APIs: the older one is left as it is
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")  # also sets the matmuls' fp32_precision to "ieee"
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, value in zip(backends, saved, strict=True):  # after: set_float32_matmul_precision changes them
            backend.fp32_precision = value


class StepState:
    """What every BEGAN step holds besides the networks: Adam for G and D sharing one lr tensor, k_t, the lr
    decay, the running statistics, and the noise generator (its state is saved so that a resume is exact).

    collectives: None for a single process; under torchrun, this rank's view of the job. The lr and its floor are
    cfg's scaled by lr_factor(cfg.lr_scaling, world_size); cfg.batch_size is the per-rank batch.
    """

    def __init__(
        self,
        G: Generator,
        D: Discriminator,
        cfg: TrainConfig,
        device: torch.device,
        *,
        fused=False,
        collectives: Collectives | None = None,
    ):
        self.G, self.D, self.cfg, self.device = G, D, cfg, torch.device(device)
        self.collectives = collectives
        self.world_size = collectives.world_size if collectives is not None else 1
        self.rank = collectives.rank if collectives is not None else 0
        self.lr_factor = lr_factor(cfg.lr_scaling, self.world_size)
        self.lr = torch.tensor(cfg.lr * self.lr_factor, dtype=torch.float32, device=self.device)
        on_cuda = self.device.type == "cuda"
        # A tensor lr lets the decay change it in place on the device. Off CUDA, Adam takes a tensor lr only
        # without foreach; on CUDA, the capturable implementations read it on the device (fused Adam too must be
        # capturable for torch.optim to allow its step inside a CUDA graph capture).
        adam = dict(lr=self.lr, betas=cfg.betas, capturable=on_cuda, fused=fused or None)
        if not on_cuda:
            adam["foreach"] = False
        self.opt_g = torch.optim.Adam(G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), **adam)
        self.k = torch.zeros((), dtype=torch.float32, device=self.device)
        self.decay = MStallDecay(self.lr, cfg.lr_decay_window, cfg.lr_decay_factor, cfg.lr_floor * self.lr_factor)
        self.stats = RunningStats(self.device)
        self.z_gen = generator(cfg.seed, NOISE, device=self.device)  # not the weights' stream (seeds.py)
        self.noise_restarted = False  # set by load_state_dict when the saved noise stream cannot go on here
        self.steps_done = 0

    def autocast(self):
        """The precision the networks run in, in the step and outside it (pictures, evaluation): float32 here."""
        return ieee_float32()

    def draw_z(self, batch_size: int) -> torch.Tensor:
        """z ~ U(-1, 1), (batch_size, z_size), drawn on the device from the step's own generator.

        Every rank draws the global batch's noise, (batch_size * world_size) rows from the shared seed, and keeps
        its rows [rank * batch_size, (rank + 1) * batch_size): the ranks' z together are the z of one process with
        the global batch, and every rank's generator stays in the same state (the one a checkpoint saves).
        """
        dtype = self.G.decoder.fc.weight.dtype
        rows = batch_size * self.world_size
        z = uniform_z(rows, self.G.cfg.z_size, self.z_gen, device=self.device, dtype=dtype)
        return z[self.rank * batch_size : (self.rank + 1) * batch_size]

    def average_over_ranks(self, res: BalanceResult) -> BalanceResult:
        """After backward, before the optimizers: G's and D's gradients averaged over the ranks, and the step's
        statistics (k_next, M, the losses) from the global means. Unchanged for a single process."""
        if self.collectives is None:
            return res
        self.collectives.average_gradients(list(self.D.parameters()))
        self.collectives.average_gradients(list(self.G.parameters()))
        return self.collectives.global_balance(res, self.k, self.cfg.gamma, self.cfg.lambda_k)

    def set_carry(self) -> None:
        if self.G.cfg.vanishing_residual:
            carry = carry_at(self.steps_done, self.G.cfg)
            self.G.set_carry(carry)
            self.D.set_carry(carry)

    def precompile(self, batch_shape, threads: int):
        """Compile every Triton kernel a step launches, each config its autotuning will try, on `threads` CPU threads
        at once, before the first step launches them one compile after another (kernels.precompile): a dry run of
        the step on a zero batch of `batch_shape`, whose launches are compiles, then undone (snapshot / restore), so
        the run goes on exactly as if it had not happened. Returns the kernels.precompile.Precompiled counts."""
        from kernels.precompile import precompile  # Triton: on the triton impl only

        snap, collectives, steps_done = self.snapshot(), self.collectives, self.steps_done
        x = torch.zeros(batch_shape, dtype=torch.float32, device=self.device)
        # Without the all-reduces (they launch no Triton kernel): each rank's dry run is its own, so one that stops
        # on one rank cannot leave the ranks' collectives out of step.
        self.collectives = None
        try:
            return precompile(lambda: self(x), threads)
        finally:
            self.collectives, self.steps_done = collectives, steps_done
            self.restore(snap)

    # The head start's dry run, and the warm-up before a CUDA graph capture, run steps; these put everything they
    # change back afterwards, in place (a graph holds the addresses), so the run follows the same trajectory.
    def snapshot(self) -> dict:
        return {"tensors": [(t, t.clone()) for t in self._mutable_tensors()], "z_gen": self.z_gen.get_state()}

    def restore(self, snap: dict) -> None:
        saved = {id(t) for t, _ in snap["tensors"]}
        with torch.no_grad():
            for t, copy in snap["tensors"]:
                t.copy_(copy)
            # Adam's state is created by the first update: state that did not exist at the snapshot is reset to
            # zero, which is what a first update starts from.
            for t in self._optimizer_state():
                if id(t) not in saved:
                    t.zero_()
        self.z_gen.set_state(snap["z_gen"])

    def _optimizer_state(self) -> list[torch.Tensor]:
        opt_states = [state for opt in (self.opt_g, self.opt_d) for state in opt.state.values()]
        return [value for state in opt_states for value in state.values() if torch.is_tensor(value)]

    def _mutable_tensors(self) -> list[torch.Tensor]:
        tensors = [p.data for net in (self.D, self.G) for p in net.parameters()] + self._optimizer_state()
        tensors += [self.k, self.stats.sums, self.stats.count]
        return tensors + [self.decay.lr, self.decay.m_sum, self.decay.count, self.decay.best]

    def state_dict(self) -> dict:
        return {
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "k": self.k.clone(),
            "decay": self.decay.state_dict(),
            "z_gen": self.z_gen.get_state(),
            "steps_done": self.steps_done,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt_g.load_state_dict(_with_own_implementation(state["opt_g"], self.opt_g))
        self.opt_d.load_state_dict(_with_own_implementation(state["opt_d"], self.opt_d))
        self.decay.load_state_dict(state["decay"])
        # A run resumed on another number of ranks keeps its (possibly decayed) lr, rescaled by the lr rule.
        saved_factor = lr_factor(self.cfg.lr_scaling, state.get("world_size", 1))
        self.lr.mul_(self.lr_factor / saved_factor)
        # load_state_dict put the saved lr tensors into the param groups: point them back at the shared one.
        for group in self.opt_g.param_groups + self.opt_d.param_groups:
            group["lr"] = self.lr
        self.k.copy_(state["k"])
        self.steps_done = state["steps_done"]
        saved_noise = state["z_gen"]
        if saved_noise.numel() == self.z_gen.get_state().numel():
            self.z_gen.set_state(saved_noise)
        else:  # another kind of device's generator (CPU: a 5056-byte Mersenne Twister; CUDA: a 16-byte Philox)
            self.z_gen.manual_seed(derived_seed(self.cfg.seed, NOISE_RESTART, self.steps_done))
            self.noise_restarted = True
        self.set_carry()


# Adam's settings that say how it steps, not what it computes: they belong to this step (reference or fast, CPU
# or CUDA graph), not to the checkpoint, which may come from another kind of step or device.
ADAM_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def _with_own_implementation(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved optimizer state with `optimizer`'s implementation settings in its param groups (load_state_dict
    would otherwise take the saved ones, and then place Adam's step counters for them)."""
    groups = [
        {**group, **{key: own[key] for key in ADAM_IMPLEMENTATION if key in own}}
        for group, own in zip(saved["param_groups"], optimizer.param_groups, strict=False)
    ]
    return {**saved, "param_groups": groups}


class ReferenceStep(StepState):
    """One BEGAN step in eager float32 with plain autograd: the specification of a training step."""

    @ieee_float32()  # forward, backward and Adam
    def __call__(self, x: torch.Tensor) -> BalanceResult:
        cfg, G, D = self.cfg, self.G, self.D
        self.set_carry()
        z = self.draw_z(x.shape[0])
        fake = G(z)
        rx, rfake = D(x), D(fake)
        res = began_objective(x, rx, fake, rfake, self.k, cfg.gamma, cfg.lambda_k)
        d_params, g_params = list(D.parameters()), list(G.parameters())
        # Both gradients from the same forward pass: L_D to D's parameters only, L_G to G's only (through D).
        grads_d = torch.autograd.grad(res.l_d, d_params, retain_graph=True)
        grads_g = torch.autograd.grad(res.l_g, g_params)
        for p, g in zip(d_params + g_params, grads_d + grads_g, strict=True):
            p.grad = g
        res = self.average_over_ranks(res)
        self.opt_d.step()
        self.opt_g.step()
        self.stats.add(balance_stats(res, self.k))
        self.k.copy_(res.k_next)
        self.decay.update(res.m)
        self.steps_done += 1
        return res
