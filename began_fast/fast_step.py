"""The fast BEGAN step: one D pass over [x; fake], mixed precision, and a CUDA graph of the whole step.

The algebra (docs/DESIGN.md section 3). With one z shared by both losses, the reference step needs D's gradient of
L_D = L_real - k_t L_fake and G's gradient of L_G = L_fake. Both come from ONE backward of L_real + L_fake
through one D pass over the 2B batch [x; fake]:
  - D's weight gradients are sums over samples; giving each fake sample the weight -k_t inside that sum (the
    ops' per-sample `wgrad_scale`) turns grad(L_real + L_fake) into grad(L_real) - k_t grad(L_fake) = grad(L_D);
  - the input gradient of the fake half is left unscaled, so it carries grad(L_fake) into G, where it meets the
    direct term d|fake - D(fake)|/d fake; G's weights see exactly grad(L_G).
The balance op (L1 means, k_t, M) seeds that backward and updates k_t on the device.

Everything a step changes lives in device tensors, so `FastStep.body` is a fixed sequence of device work that
`CudaGraphStep` captures once and replays: G forward, D forward, balance, backward, both fused Adam updates,
k_t, the lr decay and the running statistics (and, with a GPU-resident data set, drawing the batch). Under
torchrun the body also holds the NCCL all-reduces of the gradients and of the losses (distributed.py), which a
CUDA graph captures too (NCCL >= 2.9.6).
"""

from __future__ import annotations

import torch

from began_fast import ops
from began_fast.distributed import Collectives
from began_fast.model import Discriminator, Generator, carry_at
from began_fast.step import StepState, balance_stats, ieee_float32

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DynamicLossScale:
    """fp16 loss scaling decided on the device, as torch.amp.GradScaler does it but without any host sync.

    The loss is multiplied by `scale` before backward; the gradients are unscaled and checked in one fused op
    that sets `found_inf`; the fused Adam updates skip themselves when found_inf is set; the scale is halved
    after an overflow and doubled after `growth_interval` clean steps.
    """

    def __init__(self, device, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())

    def update(self) -> None:
        torch._amp_update_scale_(
            self.scale,
            self.growth_tracker,
            self.found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


class FastStep(StepState):
    """One BEGAN step as a single D pass with per-sample weight-gradient scales; optional bf16 / fp16 autocast.

    amp: None (float32), "bf16" (autocast; float32 master weights, optimizer state, losses, k_t and M) or "fp16"
    (the same plus DynamicLossScale). impl: the ops' impl for the balance (the networks carry their own).
    collectives: None for a single process, else the ranks the gradients and losses are averaged over.
    """

    def __init__(
        self,
        G: Generator,
        D: Discriminator,
        cfg,
        device,
        *,
        amp: str | None = None,
        impl="auto",
        collectives: Collectives | None = None,
    ):
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {sorted(AMP_DTYPES)}, got {amp!r}")
        super().__init__(G, D, cfg, device, fused=True, collectives=collectives)
        self.amp, self.impl = amp, impl
        self.loss_scale = DynamicLossScale(self.device) if amp == "fp16" else None
        # The fused Adam kernels skip their update when found_inf is set: a device-side skip, no host branch.
        for opt in (self.opt_g, self.opt_d):
            opt.found_inf = self.loss_scale.found_inf if self.loss_scale else None
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.device)  # for the residual's carry
        self.ones = torch.ones(cfg.batch_size, dtype=torch.float32, device=self.device)

    def autocast(self):
        if self.amp is None:
            return ieee_float32()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    @ieee_float32()  # in float32, the backward's PyTorch convolutions too (the forward's: autocast() above)
    def body(self, x: torch.Tensor) -> None:
        """All of one step's device work, and nothing on the host: what a CUDA graph captures."""
        cfg, G, D, b = self.cfg, self.G, self.D, x.shape[0]
        if G.cfg.vanishing_residual:
            carry = carry_at(self.step_count, G.cfg)
            G.set_carry(carry)
            D.set_carry(carry)
        for opt in (self.opt_g, self.opt_d):
            opt.zero_grad(set_to_none=True)
        z = self.draw_z(b)
        # Real images get weight +1 in D's weight gradients, fakes -k_t (see the module docstring).
        wgrad_scale = torch.cat([self.ones[:b], -self.k.expand(b)])
        with self.autocast():
            fake = G(z)
            # D sees, and the L1 loss compares, the real images in the working precision and in the layout of D's
            # layers (the balance kernel reads one dtype and one layout; it accumulates in float32 whatever it
            # reads): one copy, after which [x; fake] is already as D's first layer reads it.
            x = ops.prepare_activation(x, D.encoder.impl, dtype=fake.dtype)
            recon = D(torch.cat([x, fake]), wgrad_scale=wgrad_scale)
        # split, not two slices: its backward is one cat of the halves' gradients, in their layout, where each
        # slice's backward would write its half into a zero-filled NCHW tensor and the two would then be added.
        recon_x, recon_fake = recon.split(b)
        res = ops.began_balance(x, recon_x, fake, recon_fake, self.k, cfg.gamma, cfg.lambda_k, impl=self.impl)
        seed = res.l_real + res.l_fake
        if self.loss_scale is not None:
            seed = seed * self.loss_scale.scale
        seed.backward()
        # Averaged while still loss-scaled: every rank then unscales the same gradients and agrees on found_inf.
        res = self.average_over_ranks(res)
        valid = None
        if self.loss_scale is not None:
            self.loss_scale.unscale_([p.grad for p in self.parameters() if p.grad is not None])
            valid = self.loss_scale.found_inf == 0
        self.opt_d.step()
        self.opt_g.step()
        self.stats.add(balance_stats(res, self.k), valid)
        self.k.copy_(res.k_next if valid is None else torch.where(valid, res.k_next, self.k))
        self.decay.update(res.m, valid)
        if self.loss_scale is not None:
            self.loss_scale.update()
        self.step_count.add_(1)

    def __call__(self, x: torch.Tensor) -> None:
        self.body(x)
        self.steps_done += 1

    def parameters(self):
        return list(self.D.parameters()) + list(self.G.parameters())

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step_count.fill_(self.steps_done)
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.load_state_dict(state["loss_scale"])
        for opt in (self.opt_g, self.opt_d):
            opt.found_inf = self.loss_scale.found_inf if self.loss_scale else None

    def _mutable_tensors(self) -> list[torch.Tensor]:
        tensors = super()._mutable_tensors() + [self.step_count]
        if self.loss_scale is not None:
            tensors += [self.loss_scale.scale, self.loss_scale.growth_tracker]
        return tensors


