"""Stochastic decoding semantics and safety: one rule per kind of activation (with the statistics of the draw),
per-call state (threads, overlapping calls, compiled models, static cache), override-generate models, keywords."""

import threading

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

import hf_stochact
from hf_stochact import StochActSchedule, ffn_activations, sparsify, stochastic_decoding
from hf_stochact.activations import scope
from hf_stochact.inference import decoding


def prompt(batch=1, t=6, seed=1):
    return torch.randint(3, 97, (batch, t), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids=None, n=5, **kwargs):
    return model.generate(prompt() if ids is None else ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          **kwargs)


def capture(model):
    """(input, output) of the first FFN activation on every forward; hooks added after hf_stochact's."""
    seen = []
    act = ffn_activations(model)[0][3]
    act.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))
    return seen


def draw_of(model, p, n=8):
    seen = capture(model)
    with torch.no_grad(), stochastic_decoding(model, p):
        for seed in range(n):
            torch.manual_seed(seed)
            model(torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(seed)))
    x = torch.cat([a.flatten() for a, _ in seen])
    y = torch.cat([b.flatten() for _, b in seen])
    return x, y


def binomial_ok(k, n, p, z=5.0):
    return abs(k - n * p) <= z * (n * p * (1 - p)) ** 0.5 + 1


# ---- one rule per kind -----------------------------------------------------------------------------------------


def test_rules_table_covers_each_kind():
    kinds = {r.kind for r in decoding.RULES}
    assert kinds == {"stochastic", "relu", "silu", "other"}
    assert decoding.rule_for(torch.nn.ReLU()).kind == "relu"
    assert decoding.rule_for(torch.nn.SiLU()).kind == "silu"
    assert decoding.rule_for(tf.activations.ACT2FN["gelu_new"]).kind == "other"
    assert decoding.rule_for(tf.activations.ACT2FN["stochastic"]).kind == "stochastic"


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_relu_model_samples_stocha_with_p_the_probability_of_silu_on_negatives(p):
    x, y = draw_of(tiny_llama("relu").eval(), p)
    pos, neg = x >= 0, x < 0
    assert torch.equal(y[pos], x[pos]), "x >= 0 passes as x"
    is_silu = torch.isclose(y[neg], F.silu(x[neg]), atol=1e-6, rtol=1e-5) & (y[neg] != 0)
    assert bool(((y[neg] == 0) | is_silu).all()), "x < 0 gives 0 or SiLU(x)"
    assert binomial_ok(int(is_silu.sum()), int(neg.sum()), p)


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_silu_model_draws_silu_with_probability_p_else_relu_on_every_element(p):
    x, y = draw_of(tiny_llama("silu").eval(), p)
    x, y = x[x.abs() > 1e-3], y[x.abs() > 1e-3]  # where SiLU and ReLU differ
    silu = torch.isclose(y, F.silu(x), atol=1e-6, rtol=1e-5)
    relu = torch.isclose(y, torch.relu(x), atol=1e-6, rtol=1e-5)
    assert bool((silu | relu).all())
    assert binomial_ok(int(silu.sum()), x.numel(), p)


@pytest.mark.parametrize("call_p", [None, 0.85])
def test_stochastic_model_samples_its_spec_at_the_call_p_or_its_own(call_p):
    """A stochastic module (own p = 0.2, the paper's variant) draws SiLU on negatives with the call's p when one is
    given, else with its own; x >= 0 passes as x."""
    model = tiny_llama("stochastic").eval()
    hf_stochact.configure(model, p=0.2)
    x, y = draw_of(model, call_p)
    assert torch.equal(y[x >= 0], x[x >= 0])
    x, y = x[x < -1e-3], y[x < -1e-3]  # where SiLU and ReLU differ
    silu = torch.isclose(y, F.silu(x), atol=1e-6, rtol=1e-5)
    relu = torch.isclose(y, torch.relu(x), atol=1e-6, rtol=1e-5)
    assert bool((silu | relu).all())
    assert binomial_ok(int(silu.sum()), x.numel(), 0.2 if call_p is None else call_p)
    assert ffn_activations(model)[0][3].p == 0.2, "the call leaves the module's own p alone"


