"""The kernels run on their inputs' GPU, whatever the current CUDA device: Triton compiles for and launches on the
current device, not the one its pointers lead to, so each host launcher of kernels/ makes its inputs' device current
(kernels.on_the_inputs_device). Without it, networks moved to cuda:1 by a process whose current device is 0 (the
Python API, with no script to call torch.cuda.set_device) had their kernels launched on GPU 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from began_fast import ops
from began_fast.config import ModelConfig, TrainConfig
from began_fast.fast_step import CudaGraphStep, FastStep
from began_fast.model import Discriminator, Generator
from kernels import balance, conv_elu, interpreter

LAUNCHERS = [
    conv_elu.conv_elu_forward,
    conv_elu.conv_elu_input_grad,
    conv_elu.conv_elu_weight_grad,
    balance.balance_forward,
    balance.balance_backward,
]


class Entered(Exception):
    """Raised by the stand-in for torch.cuda.device on entering: the call goes no further."""


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda launcher: launcher.__name__)
def test_a_launcher_makes_its_inputs_gpu_current_before_anything_else(monkeypatch, launcher):
    """Given a tensor on cuda:1 (a stand-in: this machine may have no GPU) while GPU 0 is current, the launcher
    enters that device's context first of all, before it allocates or launches; with GPU 1 current it enters none."""
    on_gpu_1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: pytest.fail(f"torch.cuda.device({device}) entered"))
    with pytest.raises(TypeError, match="missing"):  # reached the launcher itself, given one argument of its many
        launcher(on_gpu_1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def entering(device):
        raise Entered(device)

    monkeypatch.setattr(torch.cuda, "device", entering)
    with pytest.raises(Entered) as entered:
        launcher(on_gpu_1)
    assert entered.value.args == (torch.device("cuda", 1),)


def test_kernels_on_cpu_tensors_take_no_cuda_device(monkeypatch):
    """Under the interpreter (CPU tensors) no CUDA device is made current: a conv_elu and a balance step, forward
    and backward, never call torch.cuda.device (which refuses a CPU device)."""
    if not interpreter.runs_on(torch.device("cpu")):
        pytest.skip("the kernels take CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setattr(torch.cuda, "device", lambda device: pytest.fail(f"torch.cuda.device({device}) called"))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight, bias = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    y = ops.conv_elu(x, weight, bias, impl="triton")
    result = ops.began_balance(x, y[:, :3], x.detach() * 0.5, y[:, 1:], 0.25, 0.5, 1e-3, impl="triton")
    (result.l_d + result.l_g).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, weight, bias))


TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
MODEL = ModelConfig(image_size=32, n=16, h=16, skip=True)


@pytest.mark.cuda
@TWO_GPUS
def test_networks_on_the_second_gpu_compute_as_with_it_current():
    """G, D and the balance step on cuda:1, called from a process whose current device is 0, give bit for bit what
    they give with cuda:1 current (the same kernels on the same GPU), forward and backward, and leave 0 current."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    G = Generator(MODEL, impl="triton").to("cuda:1")
    D = Discriminator(MODEL, impl="triton").to("cuda:1")
    z = torch.rand(4, MODEL.z_size, device="cuda:1") * 2 - 1
    x = torch.rand(4, 3, 32, 32, device="cuda:1") * 2 - 1
    k = torch.full((), 0.25, device="cuda:1")

    def step():
        fake = G(z)
        result = ops.began_balance(x, D(x), fake, D(fake), k, 0.5, 1e-3, impl="triton")
        grads = torch.autograd.grad(result.l_d + result.l_g, [*G.parameters(), *D.parameters()])
        torch.cuda.synchronize("cuda:1")
        return [fake, *result, *grads]

    with_0_current = step()
    assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        with_1_current = step()
    for a, b in zip(with_0_current, with_1_current, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def fast_step_on(device: str) -> FastStep:
    torch.manual_seed(0)
    G, D = Generator(MODEL, impl="triton").to(device), Discriminator(MODEL, impl="triton").to(device)
    return FastStep(G, D, TrainConfig(batch_size=4), device, amp="bf16", impl="triton")


@pytest.mark.cuda
@TWO_GPUS
def test_a_step_graphed_on_the_second_gpu_replays_its_eager_steps():
    """A fast step on cuda:1, CUDA-graphed by a process whose current device is 0 and which captured a graph on GPU
    0 first (torch.cuda.graph's default capture stream is made there, once per process), replays what the same
    step run eagerly on cuda:1 computes, bit for bit: the warm-up and the capture ran on GPU 1's stream."""
    torch.cuda.set_device(0)
    on_0 = fast_step_on("cuda:0")
    CudaGraphStep(on_0, (4, 3, 32, 32))
    graphed, eager = fast_step_on("cuda:1"), fast_step_on("cuda:1")
    data = [torch.rand(4, 3, 32, 32, device="cuda:1") * 2 - 1 for _ in range(4)]
    graphed(data[0])  # both start from one real step, so Adam's state exists in both
    eager(data[0])
    graph = CudaGraphStep(graphed, data[0].shape)
    assert torch.cuda.current_device() == 0
    for x in data[1:]:
        graph(x)
        eager(x)
    torch.cuda.synchronize("cuda:1")
    for a, b in zip(graphed.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(graphed.k, eager.k) and graphed.steps_done == eager.steps_done == 4
