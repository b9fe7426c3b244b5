"""Training-free input thresholds (TEAL-style): calibration hits its target, the sparse decode path equals a masked
dense reference, greedy allocation beats uniform on measured error, thresholds survive save/load, bad input raises."""

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

import hf_stochact
from hf_stochact import ThresholdedLinear, Thresholds, calibrate_thresholds, kernels, sparse_stats, sparsify, unsparsify
from hf_stochact.inference.thresholds import thresholdable_layers
from hf_stochact.kernels.reference import magnitude_mask


def calib(n=4, t=32, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_sparse_down_with_a_threshold_equals_the_masked_dense_product(dtype, tokens):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 96, generator=g)
    w_t = torch.randn(96, 40, generator=g).to(dtype)
    bias = torch.randn(40, generator=g)
    t = float(h.abs().flatten().kthvalue(int(0.6 * h.numel())).values)
    masked = torch.where(h.abs() <= t, torch.zeros(()), h)
    expected = masked @ w_t.float() + bias
    y, k = kernels.sparse_down(h, w_t, bias, 1.0, t)
    assert int(k) == int((masked != 0).any(0).sum())  # the rows read: inputs above the threshold for some token
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    with kernels.torch_only():
        y_ref, k_ref = kernels.sparse_down(h, w_t, bias, 1.0, t)
    assert int(k_ref) == int(k)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y0, _ = kernels.sparse_down(masked, w_t, bias, 1.0, 0.0)  # threshold 0 = the exact-zero path
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)


def test_magnitude_mask_keeps_nan_and_is_identity_at_zero():
    x = torch.tensor([0.1, -0.3, float("nan"), 2.0, -0.05])
    assert torch.equal(magnitude_mask(x, 0.0), x) or torch.isnan(magnitude_mask(x, 0.0)[2])
    m = magnitude_mask(x, 0.2)
    assert m[0] == 0 and m[4] == 0 and m[1] == -0.3 and m[3] == 2.0 and torch.isnan(m[2])


def test_uniform_calibration_hits_the_target_per_layer():
    model = tiny_llama("silu").eval()
    th = calibrate_thresholds(model, calib(), sparsity=0.5, allocation="uniform", max_tokens=4096)
    layers = [p for p, _ in thresholdable_layers(model)]
    assert set(th.values) == set(layers) and "lm_head" not in th.values
    assert {p.rsplit(".", 1)[1] for p in layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    for path in layers:
        assert th.layer_sparsity[path] == pytest.approx(0.5, abs=0.01), path
    # measured on the same text after sparsify: the fraction of zeroed inputs of each layer
    sparsify(model)
    zeroed = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, p=p: zeroed.setdefault(p, []).append(
        (a[0].abs() <= mod.threshold).float().mean().item())) for p, m in model.named_modules()
        if isinstance(m, ThresholdedLinear)]
    with torch.no_grad():
        for w in calib():
            model(input_ids=w[None])
    for h in hooks:
        h.remove()
    assert len(zeroed) == len(layers)
    assert sum(sum(v) / len(v) for v in zeroed.values()) / len(zeroed) == pytest.approx(0.5, abs=0.02)


def test_greedy_allocation_meets_the_model_target_with_less_error_than_uniform():
    model = tiny_llama("silu", layers=3).eval()
    ids = calib(6)
    greedy = calibrate_thresholds(model, ids, sparsity=0.5, allocation="greedy", max_tokens=4096, save=False)
    uniform = calibrate_thresholds(model, ids, sparsity=0.5, allocation="uniform", max_tokens=4096, save=False)
    assert greedy.weighted_sparsity(model) == pytest.approx(0.5, abs=0.03)
    assert len({round(v, 2) for v in greedy.layer_sparsity.values()}) > 1  # not all layers equal

    def weighted_error(th):
        """Sum over layers of weight size x squared relative output error, measured on the calibration text."""
        sparsify(model, thresholds=th)
        errors = {}

        def hook(mod, args, out):
            dense = torch.nn.functional.linear(args[0], mod.original.weight, mod.original.bias)
            errors.setdefault(mod, []).append(((out - dense).norm() / dense.norm()).item() ** 2)

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ThresholdedLinear)]
        with torch.no_grad():
            for w in ids:
                model(input_ids=w[None])
        for h in hooks:
            h.remove()
        unsparsify(model)
        return sum(m.original.weight.numel() * sum(e) / len(e) for m, e in errors.items())

    assert weighted_error(greedy) < weighted_error(uniform)


