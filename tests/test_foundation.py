"""The foundation: operators (opcheck, C == torch bit for bit, regenerated backward), torch.compile without graph
breaks, one layout walk, a sparse path that is thread-safe, hook-preserving and safe on weights it cannot read."""

import threading

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from helpers import eager_and_compiled_steps, tiny_llama

import hf_stochact
from hf_stochact import StochasticActivation, find_mlps, kernels, set_activation, sparse_stats, sparsify, unsparsify
from hf_stochact.inference.sparse import SparseMLP
from hf_stochact.kernels import reference

# ---------------------------------------------------------------------------------------------------------------
# operators


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_draw(path, dtype):
    x = torch.randn(8, 33, dtype=dtype, requires_grad=True)
    seed = kernels.new_seed("cpu")
    for negative_only in (True, False):
        _opcheck(torch.ops.hf_stochact.silu_relu_draw.default, (x, seed, kernels.threshold(0.4), negative_only))
        _opcheck(torch.ops.hf_stochact.silu_relu_draw_backward.default,
                 (torch.randn_like(x), x.detach(), seed, kernels.threshold(0.4), negative_only))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_sparse(path, dtype):
    torch.manual_seed(0)
    d, d_ff = 24, 40
    x = torch.randn(3, d, dtype=dtype)
    w = [torch.randn(d_ff, d, dtype=dtype) for _ in range(3)]
    b = [torch.randn(d_ff, dtype=dtype), torch.randn(d_ff, dtype=dtype), torch.randn(d, dtype=dtype)]
    for density in (1.0, 0.05):  # sparse, and the dense finish inside the operator
        _opcheck(torch.ops.hf_stochact.sparse_gated_mlp.default, (x, w[0], b[0], w[1], b[1], w[2], b[2], 0, density))
        _opcheck(torch.ops.hf_stochact.sparse_gated_mlp.default, (x, w[0], None, w[1], None, w[2], None, 1, density))
        _opcheck(torch.ops.hf_stochact.sparse_down.default, (torch.relu(torch.randn(3, d_ff, dtype=dtype)), w[2],
                                                             b[2], density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negative_only", [True, False])
def test_c_loops_equal_the_torch_ops_bit_for_bit(dtype, negative_only):
    if not kernels.built():
        pytest.skip("C kernels not built")
    x = torch.randn(517, 301).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    g = torch.randn_like(x)
    seed = kernels.new_seed("cpu")
    for p in (0.0, 0.37, 1.0):
        t = kernels.threshold(p)
        y_c = torch.ops.hf_stochact.silu_relu_draw(x, seed, t, negative_only)
        gx_c = torch.ops.hf_stochact.silu_relu_draw_backward(g, x, seed, t, negative_only)
        with kernels.torch_only():
            y_t = torch.ops.hf_stochact.silu_relu_draw(x, seed, t, negative_only)
            gx_t = torch.ops.hf_stochact.silu_relu_draw_backward(g, x, seed, t, negative_only)
        assert torch.equal(y_c.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           y_t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), p
        torch.testing.assert_close(gx_c, gx_t, rtol=0, atol=0, equal_nan=True)


def test_random_bits_are_uniform_and_independent():
    seed = kernels.new_seed("cpu")
    u = reference.random_bits(seed, (1 << 20,), "cpu").double() / 2**32
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / 2**20) ** 0.5
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 6 / 2**10, "neighbours uncorrelated"
    other = reference.random_bits(seed + 1, (1 << 20,), "cpu").double() / 2**32
    assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1].item()) < 6 / 2**10, "seeds uncorrelated"
    hist = torch.histc(u.float(), bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 6 * (1 / 16 / 2**20) ** 0.5


def test_backward_saves_only_x_and_the_seed(path):
    """Regenerating the mask: the draw keeps for backward what SiLU keeps (x) plus an 8-byte seed."""
    x = torch.randn(64, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = StochasticActivation(p=0.5).train()(x)
    assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr()) <= 8
    y.sum().backward()


def test_gradient_checkpointing_recomputes_the_same_mask(path):
    torch.manual_seed(0)
    model = tiny_llama("stochastic", layers=2).train()
    ids = torch.randint(3, 97, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_meta_device_train_forward():
    with torch.device("meta"):
        model = tiny_llama("stochastic").train()
    ids = torch.randint(3, 97, (2, 8), device="meta")
    out = model(input_ids=ids, labels=ids)
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 8, 97)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@torch._inductor.config.patch(fallback_random=True)  # the compiled graph draws the same seeds as eager
def test_compiled_training_step_equals_eager():
    torch.manual_seed(0)
    model = tiny_llama("stochastic", layers=2).train()
    ids = torch.randint(3, 97, (2, 16))

    def step(m):
        return m(input_ids=ids, labels=ids).loss

    assert _graph_breaks(step, model).graph_break_count == 0
    results = eager_and_compiled_steps(model, ids)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_sparse_decode_equals_eager_dense():
    torch._dynamo.reset()
    model = tiny_llama("relu").eval()
    ids = torch.randint(3, 97, (1, 6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kw)
    sparsify(model, max_density=1.0)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        assert _graph_breaks(mlp, x).graph_break_count == 0
        model.forward = torch.compile(model.forward, fullgraph=True)
        try:
            assert torch.equal(model.generate(ids, **kw), dense)
        finally:
            del model.forward


# ---------------------------------------------------------------------------------------------------------------
# one layout walk


def test_find_mlps_knows_each_family():
    cases = {
        tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2)): "llama",
        tf.Phi3ForCausalLM(tf.Phi3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, pad_token_id=0)): "phi3",
        tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_inner=32, n_layer=2, n_head=2)): "gpt2",
        tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       ffn_dim=32, word_embed_proj_dim=16)): "opt/phi",
        tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2)): "gpt-neox/falcon",
        tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2)): "bert",
    }
    for model, family in cases.items():
        mlps = find_mlps(model)
        assert len(mlps) == 2 and {m.layout.name for m in mlps} == {family}, (family, mlps)
        if family != "bert":
            assert all(m.width == 32 for m in mlps)
            assert len(find_mlps(model, need="pre+down")) == 2