def test_k_way_stochastic_model_samples_its_choices():
    model = tiny_llama("stochastic").eval()
    hf_stochact.configure(model, choices={"relu": 0.5, "silu": 0.3, "gelu": 0.2})
    x, y = draw_of(model, None)
    assert torch.equal(y[x >= 0], x[x >= 0]), "the paper's variant draws on x < 0 only"
    keep = x < -0.05  # where the three branches are told apart
    x, y = x[keep], y[keep]
    hits = {name: torch.isclose(y, fn(x), atol=1e-6, rtol=1e-5)
            for name, fn in (("relu", torch.relu), ("silu", F.silu), ("gelu", F.gelu))}
    assert bool(torch.stack(list(hits.values())).any(0).all()), "every element is one of the three branches"
    n = x.numel()
    only = {k: v & ~torch.stack([w for j, w in hits.items() if j != k]).any(0) for k, v in hits.items()}
    # among elements where exactly one branch matches, each branch's share follows its probability
    m = sum(int(v.sum()) for v in only.values())
    assert m > n // 2
    for name, q in (("relu", 0.5), ("silu", 0.3), ("gelu", 0.2)):
        assert binomial_ok(int(only[name].sum()), m, q), name


def test_other_stock_activation_keeps_its_own_output_with_probability_p():
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
    seen = capture(model)
    act = ffn_activations(model)[0][3]
    with torch.no_grad(), stochastic_decoding(model, 0.7):
        for seed in range(8):
            torch.manual_seed(seed)
            model(prompt(2, 16, seed))
    x = torch.cat([a.flatten() for a, _ in seen])
    y = torch.cat([b.flatten() for _, b in seen])
    own, relu = act(x), torch.relu(x)
    keep = y == own
    assert bool((keep | (y == relu)).all())
    differ = own != relu
    assert binomial_ok(int((keep & differ).sum()), int(differ.sum()), 0.7)


def test_default_p_per_kind():
    for act, expected in (("relu", decoding.DEFAULT_RELU_P), ("silu", decoding.DEFAULT_STOCK_P)):
        model = tiny_llama(act)
        assert {d[1] for d in decoding.plan(model).values()} == {expected}
    model = tiny_llama("stochastic")
    hf_stochact.configure(model, p=0.35)
    assert {d.p for d in decoding.plan(model).values()} == {0.35}
    assert {d.p for d in decoding.plan(model, 0.6).values()} == {0.6}


def test_model_the_schedule_produced_is_stochastic_at_decoding(tmp_path):
    model = tiny_llama("stochastic")
    trainer = tf.Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=token_dataset(8),
                         callbacks=[StochActSchedule(relu_fraction=0.5, monitor_every=0)])
    trainer.train()
    model.eval()
    assert isinstance(ffn_activations(model)[0][3], torch.nn.ReLU)
    det = greedy(model, n=8)
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        outs.append(greedy(model, n=8, stochastic_activation=True, stochastic_p=0.9))
    assert any(not torch.equal(o, det) for o in outs), "StochA decoding must change a ReLU model's greedy output"
    assert torch.equal(greedy(model, n=8), det)


def test_k_way_model_rejects_a_two_way_p():
    model = tiny_llama("stochastic")
    hf_stochact.configure(model, choices={"relu": 0.5, "silu": 0.3, "gelu": 0.2})
    with pytest.raises(ValueError, match="stochastic_p .* draws among relu, silu, gelu"):
        greedy(model, stochastic_activation=True, stochastic_p=0.5)
    torch.manual_seed(0)
    assert greedy(model, stochastic_activation=True).shape == (1, 11)


def test_sparsified_relu_model_decodes_stochastically_and_stays_exact_otherwise():
    model = tiny_llama("relu").eval()
    det = greedy(model, n=8)
    sparsify(model, max_density=1.0)
    assert torch.equal(greedy(model, n=8), det)
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        outs.append(greedy(model, n=8, stochastic_activation=True, stochastic_p=0.9))
    assert any(not torch.equal(o, det) for o in outs)
    assert torch.equal(greedy(model, n=8), det)


