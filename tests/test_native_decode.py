"""The native decode step behind fast_decode: exact per family (tokens and logits), sparse and thresholded plans,
fallbacks with their reasons, stale-plan safety, threads, sliding windows (issue: fast_decode on Mistral/Gemma)."""

import threading

import pytest
import torch
import transformers as tf
from helpers import tiny_llama
from torch import nn

from hf_stochact import calibrate_thresholds, fast_decode, sparsify, unsparsify
from hf_stochact.activations import scope
from hf_stochact.kernels import native as kn
from hf_stochact.runtime import native
from hf_stochact.runtime.fast import decode_path, is_fast

pytestmark = pytest.mark.skipif(not kn.available(), reason="the C loops are not built")

FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {}),  # default config: sliding_window=4096
    "mistral-no-window": (tf.MistralForCausalLM, tf.MistralConfig, {"sliding_window": None}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),  # q/k/v biases
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, {"head_dim": 16}),  # q/k norms
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, {"head_dim": 16}),  # 4 norms, soft-capping, sliding layers
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, {"head_dim": 16}),  # + q/k norms, local/global rope
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # fused
}


def family(name, dtype=torch.float32, **overrides):
    cls, config_cls, extra = FAMILIES[name]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=211, **{**extra, **overrides})
    torch.manual_seed(0)
    model = cls(config).eval().to(dtype)
    for p in model.parameters():  # non-trivial norms and biases (the defaults are ones/zeros)
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(dtype) * 0.1)
    return model


def prompt(n=7, seed=1, vocab=211):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n=32, **kwargs):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_native_step_gives_eagers_tokens_and_logits(name, dtype):
    model = family(name, dtype)
    ids = prompt()
    eager = greedy(model, ids)
    assert fast_decode(model) is model and is_fast(model)
    built = native.runner_of(model).built
    assert built is not None, decode_path(model)
    # the self-check compared two native steps with the model's forward: its error is float rounding
    assert built.check_error < (5e-2 if dtype == torch.bfloat16 else 1e-5), built.check_error
    fast = greedy(model, ids)
    assert torch.equal(fast, eager)
    assert native.runner_of(model).counts["native"] == 31, decode_path(model)
    assert decode_path(model).startswith("native decode step")
    assert type(model).__name__ == FAMILIES[name][0].__name__  # the generated subclass keeps the name
    fast_decode(model, enable=False)
    assert not is_fast(model) and type(model) is FAMILIES[name][0]


def test_logits_of_every_step_match_the_models_forward():
    model = family("llama")
    fast_decode(model)
    ids = prompt(5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        full = native.model_forward(model, input_ids=out.sequences, use_cache=False).logits[0]
    for i, step_logits in enumerate(out.logits[1:], start=1):  # steps after the prefill are native
        torch.testing.assert_close(step_logits[0], full[ids.shape[1] + i - 1], atol=2e-5, rtol=1e-5)


def relu_model():
    model = tiny_llama("relu", layers=3)
    return model.eval()


def test_exact_sparse_relu_ffn_and_thresholds_run_natively_with_the_eager_sparse_tokens():
    model = relu_model()
    calibrate_thresholds(model, torch.randint(3, 97, (4, 32)), 0.4, allocation="uniform")
    sparsify(model, max_density=1.0)
    ids = prompt(vocab=97)
    eager = greedy(model, ids, 24)
    fast_decode(model)
    built = native.runner_of(model).built
    assert built is not None, decode_path(model)
    assert "thresholded layers" in built.summary and "exact sparse ReLU FFNs" in built.summary
    assert torch.equal(greedy(model, ids, 24), eager)
    assert native.runner_of(model).counts["native"] == 23


def test_a_model_changed_after_fast_decode_never_runs_a_stale_plan():
    model = relu_model()
    ids = prompt(vocab=97)
    fast_decode(model)
    first = native.runner_of(model).built
    sparsify(model)  # modules replaced: the registration counter moves
    out = greedy(model, ids, 12)
    rebuilt = native.runner_of(model).built
    assert rebuilt is not None and rebuilt is not first and "exact sparse ReLU FFNs" in rebuilt.summary
    reference = relu_model()
    sparsify(reference)
    assert torch.equal(out, greedy(reference, ids, 12))
    unsparsify(model)
    model.to(torch.bfloat16)  # new storage for every parameter: the pointers move
    out16 = greedy(model, ids, 12)
    assert "bfloat16" in native.runner_of(model).built.summary
    assert torch.equal(out16, greedy(relu_model().to(torch.bfloat16), ids, 12))
    negated = relu_model().to(torch.bfloat16)
    with torch.no_grad():  # in-place updates are read where they are (no copy to refresh)
        model.lm_head.weight.mul_(-1)
        negated.lm_head.weight.mul_(-1)
    assert torch.equal(greedy(model, ids, 12), greedy(negated, ids, 12))


def test_calls_the_step_cannot_take_run_the_models_forward_with_the_reason():
    model = family("llama")
    fast_decode(model)
    runner = native.runner_of(model)
    batch = torch.cat([prompt(seed=1), prompt(seed=2)])
    reference = family("llama")
    assert torch.equal(greedy(model, batch, 6), greedy(reference, batch, 6))  # batch of 2: never native
    assert runner.counts["native"] == 0
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    out = greedy(model, prompt(), 6, attention_mask=mask)
    assert torch.equal(out, greedy(reference, prompt(), 6, attention_mask=mask))
    assert runner.counts["positions that do not follow the cache (padding)"] == 5
    # hooks run in the model's own forward: a hooked model never takes the native step
    seen = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append(1))
    greedy(model, prompt(), 4)
    assert len(seen) == 4 and any("forward hook" in k for k in runner.counts)
    handle.remove()
    before = runner.counts["native"]
    greedy(model, prompt(), 4)
    assert runner.counts["native"] == before + 3