# ---------------------------------------------------------------------------------------------------------------
# the sparse path: threads, activation changes, tensors the loops cannot read, accelerate hooks


def test_threads_share_one_sparsified_model(path):
    torch.manual_seed(0)
    model = tiny_llama("relu").eval()
    inputs = [torch.randint(3, 97, (1, 1 if i % 5 else 6)) for i in range(40)]  # every 5th call: dense fallback
    with torch.no_grad():
        expected = [model(input_ids=ids).logits for ids in inputs]
        sparsify(model, max_density=1.0)
        errors = []

        def worker(k):
            try:
                with torch.no_grad(), kernels.torch_only() if path == "torch" else torch.no_grad():
                    for i in range(200):
                        j = (i * 7 + k) % len(inputs)
                        out = model(input_ids=inputs[j]).logits
                        if not torch.allclose(out, expected[j], rtol=1e-5, atol=1e-5):
                            errors.append((k, i))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    stats = sparse_stats(model)
    assert stats["sparse"] > 0 and stats["dense"] > 0, stats


def test_changing_the_activation_after_sparsify_never_computes_relu():
    torch.manual_seed(0)
    model = tiny_llama("relu").eval()
    ids = torch.randint(3, 97, (1, 1))
    sparsify(model, max_density=1.0)
    mlp = model.model.layers[0].mlp
    mlp.act_fn = torch.nn.SiLU()  # by hand: the wrapper reads the activation every call and goes dense
    with torch.no_grad():
        x = torch.randn(1, 32)
        torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
        set_activation(model, "silu")  # through the API: unsparsified
        assert not hf_stochact.is_sparsified(model)
        reference_model = tiny_llama("silu").eval()
        torch.testing.assert_close(model(input_ids=ids).logits, reference_model(input_ids=ids).logits)


class _Wrapped(torch.Tensor):
    """A tensor subclass standing for quantized / DTensor weights: the loops must never see its data pointer."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_weights_take_the_dense_path():
    torch.manual_seed(0)
    model = tiny_llama("relu").eval()
    ids = torch.randint(3, 97, (1, 1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        for mlp in find_mlps(model):
            mlp.up.weight = torch.nn.Parameter(mlp.up.weight.detach().as_subclass(_Wrapped), requires_grad=False)
        sparsify(model, max_density=1.0)
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)
    assert sparse_stats(model) == {"sparse": 0, "dense": 2}


def test_accelerate_hooks_survive_sparsify_and_unsparsify():
    from accelerate import cpu_offload, dispatch_model

    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 1))
    base = tiny_llama("relu").eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    # hooks on the MLP modules themselves (device map split at the MLPs), weights resident
    model = tiny_llama("relu").eval()
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(2):
        device_map.update({f"model.layers.{i}.self_attn": "cpu", f"model.layers.{i}.input_layernorm": "cpu",
                           f"model.layers.{i}.post_attention_layernorm": "cpu", f"model.layers.{i}.mlp": "cpu"})
    dispatch_model(model, device_map=device_map, force_hooks=True)
    mlp = model.model.layers[0].mlp
    before = (mlp.forward, mlp._hf_hook)
    sparsify(model, max_density=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert sparse_stats(model)["sparse"] == 2
    unsparsify(model)
    assert model.model.layers[0].mlp is mlp and (mlp.forward, mlp._hf_hook) == before
    # weights offloaded (meta until the hooks load them): the sparse path sees them only inside the hooks
    offloaded = tiny_llama("relu").eval()
    cpu_offload(offloaded, execution_device="cpu")
    sparsify(offloaded, max_density=1.0)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_sparsify_then_unsparsify_restores_modules_exactly():
    model = tiny_llama("relu")
    modules = dict(model.named_modules())
    forwards = {n: m.__dict__.get("forward") for n, m in modules.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsify(model)
    assert isinstance(model.model.layers[1].mlp, SparseMLP)
    assert set(model.state_dict()) == set(weights)
    unsparsify(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] and m.__dict__.get("forward") is forwards[n] for n, m in model.named_modules())
    assert all(torch.equal(p, weights[n]) and p.is_contiguous() for n, p in model.named_parameters())


def test_schedule_metrics_reach_callbacks_registered_before_it():
    """The schedule runs ahead of the reporting integrations (which the Trainer puts first) without reordering
    anything while the handler iterates."""
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerCallback

    class Reporter(TrainerCallback):  # stands for TensorBoardCallback & co.
        pass

    schedule = hf_stochact.StochActSchedule()
    handler = CallbackHandler([DefaultFlowCallback, Reporter(), schedule], None, None, None, None)
    assert handler.callbacks[0] is schedule
    shift = hf_stochact.GateShiftSchedule(0.5)
    handler.add_callback(shift)
    assert handler.callbacks[:2] == [schedule, shift]