class CudaGraphStep:
    """Capture `step.body` once in a CUDA graph and replay it for every step.

    The batch enters through a static buffer: either a GPU-resident `stream` (GpuResidentStream) gathers it there
    inside the graph (its `sample_into(buffer)` is captured) from the indices each call first stages
    (`stream.stage()`), or each call copies the loader's batch into the buffer.
    Warm-up runs on a side stream (as PyTorch's whole-network capture recipe asks), then everything it changed
    is restored, so the captured run starts exactly where the step was. Under torchrun the warm-up steps' all-
    reduces are also the NCCL warm-up that capturing a collective needs (the communicator must exist before
    capture); the graph then replays the collectives with the rest of the step.
    """

    def __init__(self, step: FastStep, batch_shape, stream=None, warmup_steps: int = 3):
        if step.device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device")
        self.step, self.stream = step, stream
        self.static_x = torch.zeros(batch_shape, dtype=torch.float32, device=step.device)
        # The warm-up and the capture run on a stream of the step's device, also where the caller's current device
        # is another (the Python API, networks moved to cuda:1).
        with torch.cuda.device(step.device):
            if stream is not None:
                stream.sample_into(self.static_x)
            # Warm up with the optimizer state present (fused Adam creates it lazily, outside any capture).
            snap = step.snapshot()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    step.body(self.static_x)
            torch.cuda.current_stream().wait_stream(side)
            step.restore(snap)
            self.graph = torch.cuda.CUDAGraph()
            # The noise generator is not the default one: the graph must advance its Philox offset on every replay.
            self.graph.register_generator_state(step.z_gen)
            for opt in (step.opt_g, step.opt_d):
                opt.zero_grad(set_to_none=True)
            # thread_local: the capture refuses unsafe CUDA calls of this thread only. The loaders' threads (the
            # DataLoader's pin-memory thread, DALI's) go on while it runs, and in the default global mode a call of
            # theirs that is unsafe during a capture (a cudaHostAlloc, an event query) would fail it now and then.
            # Captured on the warm-up's stream, idle by now: torch.cuda.graph's own default is one stream per process,
            # made on the device current at its first capture, so a later capture on another GPU would leave there.
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                if stream is not None:
                    stream.sample_into(self.static_x)
                step.body(self.static_x)
        torch.cuda.synchronize(step.device)

    def __call__(self, x: torch.Tensor | None = None) -> None:
        if x is not None:
            self.static_x.copy_(x, non_blocking=True)
        if self.stream is not None:
            self.stream.stage()  # the indices this replay gathers, queued behind the last replay's reads
        self.graph.replay()
        self.step.steps_done += 1
