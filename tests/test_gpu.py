"""The draw on CUDA (``pytest -m gpu``; skipped without a device): the same masks as on CPU for the same seed,
gradients against float64, nothing saved beyond x and the seed, compiled = eager."""

import pytest
import torch
from helpers import eager_and_compiled_steps, tiny_llama

from hf_stochact import StochasticActivation, kernels
from hf_stochact.kernels import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negative_only", [True, False])
def test_cuda_draw_equals_cpu_draw(dtype, negative_only):
    x = torch.randn(1000, 513).to(dtype)
    seed = kernels.new_seed("cpu")
    y_cpu = kernels.silu_relu_draw(x, seed, 0.37, negative_only)
    y_gpu = kernels.silu_relu_draw(x.cuda(), seed.cuda(), 0.37, negative_only).cpu()
    assert torch.equal(y_cpu == 0, y_gpu == 0), "same seed, same mask on every device"
    torch.testing.assert_close(y_gpu, y_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradient_matches_float64(dtype):
    x = torch.empty(200_000, device="cuda").uniform_(-6, 6).to(dtype).requires_grad_()
    g = torch.randn_like(x)
    seed = kernels.new_seed("cuda")
    y = kernels.silu_relu_draw(x, seed, 0.5, negative_only=False)
    y.backward(g)
    x64 = x.detach().double()
    # the mask, regenerated from the seed (the fused kernel's SiLU may differ from F.silu by an ulp, so the branch
    # cannot be read off the values)
    silu_drawn = reference.bernoulli(seed, tuple(x.shape), kernels.threshold(0.5), x.device)
    s = torch.sigmoid(x64)
    expected = torch.where(silu_drawn, s * (1 + x64 * (1 - s)), (x64 > 0).double()) * g.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), expected, rtol=tol, atol=tol)
    frac = (y.detach()[x.detach() < 0] == 0).float().mean().item()
    assert abs(frac - 0.5) < 0.01


def test_cuda_backward_saves_only_x_and_the_seed():
    x = torch.randn(256, 1024, device="cuda", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        StochasticActivation(p=0.5).train()(x).sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr()) <= 8


@torch._inductor.config.patch(fallback_random=True)
def test_cuda_compiled_training_step_equals_eager():
    torch.manual_seed(0)
    model = tiny_llama("stochastic").cuda().train()
    ids = torch.randint(3, 97, (2, 16), device="cuda")

    results = eager_and_compiled_steps(model, ids, seed=3)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_cuda_operator_route_equals_traced_route(monkeypatch):
    x = torch.randn(300, 257, device="cuda", requires_grad=True)
    seed = kernels.new_seed("cuda")
    g = torch.randn_like(x)
    outs = []
    for through_op in (False, True):
        monkeypatch.setattr(kernels, "CUDA_THROUGH_OPERATOR", through_op)
        x.grad = None
        y = kernels.silu_relu_draw(x, seed, 0.3)
        y.backward(g)
        outs.append((y.detach(), x.grad.clone()))
    assert torch.equal(outs[0][0] == 0, outs[1][0] == 0)
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
