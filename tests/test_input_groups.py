"""Thresholded layers that read one input (q/k/v, gate/up) decode in one ``sparse_rows`` call: found at calibration,
exact against the per-layer path and the torch reference, hooks and replaced inputs respected, thread-safe, saved
with the thresholds, and the operator passes opcheck."""

import threading

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

from hf_stochact import ThresholdedLinear, Thresholds, calibrate_thresholds, kernels, sparse_stats, sparsify
from hf_stochact.inference.sparse import InputGroup
from hf_stochact.kernels import ops, reference


def calib(n=4, t=32, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def thresholded(act="silu", sparsity=0.4, allocation="greedy", **kwargs):
    model = tiny_llama(act, **kwargs).eval()
    calibrate_thresholds(model, calib(), sparsity=sparsity, allocation=allocation)
    sparsify(model, max_density=1.0)
    return model


def decode(model, prompt, steps=6, tokens=None):
    """Greedy decode by hand (prefill, then one token per call): the last logits of every step. With ``tokens``
    (a [1, steps] tensor), those tokens are fed instead of each step's argmax: paths whose logits differ in the last
    bit (bfloat16 on another CPU's kernels) are then compared on the same inputs, not on a tie broken differently."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        past, logits, ids = out.past_key_values, [out.logits[:, -1]], prompt
        for i in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
            ids = torch.cat([ids, nxt], 1)
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def test_calibration_finds_the_layers_that_read_one_input():
    model = tiny_llama("silu").eval()
    th = calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"] in th.groups
        assert [f"{mlp}.gate_proj", f"{mlp}.up_proj"] in th.groups
    assert len(th.groups) == 4  # o_proj and down_proj read inputs of their own
    assert Thresholds.from_dict(th.to_dict()) == th


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_equals_per_layer_decode_and_the_torch_reference(dtype):
    model = thresholded().to(dtype)
    groups = {id(m.group) for m in model.modules() if isinstance(m, ThresholdedLinear) and m.group is not None}
    assert len(groups) == 4
    prompt = calib(1, 5, seed=3)
    grouped = decode(model, prompt)
    tokens = grouped[:-1].argmax(-1).reshape(1, -1)  # the grouped path's greedy tokens, fed to the other paths
    with kernels.torch_only():
        reference_logits = decode(model, prompt, tokens=tokens)
    for m in model.modules():
        if isinstance(m, ThresholdedLinear):
            m.group = None
    single = decode(model, prompt, tokens=tokens)
    if dtype == torch.float32:  # the same loop per member: bit for bit
        assert torch.equal(grouped, single)
        torch.testing.assert_close(grouped, reference_logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(grouped, single, rtol=0, atol=0)
        torch.testing.assert_close(grouped.float(), reference_logits.float(), rtol=0.05, atol=0.05)


def test_each_member_counts_its_call_and_members_still_run_their_hooks():
    model = thresholded()
    calls = []
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: calls.append((name, o.shape[-1])))
    before = sparse_stats(model)["sparse"]
    decode(model, calib(1, 5, seed=1), steps=3)
    assert sparse_stats(model)["sparse"] - before == 3 * 7 * 2  # 3 steps x 7 thresholded layers x 2 blocks
    assert [c[0] for c in calls] == ["q_proj", "k_proj", "v_proj"] * 4  # prefill + 3 steps


def test_a_member_whose_input_a_pre_hook_replaced_computes_its_own():
    model = thresholded()
    prompt = calib(1, 5, seed=2)
    k = model.model.layers[1].self_attn.k_proj
    handle = k.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    hooked = decode(model, prompt, steps=3)
    for m in model.modules():
        if isinstance(m, ThresholdedLinear):
            m.group = None
    alone = decode(model, prompt, steps=3)
    handle.remove()
    assert torch.equal(hooked, alone)
    assert not torch.equal(hooked, decode(model, prompt, steps=3))


def test_an_input_modified_in_place_between_members_is_not_reused():
    model = tiny_llama("silu", layers=1).eval()
    calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    sparsify(model, max_density=1.0)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.group
    assert isinstance(group, InputGroup)
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        q = attn.q_proj(x)
        x.mul_(2.0)  # a new version: k must see the new values
        k = attn.k_proj(x)
        for m in (attn.q_proj, attn.k_proj):
            m.group = None
        torch.testing.assert_close(k, attn.k_proj(x), rtol=0, atol=0)
        torch.testing.assert_close(q, attn.q_proj(x / 2.0), rtol=0, atol=0)


def test_threads_decoding_one_grouped_model_get_their_own_results():
    model = thresholded()
    prompts = [calib(1, 4, seed=s) for s in range(4)]
    expected = [decode(model, p, steps=4) for p in prompts]
    errors = []

    def worker(k):
        try:
            for i in range(6):
                j = (k + i) % len(prompts)
                if not torch.equal(decode(model, prompts[j], steps=4), expected[j]):
                    errors.append((k, i))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_groups_survive_save_and_load(tmp_path):
    model = thresholded()
    prompt = calib(1, 5, seed=4)
    expected = decode(model, prompt)
    model.save_pretrained(tmp_path)
    reloaded = sparsify(tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), max_density=1.0)
    assert sum(isinstance(m, ThresholdedLinear) and m.group is not None for m in reloaded.modules()) == 10
    torch.testing.assert_close(decode(reloaded, prompt), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_sparse_rows(path, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 24, dtype=dtype)
    weights = [torch.randn(24, d, dtype=dtype) for d in (40, 8, 8)]
    biases = [torch.randn(40, dtype=dtype), None, torch.randn(8, dtype=dtype)]
    for density in (1.0, 0.05):
        torch.library.opcheck(torch.ops.hf_stochact.sparse_rows.default,
                              (x, weights, biases, [0.3, 0.0, 1.2], density),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_sparse_rows_equals_the_masked_products_per_member(tokens):
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 200)
    weights = [torch.randn(200, d) for d in (256, 64, 3)]
    biases = [None, torch.randn(64), torch.randn(3)]
    thresholds = [0.5, 0.0, 2.0]
    ys, ks = ops.sparse_rows_cpu(x, weights, biases, thresholds, 1.0)
    for y, k, w, b, t in zip(ys, ks, weights, biases, thresholds):
        masked = reference.magnitude_mask(x, t)
        assert int(k) == int((masked != 0).any(0).sum())
        expected = masked @ w + (0 if b is None else b)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="sparse_rows: inconsistent shapes"):
        ops.sparse_rows_cpu(x, [torch.randn(100, 8)], [None], [0.0], 1.0)


def test_inference_mode_decodes_the_same_tokens():
    model = thresholded()
    prompt = calib(1, 5, seed=6)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():  # inference tensors have no version counter: the hand-over checks identity
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


def test_the_portable_loop_and_the_avx512_loop_agree(tmp_path):
    """The AVX-512 path is picked at run time where the CPU has it; HF_STOCHACT_NO_AVX512 forces the portable loop.
    Both sum the same products (in another order): equal within float32 rounding, on any CPU this runs on."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, sys\n"
        "from hf_stochact.kernels import ops\n"
        "torch.manual_seed(0)\n"
        "out = []\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    x = torch.randn(3, 200).to(dtype)\n"
        "    ws = [torch.randn(200, d).to(dtype) for d in (37, 256)]\n"
        "    ys, _ = ops.sparse_rows_cpu(x, ws, [None, torch.randn(256)], [0.4, 0.0], 1.0)\n"
        "    out += [y.float() for y in ys]\n"
        "torch.save(out, sys.argv[1])\n")
    results = []
    for flag in ("", "1"):
        path = tmp_path / f"out{flag}.pt"
        env = {**os.environ, "HF_STOCHACT_NO_AVX512": flag} if flag else {
            k: v for k, v in os.environ.items() if k != "HF_STOCHACT_NO_AVX512"}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for i, (a, b) in enumerate(zip(*results)):
        tol = 1e-4 if i < 2 else 2e-2  # float32 outputs; bfloat16 outputs may round one ulp apart
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_a_result_left_from_a_no_grad_call_is_never_handed_to_a_call_that_records_gradients():
    model = tiny_llama("silu", layers=1)
    calibrate_thresholds(model, calib(), sparsity=0.3, allocation="uniform")
    sparsify(model, max_density=1.0)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 32, requires_grad=True)
    with torch.no_grad():
        attn.q_proj(x)  # leaves k's and v's results for this very x
    k = attn.k_proj(x)  # autograd on: the dense path on the masked input, with a history
    assert k.grad_fn is not None
    k.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
