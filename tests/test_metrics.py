"""Sparsity analysis: exact zeros, CETT and its binary search, union of active neurons over consecutive tokens."""

import pytest
import torch
from helpers import tiny_llama

from hf_stochact import SparsityMonitor, measure_sparsity
from hf_stochact.analysis.metrics import cett, cett_threshold, collect_hidden, sparsity_report, union_active


def test_monitor_counts_exact_zeros_of_relu():
    model = tiny_llama("relu").eval()
    ids = torch.randint(3, 97, (2, 16))
    stats = measure_sparsity(model, ids)
    hidden = collect_hidden(model, ids)
    # zeros of act(gate) are zeros of the hidden h = act(gate) * up (up is never exactly 0 here)
    expected = sum(float((h == 0).float().mean()) for h in hidden.values()) / len(hidden)
    assert stats.overall == pytest.approx(expected, abs=1e-6)
    assert 0.3 < stats.overall < 0.7
    with pytest.raises(ValueError, match="no FFN activation"):
        SparsityMonitor(torch.nn.Linear(2, 2))


def test_sampled_monitor_counts_whole_forwards_even_if_attached_twice():
    model = tiny_llama("relu", layers=4).eval()
    a, b = torch.randint(3, 97, (2, 16)), torch.randint(3, 97, (2, 16))
    exact_a = measure_sparsity(model, a)
    monitor = SparsityMonitor(model, every=2).attach()
    monitor.attach()  # idempotent: no second set of hooks
    with torch.no_grad():
        for ids in (a, b, a, b):  # forwards 0 and 2 are sampled: both are `a`
            model(input_ids=ids)
    monitor.detach()
    assert set(monitor.stats.total) == set(exact_a.total)  # every layer sampled
    assert monitor.stats.per_layer() == pytest.approx(exact_a.per_layer())
    assert monitor.stats.total == {k: 2 * v for k, v in exact_a.total.items()}


def test_cett_is_monotone_and_the_search_hits_the_target():
    torch.manual_seed(0)
    h = torch.randn(64, 128) * torch.rand(128)  # long-tailed magnitudes per neuron
    w = torch.randn(128, 32)
    values = [cett(h, w, e) for e in (0.0, 0.1, 0.5, 1.0, 5.0, 1e9)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-9 for a, b in zip(values, values[1:]))
    eps = cett_threshold(h, w, 0.2)
    assert cett(h, w, eps) == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ValueError, match="target CETT"):
        cett_threshold(h, w, 1.5)


def test_union_over_consecutive_tokens():
    active = torch.zeros(8, 4, dtype=torch.bool)
    active[0, 0] = active[1, 1] = active[5, 2] = True
    assert union_active(active, 1) == pytest.approx(3 / 32)
    assert union_active(active, 2) == pytest.approx((2 + 0 + 1 + 0) / 16)
    assert union_active(active, 8) == pytest.approx(3 / 4)


def test_report_on_a_model():
    model = tiny_llama("relu").eval()
    report = sparsity_report(model, torch.randint(3, 97, (2, 16)), windows=(1, 4, 16))
    assert len(report) == 2
    for layer in report.values():
        assert 0 < layer["exact_zero"] < 1
        assert layer["union_nonzero@1"] <= layer["union_nonzero@4"] <= layer["union_nonzero@16"]
        assert layer["union_nonzero@1"] == pytest.approx(1 - layer["exact_zero"], abs=1e-6)
        assert layer["cett_sparsity"] >= layer["exact_zero"]  # zeros are always in the truncated tail