def test_thresholded_decode_equals_masked_dense_reference_and_takes_the_sparse_path():
    model = tiny_llama("silu").eval()
    ids = calib(2, 12)
    calibrate_thresholds(model, calib(), sparsity=0.4, allocation="uniform")
    with torch.no_grad():
        reference = model.generate(ids[:1], max_new_tokens=8, do_sample=False)  # before sparsify: dense
        sparsify(model, max_density=1.0)  # every decode call on the sparse loop
        with kernels.torch_only():  # the masked dense reference: every call dense on masked inputs
            masked = [model(input_ids=reference[:, : i + 1]).logits[0, -1] for i in range(11, 19)]
        stats0 = sparse_stats(model)["sparse"]
        steps = model(input_ids=reference[:, :12], use_cache=True)
        past = steps.past_key_values
        decode = [steps.logits[0, -1]]
        for i in range(12, 19):
            out = model(input_ids=reference[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            decode.append(out.logits[0, -1])
    assert sparse_stats(model)["sparse"] - stats0 == 7 * 7 * 2  # 7 decode steps x 7 layers x 2 blocks
    for a, b in zip(decode, masked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.lm_head.weight, torch.zeros(1))  # lm_head stays dense and untouched
    assert not isinstance(model.lm_head, ThresholdedLinear)


def test_thresholds_round_trip_through_save_pretrained(tmp_path):
    model = tiny_llama("silu").eval()
    th = calibrate_thresholds(model, calib(), sparsity=0.4)
    sparsify(model)
    ids = calib(1, 16, seed=3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert Thresholds.from_config(reloaded) == th
    sparsify(reloaded)  # thresholds found in the config
    assert sum(isinstance(m, ThresholdedLinear) for m in reloaded.modules()) == len(th.values)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, before, atol=1e-4)  # unsparsified = dense model


def test_relu_models_keep_the_exact_path_and_get_thresholds_on_attention_only():
    model = tiny_llama("relu").eval()
    th = calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    assert th.values and all("mlp" not in p for p in th.values)
    sparsify(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"SparseMLP", "ThresholdedLinear"} <= kinds


def test_unsparsify_restores_modules_and_layout():
    model = tiny_llama("silu").eval()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    calibrate_thresholds(model, calib(), sparsity=0.4)
    sparsify(model)
    assert not model.model.layers[0].self_attn.q_proj.weight.is_contiguous()  # rows layout, a view
    unsparsify(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.is_contiguous() and torch.equal(q.weight, w)


def test_bad_arguments_raise_naming_them():
    model = tiny_llama("silu")
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        calibrate_thresholds(model, calib(), sparsity=1.0)
    with pytest.raises(ValueError, match="allocation must be one of uniform, greedy, block, got 'teal'"):
        calibrate_thresholds(model, calib(), allocation="teal")
    with pytest.raises(ValueError, match="input_ids must be a non-empty"):
        calibrate_thresholds(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sparse_thresholds.values\['x'\] must be a finite number >= 0"):
        sparsify(model, thresholds={"values": {"x": -1.0}})
    with pytest.raises(ValueError, match="thresholds name 'model.nope', which is not a module"):
        sparsify(model, thresholds={"values": {"model.nope": 0.1}})
    with pytest.raises(ValueError, match="a LlamaRMSNorm, not a linear layer"):
        sparsify(model, thresholds={"values": {"model.norm": 0.1}})
    with pytest.raises(ValueError, match="calibrate input thresholds"):
        sparsify(tiny_llama("silu"))
    with pytest.raises(ValueError, match=r"input_max_density must be a number in \[0, 1\], got 1.5"):
        hf_stochact.SparseConfig(input_max_density=1.5)
    assert hf_stochact.calibrate_thresholds is calibrate_thresholds


def test_block_allocation_meets_the_target_in_every_block_and_groups_shared_inputs():
    from hf_stochact.inference.thresholds import block_of

    model = tiny_llama("silu", layers=2).eval()
    ids = calib(2, 32)
    th = calibrate_thresholds(model, ids, sparsity=0.4, allocation="block", step=0.1, save=False)
    assert th.allocation == "block"
    sizes = {p: model.get_submodule(p).weight.numel() for p in th.values}
    for block in ("model.layers.0", "model.layers.1"):
        paths = [p for p in th.values if block_of(p) == block]
        assert len(paths) == 7
        nominal = {p: round(th.layer_sparsity[p], 1) for p in paths}  # calibrated fractions, near the 0.1 grid
        weighted = sum(nominal[p] * sizes[p] for p in paths) / sum(sizes[p] for p in paths)
        assert 0.4 - 1e-6 <= weighted <= 0.4 + 0.1  # the block's bytes reach the target, by at most one step more
        attn = f"{block}.self_attn."
        assert th.values[attn + "q_proj"] == th.values[attn + "k_proj"] == th.values[attn + "v_proj"]  # one input
        assert th.values[f"{block}.mlp.gate_proj"] == th.values[f"{block}.mlp.up_proj"]


def test_bfloat16_prefill_matches_the_masked_product():
    from hf_stochact.inference.sparse import SparseConfig

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    reference = layer.weight.detach().float().clone(), layer.bias.detach().float().clone()
    parent = torch.nn.Sequential(layer)
    sparsify(parent, thresholds={"values": {"0": 0.5}})
    wrapper = parent[0]
    assert isinstance(wrapper, ThresholdedLinear) and wrapper.config == SparseConfig()
    x = torch.randn(2, 37, 64).to(torch.bfloat16)  # 74 tokens: more than max_tokens
    with torch.no_grad():
        y = parent(x)
    expected = torch.nn.functional.linear(magnitude_mask(x, 0.5).float(), *reference)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 37, 48)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_compiled_thresholded_model_equals_eager():
    model = tiny_llama("silu").eval()
    calibrate_thresholds(model, calib(), sparsity=0.4, allocation="uniform")
    sparsify(model)
    ids = calib(1, 1, seed=5)  # one token: every thresholded layer on the sparse operator
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
