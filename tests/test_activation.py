"""The math of StochasticActivation: draw statistics, branches, gradients, modes, dtypes, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_stochact import StochasticActivation, StochasticSpec

N = 400_000


def _sigma_tol(p, n, k=6.0):
    """k standard deviations of a Binomial(n, p) proportion, plus the 2^-32 quantisation of p."""
    return k * math.sqrt(max(p * (1 - p), 1e-12) / n) + 2 * 2**-32


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_paper_variant_statistics_and_branches(path, p):
    x = torch.randn(N)
    y = StochasticActivation(p=p).train()(x)
    neg, pos = x < 0, x >= 0
    assert torch.equal(y[pos], x[pos]), "x >= 0 must pass unchanged"
    zero_frac = (y[neg] == 0).float().mean().item()
    assert abs(zero_frac - (1 - p)) < _sigma_tol(p, int(neg.sum()))
    silu_drawn = neg & (y != 0)
    assert torch.equal(y[silu_drawn], F.silu(x)[silu_drawn]), "non-zero negatives must be exactly SiLU(x)"


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_blog_variant_draws_on_both_signs(path, p):
    x = torch.empty(N).uniform_(-6, 6)  # |x| <= 6: SiLU(x) != ReLU(x) in float32, so the branch is identifiable
    y = StochasticActivation(p=p, variant="blog").train()(x)
    is_silu = y == F.silu(x)
    is_relu = y == torch.relu(x)
    assert bool((is_silu | is_relu).all())
    for region in (x < 0, x > 0):
        frac = is_silu[region].float().mean().item()
        assert abs(frac - p) < _sigma_tol(p, int(region.sum())), "blog variant draws SiLU w.p. p on each sign"


def test_p_is_probability_of_silu():
    x = -torch.rand(N) - 0.1
    y = StochasticActivation(p=0.9).train()(x)
    assert (y != 0).float().mean() > 0.85  # mostly SiLU: p is P(SiLU), not P(ReLU)


def test_k_way_frequencies():
    choices = {"relu": 0.5, "silu": 0.3, "gelu": 0.2}
    x = -torch.rand(N) * 3 - 0.5  # negatives where relu/silu/gelu all differ
    y = StochasticActivation(choices=choices).train()(x)
    outs = {"relu": torch.relu(x), "silu": F.silu(x), "gelu": F.gelu(x)}
    for name, prob in choices.items():
        frac = (y == outs[name]).float().mean().item()
        assert abs(frac - prob) < _sigma_tol(prob, N), name
    pos = torch.rand(1000)
    assert torch.equal(StochasticActivation(choices=choices).train()(pos), pos)  # paper variant: x >= 0 passes


def test_two_way_choices_normalise_to_p():
    spec = StochasticSpec(choices={"silu": 0.2, "relu": 0.8})
    assert spec.choices is None and spec.p == pytest.approx(0.2)


@pytest.mark.parametrize("granularity,shape", [("token", (64, 1)), ("tensor", (1, 1))])
def test_coarse_granularity_shares_the_draw(path, granularity, shape):
    x = -torch.rand(64, 256) - 0.1
    y = StochasticActivation(p=0.5, granularity=granularity).train()(x)
    zeros = (y == 0).view(*shape, -1) if granularity == "tensor" else (y == 0)
    rows = zeros.float().mean(-1)
    assert bool(((rows == 0) | (rows == 1)).all()), "one draw per token / per tensor"
    if granularity == "token":
        assert 0.2 < rows.mean().item() < 0.8


def _reference_grad(x64, silu_mask):
    """d/dx of SiLU where drawn, ReLU elsewhere, in float64."""
    s = torch.sigmoid(x64)
    silu_grad = s * (1 + x64 * (1 - s))
    return torch.where(silu_mask, silu_grad, (x64 > 0).to(x64.dtype))


@pytest.mark.parametrize("variant", ["paper", "blog"])
def test_gradient_matches_float64_reference(path, variant):
    x = torch.empty(50_000).uniform_(-6, 6).requires_grad_()
    g = torch.randn(50_000)
    y = StochasticActivation(p=0.5, variant=variant).train()(x)
    y.backward(g)
    silu_mask = (y.detach() == F.silu(x.detach())) & (y.detach() != torch.relu(x.detach()))
    expected = _reference_grad(x.detach().double(), silu_mask) * g.double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert silu_mask.any() and (~silu_mask).any()


def test_gradcheck_float64_same_mask():
    gen = torch.Generator()
    act = StochasticActivation(p=0.5, variant="blog", generator=gen).train()

    def f(x):
        gen.manual_seed(1234)  # same mask on every call gradcheck makes
        return act(x)

    x = (torch.rand(64, dtype=torch.float64) * 4 - 2).requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))


def test_eval_modes_are_deterministic():
    x = torch.randn(10_000)
    relu = StochasticActivation(p=0.5).eval()
    assert torch.equal(relu(x), torch.relu(x)) and torch.equal(relu(x), relu(x))
    silu = StochasticActivation(p=0.5, eval_mode="silu").eval()
    assert torch.equal(silu(x), torch.where(x >= 0, x, F.silu(x)))  # p = 1 of the paper form
    assert torch.equal(StochasticActivation(variant="blog", eval_mode="silu").eval()(x), F.silu(x))
    mean = StochasticActivation(p=0.3, eval_mode="mean").eval()
    torch.testing.assert_close(mean(x), torch.where(x >= 0, x, 0.3 * F.silu(x)))
    mean_blog = StochasticActivation(p=0.3, variant="blog", eval_mode="mean").eval()
    torch.testing.assert_close(mean_blog(x), 0.3 * F.silu(x) + 0.7 * torch.relu(x))
    k = StochasticActivation(choices={"relu": 0.5, "gelu": 0.5}, eval_mode="mean").eval()
    torch.testing.assert_close(k(x), torch.where(x >= 0, x, 0.5 * F.gelu(x)))


def test_sampling_switch_overrides_mode():
    x = -torch.rand(10_000) - 0.1
    act = StochasticActivation(p=0.5).eval()
    act.sampling = True
    assert 0.3 < (act(x) == 0).float().mean() < 0.7
    act.train()
    act.sampling = False
    assert torch.equal(act(x), torch.relu(x))


def test_default_eval_mode_without_relu_candidate_is_mean():
    assert StochasticSpec(choices={"silu": 0.5, "gelu": 0.5}).eval_mode == "mean"
    assert StochasticSpec().eval_mode == "relu"


def test_seed_reproducibility(path):
    x = torch.randn(10_000)
    act = StochasticActivation(p=0.5).train()
    torch.manual_seed(7)
    a = act(x)
    torch.manual_seed(7)
    b = act(x)
    c = act(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    gen = torch.Generator().manual_seed(3)
    act_g = StochasticActivation(p=0.5, generator=gen).train()
    d = act_g(x)
    gen.manual_seed(3)
    assert torch.equal(d, act_g(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_empty_noncontiguous(path, dtype):
    act = StochasticActivation(p=0.5).train()
    x = torch.randn(300, 200, dtype=dtype)
    y = act(x)
    assert y.dtype == dtype and y.shape == x.shape
    neg = x < 0
    assert torch.equal(y[~neg], x[~neg])
    assert 0.4 < (y[neg] == 0).float().mean().item() < 0.6
    empty = torch.empty(0, 7, dtype=dtype, requires_grad=True)
    out = act(empty)
    out.sum().backward()
    assert out.shape == (0, 7) and empty.grad.shape == (0, 7)
    xt = x.t()  # non-contiguous: same draw as its contiguous copy under the same seed
    torch.manual_seed(5)
    a = act(xt)
    torch.manual_seed(5)
    b = act(xt.contiguous())
    assert torch.equal(a == 0, b == 0)  # same draw (values may differ by an ulp: strided vs vectorised SiLU)
    torch.testing.assert_close(a, b)


def test_nan_inf_propagate_like_the_drawn_branch(path):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0] * 2000)
    y = StochasticActivation(p=0.5, variant="blog").train()(x)
    assert torch.isnan(y[0::5]).all(), "NaN propagates"
    assert (y[1::5] == float("inf")).all(), "+inf propagates (SiLU(+inf) = ReLU(+inf) = +inf)"
    # -inf: SiLU gives NaN (torch), ReLU gives 0 -- whichever branch was drawn
    neg_inf = y[2::5]
    assert bool((torch.isnan(neg_inf) | (neg_inf == 0)).all())
    torch.testing.assert_close(StochasticActivation(p=1.0, variant="blog").train()(x), F.silu(x), equal_nan=True)
    torch.testing.assert_close(StochasticActivation(p=0.0).train()(x), torch.relu(x), equal_nan=True)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"p": 1.5}, ["p", "1.5", "[0, 1]"]),
        ({"p": -0.1}, ["p", "-0.1"]),
        ({"p": float("nan")}, ["p", "nan"]),
        ({"p": "high"}, ["p", "high"]),
        ({"variant": "random"}, ["variant", "random", "paper", "blog"]),
        ({"eval_mode": "gelu"}, ["eval_mode", "gelu", "relu", "silu", "mean"]),
        ({"granularity": "row"}, ["granularity", "row", "element"]),
        ({"choices": {"relu": 0.7, "silu": 0.7}}, ["sum to 1", "1.4"]),
        ({"choices": {"relu": 1.2, "silu": -0.2}}, ["choices", "[0, 1]"]),
        ({"choices": {"relu": 0.5, "swishy": 0.5}}, ["unknown activation", "swishy", "gelu"]),
        ({"choices": {"relu": 1.0}}, ["at least two"]),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        StochasticActivation(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_spec_round_trips_through_dict():
    spec = StochasticSpec(choices={"relu": 0.5, "silu": 0.3, "gelu": 0.2}, variant="blog", granularity="token")
    assert StochasticSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown stochastic activation setting"):
        StochasticSpec.from_dict({"prob": 0.5})