# ---- per-call state: threads, overlapping calls, compile --------------------------------------------------------


@pytest.mark.parametrize("act", ["silu", "stochastic", "relu"])
def test_threads_plain_calls_never_see_stochastic_ones(act):
    model = tiny_llama(act).eval()
    ids = prompt()
    reference = greedy(model, ids)
    with torch.no_grad():
        logits_before = model(ids).logits
    errors, stochastic_differs = [], []

    def worker(k):
        try:
            for i in range(50):
                if (i + k) % 2:
                    out = greedy(model, ids, stochastic_activation=True, stochastic_p=0.5)
                    stochastic_differs.append(not torch.equal(out, reference))
                else:
                    out = greedy(model, ids)
                    if not torch.equal(out, reference):
                        errors.append(f"thread {k} call {i}: a plain call got {out.tolist()}")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(stochastic_differs) == 100 and any(stochastic_differs)
    assert scope.current() is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before), "the model is exactly as it was"
    assert torch.equal(greedy(model, ids), reference)


def test_overlapping_stochastic_calls_leave_the_model_as_it_was():
    model = tiny_llama("stochastic").eval()
    ids = prompt()
    reference = greedy(model, ids)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker(p):
        try:
            barrier.wait()
            for _ in range(10):
                results.append(greedy(model, ids, n=8, stochastic_activation=True, stochastic_p=p))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (0.3, 0.9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    act = ffn_activations(model)[0][3]
    assert act.sampling is None and act.p == 0.5 and not act.is_sampling
    assert torch.equal(greedy(model, ids), reference)


def test_nested_scopes_restore_the_outer_one():
    model, other = tiny_llama("silu"), tiny_llama("silu", layers=1)
    act, other_act = ffn_activations(model)[0][3], ffn_activations(other)[0][3]
    with stochastic_decoding(model, 0.4):
        assert scope.draw_for(act) == (decoding.SILU_OR_RELU, 0.4) and scope.draw_for(other_act) is None
        with stochastic_decoding(other, 0.6):
            assert scope.draw_for(act)[1] == 0.4 and scope.draw_for(other_act)[1] == 0.6
        assert scope.draw_for(other_act) is None
    assert scope.current() is None


@pytest.mark.parametrize("act", ["silu", "stochastic", "relu"])
def test_compiled_model_sees_the_per_call_decision(act):
    torch._dynamo.reset()
    model = tiny_llama(act).eval()
    ids = prompt(t=8)
    with torch.no_grad():
        plain = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(ids).logits, plain)
        draws = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            with stochastic_decoding(model, 0.5):
                draws.append(compiled(ids).logits)
            torch.manual_seed(seed)
            with stochastic_decoding(model, 0.5):
                eager = model(ids).logits
            torch.testing.assert_close(draws[-1], eager)
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
        assert not torch.equal(draws[0], plain)
        assert torch.equal(compiled(ids).logits, plain), "a plain call after a stochastic one is plain again"


def test_static_cache_auto_compiled_decode_steps_are_stochastic():
    torch._dynamo.reset()
    model = tiny_llama("silu").eval()
    config = tf.GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
                                 compile_config=tf.CompileConfig(backend="eager", fullgraph=True))
    config.compile_config._compile_all_devices = True

    def run(seed, **kwargs):
        torch.manual_seed(seed)
        out = model.generate(prompt(), generation_config=config, return_dict_in_generate=True, output_scores=True,
                             **kwargs)
        return torch.stack(out.scores)

    det = run(0)
    a, b, c = (run(s, stochastic_activation=True, stochastic_p=0.5) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a[-1], c[-1]) and not torch.equal(a[-1], det[-1]), "the compiled decode steps draw"
    torch.testing.assert_close(run(0), det)


# ---- wherever generate works ------------------------------------------------------------------------------------


