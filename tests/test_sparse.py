"""sparsify(): exact against the dense path on several architectures, token counts and dtypes; fallbacks; errors."""

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

import hf_stochact
from hf_stochact import SparseConfig, is_sparsified, sparsify, unsparsify
from hf_stochact.inference import sparse as sp

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
RELU_ARCHS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, intermediate_size=256, hidden_act="relu")),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, intermediate_size=256, hidden_act="relu",
                                                        num_key_value_heads=2)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, intermediate_size=256, head_dim=16,
                                                           num_key_value_heads=2, hidden_activation="relu")),
    "phi3-fused": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL, intermediate_size=256, hidden_act="relu",
                                                           pad_token_id=0)),
    "opt-plain": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64,
                                                        activation_function="relu")),
    "gpt2-conv1d": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                                            activation_function="relu")),
    "neox-relu2": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL, intermediate_size=256,
                                                                 hidden_act="relu2")),
}


@pytest.mark.parametrize("arch", sorted(RELU_ARCHS))
@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_sparse_equals_dense(arch, tokens, path):
    torch.manual_seed(0)
    model = RELU_ARCHS[arch]().eval()
    ids = torch.randint(3, 97, (1, tokens))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        sparsify(model, max_tokens=4, max_density=1.0)
        assert is_sparsified(model)
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    stats = sp.sparse_stats(model)
    assert (stats["sparse"] > 0, stats["dense"] > 0) == (tokens <= 4, tokens > 4), stats


def test_decode_with_generate_is_identical(path):
    model = tiny_llama("relu").eval()
    ids = torch.randint(3, 97, (2, 5))
    dense = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    sparsify(model, max_density=1.0)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), dense)
    assert sp.sparse_stats(model)["sparse"] >= 2 * 11, "every decode step of both layers is sparse"
    unsparsify(model)
    assert not is_sparsified(model)


def test_bfloat16_within_rounding(path):
    torch.manual_seed(0)
    mlp = RELU_ARCHS["llama"]().model.layers[0].mlp.to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        dense = mlp(x).float()
        sparsify(mlp, max_density=1.0)
        out = mlp(x).float()
        exact = mlp.down_proj.weight.float() @ (torch.relu(mlp.gate_proj.weight.float() @ x.float().t())
                                                * (mlp.up_proj.weight.float() @ x.float().t()))
    # both within bf16 rounding of the exact (float32) value: 2^-8 relative per element, a few roundings deep
    bound = 4 * 2**-8 * exact.abs().max()
    assert (out - exact.t()).abs().max() <= bound and (dense - exact.t()).abs().max() <= bound
    torch.testing.assert_close(out, dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "phi3-fused", "opt-plain", "gpt2-conv1d", "neox-relu2"])
def test_bfloat16_prefill_in_float32(arch, monkeypatch):
    """Where bf16 products are slow (CPUs without AVX512-BF16/AMX), many-token calls of a bf16 sparse FFN run as
    float32 products of the stored weights: once per FFN, within bf16 rounding of the float32 computation of the
    same weights (the dense bf16 model is no closer)."""
    monkeypatch.setattr(sp, "_bf16_products_slow", lambda: True)
    calls = []
    product = sp._rows_product
    monkeypatch.setattr(sp, "_rows_product", lambda *a: calls.append(1) or product(*a))
    torch.manual_seed(0)
    model = RELU_ARCHS[arch]().eval().to(torch.bfloat16)
    reference = RELU_ARCHS[arch]().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        exact = reference(input_ids=ids).logits
        dense_error = (model(input_ids=ids).logits.float() - exact).abs().max()
        sparsify(model, max_tokens=4, max_density=1.0)
        error = (model(input_ids=ids).logits.float() - exact).abs().max()
    assert len(calls) == 2, "one float32 product per FFN (2 layers)"
    assert error <= max(dense_error, 4 * 2**-8 * exact.abs().max()), (error, dense_error)


def test_single_module_and_density_fallback(path):
    torch.manual_seed(0)
    mlp = RELU_ARCHS["llama"]().model.layers[0].mlp
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref = mlp(x)
        wrapped = sparsify(mlp, max_density=0.01)  # a bare MLP has no parent: sparsify returns the wrapper
        assert isinstance(wrapped, sp.SparseMLP) and wrapped.original is mlp
        torch.testing.assert_close(wrapped(x), ref, rtol=1e-5, atol=1e-6)
        assert sp.sparse_stats(wrapped) == {"sparse": 0, "dense": 1}, "~50% active > max_density=0.01: dense"
        assert unsparsify(wrapped) is mlp
        wrapped = sparsify(mlp, max_density=0.9)
        torch.testing.assert_close(wrapped(x), ref, rtol=1e-5, atol=1e-6)
        assert sp.sparse_stats(wrapped) == {"sparse": 1, "dense": 0}


def test_in_place_weight_change_is_seen_by_both_paths():
    """W_down is stored once (the Linear holds a transposed view): in-place updates reach the sparse loops."""
    torch.manual_seed(0)
    model = tiny_llama("relu").eval()
    mlp = model.model.layers[0].mlp
    w = mlp.down_proj.weight
    sparsify(model, max_density=1.0)
    assert model.model.layers[0].mlp.down_proj.weight is w, "same Parameter object"
    assert w.t().is_contiguous() and not w.is_contiguous(), "rows of neurons contiguous, module sees a view"
    x = torch.randn(1, 32)
    with torch.no_grad():
        model.model.layers[0].mlp(x)
        w.mul_(2.0)
        out = model.model.layers[0].mlp(x)
        unsparsify(model)
        assert w.is_contiguous(), "unsparsify restores the stock layout"
        torch.testing.assert_close(out, model.model.layers[0].mlp(x), rtol=1e-5, atol=1e-6)


def test_autograd_uses_the_dense_path():
    model = tiny_llama("relu").train()
    sparsify(model, max_density=1.0)
    ids = torch.randint(3, 97, (1, 2))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sp.sparse_stats(model) == {"sparse": 0, "dense": 2}
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_save_after_sparsify_keeps_the_state_dict(tmp_path):
    model = tiny_llama("relu")
    keys = set(model.state_dict())
    sparsify(model)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    assert isinstance(tf.LlamaForCausalLM.from_pretrained(tmp_path), tf.LlamaForCausalLM)


def test_no_relu_ffn_raises_and_bad_config():
    with pytest.raises(ValueError, match="no FFN with a ReLU.*SiLU"):
        sparsify(tiny_llama("silu"))
    with pytest.raises(ValueError, match="max_density"):
        SparseConfig(max_density=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SparseConfig(max_tokens=0)


def test_exported_api():
    assert hf_stochact.sparsify is sparsify