def test_a_lora_adapter_is_never_ignored():
    peft = pytest.importorskip("peft")
    model = family("llama")
    fast_decode(model)
    ids = prompt()
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
    out = lora.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    runner = native.runner_of(model)
    assert runner.built is None and ("not a plain nn.Linear" in runner.reason or "not a gated MLP" in runner.reason)
    fast_decode(model, enable=False)
    plain = lora.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)
    base = family("llama")
    assert not torch.equal(out, greedy(base, ids, 8))  # the adapter does change the tokens


def test_threads_with_their_own_caches_share_one_plan():
    model = family("qwen2")
    fast_decode(model)
    prompts = [prompt(seed=s) for s in range(4)]
    expected = [greedy(model, p, 16) for p in prompts]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = greedy(model, prompts[i], 16)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


def test_a_window_shorter_than_the_generation_rolls_as_transformers_does():
    model = family("mistral", sliding_window=6)
    ids = prompt(4)
    eager = greedy(model, ids, 20)  # dynamic cache, model's own forward
    fast_decode(model)
    assert native.runner_of(model).built is not None
    assert torch.equal(greedy(model, ids, 20), eager)
    assert native.runner_of(model).counts["native"] == 19


def test_sliding_window_models_without_the_native_step_decode_eagerly_instead_of_recompiling():
    model = family("mistral")
    eager = greedy(model, prompt())
    fast_decode(model, native=False)
    assert decode_path(model).startswith("eager (native step unavailable: not asked for")
    assert "recompile every step" in decode_path(model)
    assert torch.equal(greedy(model, prompt()), eager)