class ValidatingLlama(tf.LlamaForCausalLM):
    """A model class that overrides generate and validates its keywords itself (as MusicGen does)."""

    def generate(self, inputs=None, **kwargs):
        allowed = {"max_new_tokens", "do_sample", "pad_token_id", "return_dict_in_generate", "output_scores"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise ValueError(f"ValidatingLlama.generate: unknown {sorted(unknown)}")
        return super().generate(inputs, **kwargs)


def test_model_class_overriding_generate_takes_the_flag():
    torch.manual_seed(0)
    model = ValidatingLlama(tiny_llama().config).eval()

    def logits(**kwargs):
        return torch.stack(greedy(model, return_dict_in_generate=True, output_scores=True, **kwargs).scores)

    det = logits()
    torch.manual_seed(0)
    assert not torch.equal(logits(stochastic_activation=True, stochastic_p=0.5), det)
    assert torch.equal(logits(), det)
    with pytest.raises(ValueError, match="stochastic_p .* stochastic decoding is off"):
        greedy(model, stochastic_p=0.5)


def test_explicit_false_wins_over_a_config_default_through_an_override():
    torch.manual_seed(0)
    model = ValidatingLlama(tiny_llama().config).eval()
    det = greedy(model)
    hf_stochact.set_generation_defaults(model, True, 0.5)
    torch.manual_seed(1)
    assert torch.equal(greedy(model, stochastic_activation=False), det)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(stochastic_p=0.5), "stochastic_p but stochastic decoding is off"),
        (dict(stochastic_activation=False, stochastic_p=0.5), "stochastic_p but stochastic decoding is off"),
        (dict(stochastic_assistant=True), "stochastic_assistant but stochastic decoding is off"),
        (dict(stochastic_activation=True, stochastic_pp=0.5), r"unknown keyword\(s\) \['stochastic_pp'\]"),
        (dict(stochastic_activation=True, stochastic_assistant=True), "stochastic_assistant=True but no assistant"),
        (dict(stochastic_activation="yes"), "stochastic_activation must be True or False"),
        (dict(stochastic_activation=True, stochastic_p="0.5"), "stochastic_p must be a number"),
        (dict(stochastic_activation=True, stochastic_p=True), "stochastic_p must be a number"),
    ],
)
def test_unused_or_bad_keywords_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        greedy(tiny_llama().eval(), **kwargs)


def test_generation_config_round_trip(tmp_path):
    config = tf.GenerationConfig(stochastic_activation=True, stochastic_p=0.3, max_new_tokens=5)
    config.save_pretrained(tmp_path)
    loaded = tf.GenerationConfig.from_pretrained(tmp_path)
    assert loaded.stochastic_activation is True and loaded.stochastic_p == 0.3
    model = tiny_llama().eval()
    torch.manual_seed(0)
    a = model.generate(prompt(), generation_config=loaded, do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    b = greedy(model, stochastic_activation=True, stochastic_p=0.3)
    assert torch.equal(a, b)


# ---- config hygiene ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("paper", "stochastic_activation must be a mapping"),
        ([["p", 0.5]], "stochastic_activation must be a mapping"),
        ({"p": "0.3"}, r"stochastic_activation\.p must be a number"),
        ({"p": True}, r"stochastic_activation\.p must be a number"),
        ({"p": 1.5}, r"stochastic_activation\.p must be in \[0, 1\]"),
        ({"variant": "both"}, r"stochastic_activation\.variant must be one of"),
        ({"choices": "relu"}, r"stochastic_activation\.choices must be"),
        ({"q": 0.5}, r"stochastic_activation: unknown setting"),
    ],
)
def test_bad_config_values_name_the_field(value, match):
    config = tiny_llama("stochastic").config
    config.stochastic_activation = value
    with pytest.raises(ValueError, match=match):
        tf.LlamaForCausalLM(config)


@pytest.mark.parametrize("p", [True, "0.3", None, [0.5]])
def test_booleans_and_strings_are_not_probabilities(p):
    with pytest.raises(ValueError, match="p must be a number"):
        hf_stochact.StochasticActivation(p=p)
