"""The sparse path under the changes users make to a live model: replaced or resized children never reach the C
loops, hooks fire as on the dense model, re-sparsifying applies the new settings, sparsified models copy and
pickle, and per-call interning stays bounded."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import transformers as tf
from helpers import tiny_llama
from torch import nn

from hf_stochact import ThresholdedLinear, Thresholds, calibrate_thresholds, sparse_stats, sparsify, unsparsify
from hf_stochact.inference import decoding
from hf_stochact.inference.sparse import SparseMLP


def calib(n=4, t=32, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def relu_model():
    return tiny_llama("relu").eval()


def one_token(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------------
# Children replaced after sparsify


@pytest.mark.parametrize("child", ["up_proj", "gate_proj", "down_proj"])
def test_a_narrower_child_raises_like_dense_instead_of_reading_out_of_bounds(child, path):
    model = relu_model()
    sparsify(model, max_density=1.0)
    mlp = model.model.layers[0].mlp
    d, d_ff = 32, 64
    narrow = nn.Linear(d_ff // 2, d, bias=False) if child == "down_proj" else nn.Linear(d, d_ff // 4, bias=False)
    setattr(mlp, child, narrow)
    ids = calib(1, 1)
    with pytest.raises(RuntimeError):  # what the dense model raises: shapes do not fit
        one_token(model, ids)


def test_a_replaced_child_of_the_same_shape_is_used(path):
    model = relu_model()
    sparsify(model, max_density=1.0)
    reference = copy.deepcopy(model)
    unsparsify(reference)
    torch.manual_seed(5)
    new_up = nn.Linear(32, 64, bias=True)  # a bias the original did not have
    model.model.layers[1].mlp.up_proj = new_up
    reference.model.layers[1].mlp.up_proj = copy.deepcopy(new_up)
    ids = calib(1, 1, seed=2)
    before = sparse_stats(model)["sparse"]
    torch.testing.assert_close(one_token(model, ids), one_token(reference, ids), rtol=1e-5, atol=1e-5)
    assert sparse_stats(model)["sparse"] - before == 2  # both FFNs still on the loops


def test_a_child_cast_to_another_dtype_takes_the_dense_path():
    model = relu_model()
    sparsify(model, max_density=1.0)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.to(torch.bfloat16)  # gate float32, up bfloat16: one dtype code would misread one of them
    with pytest.raises(RuntimeError):  # the dense model cannot multiply them either
        one_token(model, calib(1, 1))


def test_a_thresholded_layer_whose_weight_is_resized_never_reaches_the_loop():
    model = tiny_llama("silu").eval()
    calibrate_thresholds(model, calib(), sparsity=0.4, allocation="uniform")
    sparsify(model)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, ThresholdedLinear)
    q.original.weight = nn.Parameter(torch.randn(32, 16))  # in_features 16: the input (32) no longer fits
    with pytest.raises(RuntimeError):
        one_token(model, calib(1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Hooks


def _steer(module, args, output):
    return output + 0.5


def test_hooks_on_ffn_children_fire_as_often_as_dense_and_steer_the_same_tokens(path):
    ids = calib(1, 5, seed=1)
    counts = {"dense": 0, "sparse": 0}
    results = {}
    for mode in ("dense", "sparse"):
        model = relu_model()
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_hook(_steer)
            layer.mlp.up_proj.register_forward_hook(lambda *a, mode=mode: counts.__setitem__(mode, counts[mode] + 1))
        if mode == "sparse":
            with pytest.warns(UserWarning, match="take the dense path while the hooks are registered"):
                sparsify(model, max_density=1.0)
        results[mode] = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert counts["dense"] == counts["sparse"] == 2 * 8
    assert torch.equal(results["dense"], results["sparse"])


def test_hooks_registered_before_sparsify_keep_firing_and_stay_after_unsparsify():
    model = tiny_llama("relu", layers=1).eval()
    calls = []
    mlp = model.model.layers[0].mlp
    mlp.register_forward_hook(lambda m, a, o: calls.append("mlp"))
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append("q"))
    calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    calls.clear()
    sparsify(model)
    assert isinstance(model.model.layers[0].mlp, SparseMLP)
    assert isinstance(model.model.layers[0].self_attn.q_proj, ThresholdedLinear)
    one_token(model, calib(1, 1))  # a sparse decode-sized call
    one_token(model, calib(1, 12))  # a dense (prefill-sized) call
    assert calls == ["q", "mlp", "q", "mlp"]
    assert sparse_stats(model)["sparse"] >= 1
    # hooks added to the wrapper are the original's after unsparsify
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: calls.append("late"))
    unsparsify(model)
    calls.clear()
    one_token(model, calib(1, 1))
    assert calls == ["q", "mlp", "late"]


def test_a_hook_added_after_sparsify_switches_that_ffn_to_dense_and_removing_it_switches_back():
    model = relu_model()
    sparsify(model, max_density=1.0)
    seen = []
    handle = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    one_token(model, calib(1, 1))
    assert len(seen) == 1
    handle.remove()
    before = sparse_stats(model)["sparse"]
    one_token(model, calib(1, 1))
    assert len(seen) == 1 and sparse_stats(model)["sparse"] - before == 2


# ---------------------------------------------------------------------------------------------------------------
# Re-sparsify


def test_resparsify_applies_new_thresholds_and_settings_and_saves_what_runs(tmp_path):
    model = tiny_llama("silu").eval()
    calibrate_thresholds(model, calib(), sparsity=0.2, allocation="uniform")
    fresh = copy.deepcopy(model)
    sparsify(model)
    new = calibrate_thresholds(model, calib(seed=1), sparsity=0.5, allocation="uniform")
    # calibrating a sparsified model measures the dense inputs: the same thresholds as on the dense model (up to the
    # last bit: the dense path reads W_down through the rows layout's transposed view, which MKL may sum in another
    # order than the contiguous weight on some CPUs)
    other = calibrate_thresholds(fresh, calib(seed=1), sparsity=0.5, allocation="uniform", save=False)
    assert new.values == pytest.approx(other.values, rel=1e-5, abs=1e-7)
    assert new.layer_sparsity == pytest.approx(other.layer_sparsity, abs=0.02)
    assert (new.sparsity, new.allocation, new.groups) == (other.sparsity, other.allocation, other.groups)
    fewer = Thresholds({p: t for p, t in new.values.items() if "layers.0" in p}, new.sparsity, new.allocation)
    sparsify(model, thresholds=fewer, max_tokens=8)
    wrappers = {p: m for p, m in model.named_modules() if isinstance(m, ThresholdedLinear)}
    assert set(wrappers) == set(fewer.values)
    assert all(m.threshold == fewer.values[p] and m.config.max_tokens == 8 for p, m in wrappers.items())
    assert Thresholds.from_config(model) == fewer
    ids = calib(1, 6, seed=4)
    live = one_token(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = sparsify(tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(one_token(reloaded, ids), live, rtol=1e-5, atol=1e-5)


def test_resparsify_updates_the_exact_ffns_settings():
    model = relu_model()
    sparsify(model, max_tokens=2)
    sparsify(model, max_tokens=8, max_density=0.5)
    mlps = [m for m in model.modules() if isinstance(m, SparseMLP)]
    assert len(mlps) == 2 and all(m.config.max_tokens == 8 and m.config.max_density == 0.5 for m in mlps)
    with pytest.raises(ValueError, match="either config or keyword settings"):
        sparsify(model, mlps[0].config, max_tokens=3)


# ---------------------------------------------------------------------------------------------------------------
# Copies


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_sparsified_models_copy_with_shared_parameters_kept_shared(how):
    model = tiny_llama("relu").eval()
    calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    sparsify(model, max_density=1.0)
    ids = calib(1, 1, seed=3)
    expected = one_token(model, ids)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(one_token(twin, ids), expected, rtol=0, atol=0)
    mlp = twin.model.layers[0].mlp
    assert mlp._parameters is mlp.original._parameters and mlp._modules is mlp.original._modules
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.zero_()  # the copy's weights are its own
    assert not torch.equal(one_token(model, ids), one_token(twin, ids))
    torch.testing.assert_close(one_token(model, ids), expected, rtol=0, atol=0)
    assert sparse_stats(twin)["sparse"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Bounded state and argument checks


def test_distinct_stochastic_p_values_do_not_grow_the_intern_table():
    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, hidden_act="stochastic")
    model = tf.LlamaForCausalLM(config).eval()
    ids = calib(1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(decoding._SPECS_MAX * 3):
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, stochastic_activation=True,
                           stochastic_p=0.001 + i * 1e-4)
    assert len(decoding._SPECS) <= decoding._SPECS_MAX
    spec = model.model.layers[0].mlp.act_fn.spec.replace(p=0.25)
    assert decoding._intern(spec) is decoding._intern(spec.replace(p=0.25))  # a recent spec is one object


def test_calibration_and_saved_thresholds_reject_bad_values_naming_them():
    model = tiny_llama("silu")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
            calibrate_thresholds(model, calib(), max_tokens=bad)
    with pytest.raises(ValueError, match="eval_tokens must be an integer >= 1"):
        calibrate_thresholds(model, calib(), eval_tokens=0)
    with pytest.raises(ValueError, match="input_ids must be a non-empty"):
        calibrate_thresholds(model, calib().float())
    with pytest.raises(ValueError, match=r"sparse_thresholds.sparsity must be a number in \[0, 1\], got '0.4'"):
        Thresholds.from_dict({"values": {}, "sparsity": "0.4"})
    with pytest.raises(ValueError, match="sparse_thresholds.allocation must be one of"):
        Thresholds.from_dict({"values": {}, "allocation": 3})
    with pytest.raises(ValueError, match=r"sparse_thresholds.layer_sparsity\['a'\] must be a number"):
        Thresholds.from_dict({"values": {}, "layer_sparsity": {"a": "x"}})
    with pytest.raises(ValueError, match="thresholds must be a Thresholds"):
        sparsify(model, thresholds=[0.1])


# ---------------------------------------------------------------------------------------------------------------
# The LM head on the C loops' matrix-vector product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lm_head_runs_on_the_loops_with_the_same_logits_and_tied_weights(tmp_path, dtype):
    from hf_stochact.inference.sparse import RowsHead

    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, hidden_act="relu", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval().to(dtype)
    ids = calib(1, 3, seed=5)
    expected = one_token(model, ids)
    sparsify(model, max_density=1.0)
    assert isinstance(model.lm_head, RowsHead) and model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, nothing copied
    calls = []
    model.lm_head.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(one_token(model, ids), expected, rtol=tol, atol=tol)
    assert calls == [(1, 3, 97)]
    assert set(model.state_dict()) == set(unsparsify(copy.deepcopy(model)).state_dict())
    # the head is not a thresholdable layer, before or after sparsify
    th = calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform", save=False)
    assert "lm_head" not in th.values
    sparsify(model, head=False)  # re-sparsify without the head: the plain nn.Linear is back
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(one_token(model, ids), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="head must be True or False"):
        sparsify(model, head="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_dense_rows(path, dtype):
    x, w = torch.randn(3, 24, dtype=dtype), torch.randn(40, 24, dtype=dtype)
    for bias in (None, torch.randn(40, dtype=dtype)):
        torch.library.opcheck(torch.ops.hf_stochact.dense_rows.default, (x, w, bias),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
    y = torch.ops.hf_stochact.dense_rows(x, w, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), x.float() @ w.float().t(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="dense_rows: inconsistent shapes"):
        torch.ops.hf_stochact.dense_rows(x, w[:, :8], None)


def test_a_lora_adapter_on_a_sparse_relu_ffn_takes_part():
    """A LoRA layer put on a sparsified FFN's projections: the sparse path steps aside (it would read the base
    weights only), so the adapter's delta is in the output, as after merging it."""
    peft = pytest.importorskip("peft")
    model = tiny_llama("relu").eval()
    sparsify(model, max_density=1.0)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"],
                                                      init_lora_weights=False))
    ids = calib(1, 1)
    with torch.no_grad():
        got = lora(input_ids=ids).logits
        with lora.disable_adapter():
            base = lora(input_ids=ids).logits
        merged = copy.deepcopy(lora).merge_and_unload()(input_ids=ids).logits
    assert (got - base).abs().max() > 1e-3  # the adapter moves the output
    torch.testing.assert_close(got, merged, atol=1e-4, rtol=1e-4)