def test_unsupported_layouts_say_why():
    model = family("llama")
    model.model.layers[1].mlp.act_fn = nn.Tanh()
    fast_decode(model, native=True)
    assert "none of silu" in decode_path(model) and decode_path(model).startswith("compiled decode step")
    fast_decode(model, enable=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_self_check_refuses_a_plan_that_does_not_describe_the_model(monkeypatch, dtype):
    model = family("gemma2", dtype)
    assert native.build(model).check_error < 0.05
    monkeypatch.setattr(native, "_embed_scale", lambda *args: 1.0)  # Gemma scales its embeddings by sqrt(d)
    with pytest.raises(native.Unsupported, match="disagrees with the model's forward"):
        native.build(model)


def test_the_checked_entry_refuses_what_the_step_cannot_read():
    keep = kn.Keep()
    with pytest.raises(ValueError, match="is not a contiguous CPU float32/bfloat16"):
        kn.linear_spec(keep, torch.zeros(4, 8).t(), None, kn.ROWS, 4, 8)
    with pytest.raises(ValueError, match="is not a contiguous CPU float32/bfloat16"):
        kn.linear_spec(keep, torch.zeros(8, 4, dtype=torch.float16), None, kn.ROWS, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        kn.linear_spec(keep, torch.zeros(8, 4), torch.zeros(5), kn.ROWS, 4, 8)
    model = family("llama")
    built = native.build(model)
    cache = tf.StaticCache(config=model.config, max_cache_len=4)
    with torch.no_grad():
        native.model_forward(model, input_ids=prompt(4), use_cache=True, **{native._cache_field(): cache})
    logits = torch.empty(built.plan.vocab)
    assert not native._run(built, cache, 5, 4, 0, None, logits)  # full: nothing written, the caller falls back
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native._run(built, cache, 10**6, 3, 0, None, logits)
    with pytest.raises(ValueError, match="logits must be"):
        native._run(built, cache, 5, 3, 0, None, torch.empty(3))


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_stochastic_decoding_draws_in_the_native_step(act):
    model = tiny_llama(act, layers=2).eval()
    if act == "relu":
        sparsify(model)  # the exact sparse FFN steps aside while a layer draws
    ids = prompt(vocab=97)
    eager = tiny_llama(act, layers=2).eval()
    fast_decode(model)
    runner = native.runner_of(model)
    # p = 0 and p = 1 draw nothing at random: the native draw must pick the same branch as the Python path
    for p in (0.0, 1.0):
        with pytest.warns(UserWarning, match="draws nothing at random"):
            want = greedy(eager, ids, 12, stochastic_activation=True, stochastic_p=p)
        with pytest.warns(UserWarning, match="draws nothing at random"):
            got = greedy(model, ids, 12, stochastic_activation=True, stochastic_p=p)
        assert torch.equal(got, want), p
    assert runner.counts["native"] == 22 and len(runner.counts) == 1, dict(runner.counts)
    # p = 0.5: reproducible under torch's seed, different seeds give different continuations
    runs = []
    for seed in (3, 3, 4, 5, 6):
        torch.manual_seed(seed)
        runs.append(greedy(model, ids, 24, stochastic_activation=True, stochastic_p=0.5))
    assert torch.equal(runs[0], runs[1])
    assert len({tuple(r[0].tolist()) for r in runs[1:]}) > 1
    assert set(runner.counts) == {"native"} and runner.counts["native"] > 22 + 5 * 5  # (EOS may end a run early)


def test_draws_the_native_step_cannot_make_run_in_the_models_forward():
    model = family("llama")
    fast_decode(model)
    torch.manual_seed(0)
    with scope.row_generators([torch.Generator().manual_seed(1)]):
        greedy(model, prompt(), 4, stochastic_activation=True, stochastic_p=0.5)
    assert any("per-row generators" in k for k in native.runner_of(model).counts)


def test_copies_and_pickles_of_a_fast_model():
    import copy
    import pickle

    model = family("llama")
    ids = prompt()
    eager = greedy(model, ids, 8)
    fast_decode(model)
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and torch.equal(greedy(twin, ids, 8), eager)
    assert native.runner_of(twin) is not native.runner_of(model) and native.runner_of(twin).counts["native"] == 7
    restored = pickle.loads(pickle.dumps(model))  # pickled as the original class: set up again with fast_decode
    assert type(restored) is FAMILIES["llama"][0] and native.runner_of(restored) is None
    assert torch.equal(greedy(restored, ids, 8), eager)


@pytest.mark.parametrize("rotate", ["pca", "pca-all"])
def test_rotated_thresholds_run_natively(rotate):
    model = family("llama")
    calib = torch.randint(3, 211, (4, 48), generator=torch.Generator().manual_seed(5))
    calibrate_thresholds(model, calib, 0.4, allocation="uniform", rotate=rotate)
    sparsify(model, max_density=1.0)
    ids = prompt()
    eager = greedy(model, ids, 16)
    fast_decode(model)
    built = native.runner_of(model).built
    assert built is not None and "rotated" in built.summary, decode_path(model)
    assert torch.equal(greedy(model, ids, 16), eager)
    assert native.runner_of(model).counts["native"] == 15


def test_new_thresholds_after_fast_decode_rebuild_the_plan():
    model = family("llama")
    calib = torch.randint(3, 211, (4, 48), generator=torch.Generator().manual_seed(5))
    first = calibrate_thresholds(model, calib, 0.3, allocation="uniform")
    sparsify(model)
    fast_decode(model)
    ids = prompt()
    greedy(model, ids, 4)
    before = native.runner_of(model).built
    second = calibrate_thresholds(family("llama"), calib, 0.6, allocation="uniform")
    sparsify(model, thresholds=second)  # the same wrappers, new thresholds
    out = greedy(model, ids, 12)
    assert native.runner_of(model).built is not before
    reference = family("llama")
    sparsify(reference, thresholds=second)
    assert torch.equal(out, greedy(reference, ids, 12))
    del first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["mistral", "mistral-no-window", "gemma2", "gemma3", "qwen3"])
def test_thresholded_sliding_window_families_decode_natively(name, dtype):
    """fp32: eager's tokens. bf16: the model's forward rounds activations to bfloat16 where the step keeps float32,
    so an input at its threshold can land on the other side and a near tie can flip a token: every step's logits are
    compared with the forward's on the same sequence instead."""
    model = family(name, dtype)
    calib = torch.randint(3, 211, (4, 48), generator=torch.Generator().manual_seed(5))
    calibrate_thresholds(model, calib, 0.3, allocation="uniform")
    sparsify(model, max_density=1.0)
    ids = prompt()
    eager = greedy(model, ids)
    fast_decode(model)
    assert native.runner_of(model).built is not None, decode_path(model)
    if dtype == torch.float32:
        assert torch.equal(greedy(model, ids), eager)
    else:
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        with torch.no_grad():
            full = native.model_forward(model, input_ids=out.sequences, use_cache=False).logits[0].float()
        for i, step in enumerate(out.logits[1:], start=1):
            ref = full[ids.shape[1] + i - 1]
            assert (step[0].float() - ref).norm() / ref.norm() < 0.2, i  # bf16 alone: up to 0.09 on SmolLM2
    assert native.runner_of(model).counts["native"] == (31 if dtype == torch.float32 else 15)


def test_fast_decode_off_restores_the_users_generation_settings():
    from transformers import CompileConfig

    model = family("llama")
    config = model.generation_config
    config.compile_config, config.disable_compile = CompileConfig(fullgraph=True), True
    before = (config.cache_implementation, config.compile_config, config.disable_compile)
    fast_decode(model)
    fast_decode(model, native=False)  # a second call keeps the first call's saved settings
    assert config.cache_implementation == "static"
    fast_decode(model, enable=False)
    assert (config.cache_implementation, config.compile_config, config.disable_compile) == before


def test_the_old_import_path_still_works_with_a_deprecation_warning():
    import hf_stochact.inference.fast as old

    with pytest.warns(DeprecationWarning, match="moved to hf_stochact.runtime.fast.fast_decode"):
        assert old.fast_decode is fast_decode


def test_save_pretrained_after_fast_decode_writes_none_of_it(tmp_path):
    model = family("llama")
    fast_decode(model)
    model.save_pretrained(tmp_path)
    assert model.generation_config.cache_implementation == "static"  # still fast in this process
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    config = loaded.generation_config
    assert config.cache_implementation is None and config.compile_config is None and not config.disable_compile
    assert torch.equal(greedy(loaded, prompt(), 8), greedy(model, prompt(), 8))


def test_thousands_of_steps_do_not_grow_memory():
    """Scratch is malloc'd and freed per call; plans and bindings are built once: after a warm-up, 3,000 more steps
    leave the resident set where it was (a leak of 3 KB per step, a tiny model's scratch, would add 9 MB)."""
    import os

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs Linux's /proc to read the resident set")
    model = family("llama")
    fast_decode(model)
    ids = prompt()
    page = os.sysconf("SC_PAGE_SIZE")

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def steps(n):
        for _ in range(n // 100):
            model.generate(ids, max_new_tokens=101, min_new_tokens=101, do_sample=False, pad_token_id=0)

    steps(1000)
    before = resident()
    steps(3000)
    assert resident() - before < 6 * 2**20, (resident() - before) / 2**20
    assert native.runner_of(model).counts["native"] == 4000


def test_an_accelerate_hook_makes_the_step_run_the_models_forward():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = family("llama")
    ids = prompt()
    eager = greedy(model, ids, 6)
    fast_decode(model)
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, Counting())
    assert torch.equal(greedy(model, ids, 6), eager)
    assert len(calls) == 6 and any("accelerate hook" in k for k in native.runner_of(model).counts)
    remove_hook_from_module(mlp)
    greedy(model, ids, 6)
    assert native.runner_of(model).counts["native"] == 5