def test_sparsify_on_adapter_wrapped_layers_says_to_merge_first():
    peft = pytest.importorskip("peft")
    relu = peft.get_peft_model(tiny_llama("relu").eval(), peft.LoraConfig(target_modules=["gate_proj", "down_proj"]))
    with pytest.raises(ValueError, match=r"adapter-wrapped projections \(peft\.tuners\.lora\.layer\.Linear\): merge"):
        sparsify(relu.get_base_model())
    silu = tiny_llama("silu").eval()
    th = calibrate_thresholds(silu, calib(), sparsity=0.3, allocation="uniform", save=False)
    wrapped = peft.get_peft_model(silu, peft.LoraConfig(target_modules=["q_proj"])).get_base_model()
    with pytest.raises(ValueError, match=r"holds an adapter \(peft\.tuners\.lora\.layer\.Linear around its linear"):
        sparsify(wrapped, thresholds=th)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_after_sparsify(tied):
    model = tiny_llama("silu", tie_word_embeddings=tied).eval()
    calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    sparsify(model)
    model.resize_token_embeddings(120)
    head = model.get_output_embeddings()
    assert type(head).__name__ == "RowsHead" and head.original.weight.shape == (120, 32)
    assert model.get_input_embeddings().weight.shape == (120, 32)
    with torch.no_grad():
        assert model(input_ids=calib(1, 6)).logits.shape == (1, 6, 120)
