"""generate(stochastic_activation=True): every decoding mode, scoping and restoration, persistence, bad input."""

import pytest
import torch
import transformers as tf
from helpers import tiny_llama
from transformers.generation.utils import GenerationMixin

import hf_stochact
from hf_stochact import StochasticActivation, ffn_activations, set_generation_defaults, stochastic_decoding
from hf_stochact.activations import scope

ORIGINAL_GENERATE = GenerationMixin.generate.__wrapped__


def tiny_gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


MODELS = {"llama-silu": lambda: tiny_llama("silu").eval(), "gpt2-gelu": tiny_gpt2,
          "llama-stochastic": lambda: tiny_llama("stochastic").eval()}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def prompt(batch=1, t=6):
    return torch.randint(3, 97, (batch, t), generator=torch.Generator().manual_seed(1))


def scores(model, seed, **kwargs):
    torch.manual_seed(seed)
    out = model.generate(prompt(), max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=0, **kwargs)
    return torch.stack(out.scores), out.sequences


def switched(module):
    """Whether the current call makes this activation module draw (read inside a forward)."""
    return scope.draw_for(module) is not None


def snapshot(model):
    """Everything a stochastic call must leave as it was: hooks, instance attributes, stochastic settings."""
    return [(type(m).__name__, tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()),
             sorted(vars(m)), getattr(m, "sampling", None), getattr(m, "spec", None))
            for _, _, _, m in ffn_activations(model)]


def assert_restored(model, before=None):
    assert scope.current() is None, "no per-call state may outlive the call"
    for _, _, _, m in ffn_activations(model):
        assert "forward" not in vars(m)
        if isinstance(m, StochasticActivation):
            assert m.sampling is None
    if before is not None:
        assert snapshot(model) == before


def test_without_the_flag_generate_is_unchanged(model):
    ids = prompt()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    base = ORIGINAL_GENERATE(model, ids, **kw)
    for extra in ({}, {"stochastic_activation": False}):
        out = model.generate(ids, **kw, **extra)
        assert torch.equal(out.sequences, base.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, base.scores))


def test_flag_samples_every_forward_including_prefill_and_is_reproducible(model):
    before = snapshot(model)
    det, _ = scores(model, 0)
    a, seq_a = scores(model, 0, stochastic_activation=True, stochastic_p=0.5)
    b, seq_b = scores(model, 0, stochastic_activation=True, stochastic_p=0.5)
    c, _ = scores(model, 1, stochastic_activation=True, stochastic_p=0.5)
    assert torch.equal(a, b) and torch.equal(seq_a, seq_b), "same seed, same output"
    assert not torch.equal(a[0], c[0]), "prefill logits must change with the draw"
    assert not torch.equal(a[-1], c[-1]), "decode-step logits must change with the draw"
    assert not torch.equal(a[0], det[0])
    assert_restored(model, before)


def test_stock_p_one_is_the_model_itself_and_p_zero_is_relu_and_both_warn():
    model = tiny_llama("silu").eval()
    det, _ = scores(model, 0)
    with pytest.warns(UserWarning, match="draws nothing at random"):
        same, _ = scores(model, 3, stochastic_activation=True, stochastic_p=1.0)
    torch.testing.assert_close(same, det)
    relu_model = tiny_llama("relu").eval()
    relu, _ = scores(relu_model, 0)
    with pytest.warns(UserWarning, match="draws nothing at random"):
        swapped, _ = scores(model, 3, stochastic_activation=True, stochastic_p=0.0)
    torch.testing.assert_close(swapped, relu)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, temperature=0.8, top_p=0.9),
        dict(num_beams=3),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=3),
        dict(cache_implementation="static"),
    ],
    ids=["sampling", "beam", "beam-return2", "sample-return3", "static-cache"],
)
def test_decoding_modes(model, kwargs):
    ids = prompt()
    n = kwargs.get("num_return_sequences", 1)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=6, pad_token_id=0, stochastic_activation=True, stochastic_p=0.4,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
        assert out.sequences.shape == (n, ids.shape[1] + 6)
        outs.append(torch.stack(out.scores))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert_restored(model)


def test_left_padded_batch_matches_shapes_and_differs_from_deterministic():
    model = tiny_llama("silu").eval()
    ids = prompt(batch=2, t=6)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True)
    det = model.generate(ids, **kw)
    torch.manual_seed(0)
    sto = model.generate(ids, stochastic_activation=True, stochastic_p=0.5, **kw)
    assert sto.sequences.shape == det.sequences.shape == (2, 11)
    assert not torch.equal(torch.stack(sto.scores), torch.stack(det.scores))


def test_assisted_decoding_leaves_the_assistant_deterministic_unless_asked():
    model, assistant = tiny_llama("silu").eval(), tiny_llama("silu", layers=1).eval()
    seen = []
    for *_, act in ffn_activations(assistant):
        act.register_forward_pre_hook(lambda m, i: seen.append(switched(m)))
    ids = prompt()
    torch.manual_seed(0)
    out = model.generate(ids, assistant_model=assistant, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         stochastic_activation=True, stochastic_p=0.5)
    assert out.shape == (1, 12) and seen and set(seen) == {False}, "assistant must not be switched"
    seen.clear()
    model.generate(ids, assistant_model=assistant, max_new_tokens=6, do_sample=False, pad_token_id=0,
                   stochastic_activation=True, stochastic_p=0.5, stochastic_assistant=True)
    assert seen and set(seen) == {True}
    assert_restored(model)
    assert_restored(assistant)


def test_streamer_receives_the_stochastic_tokens():
    model = tiny_llama("silu").eval()

    class Collect(tf.generation.BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    streamer = Collect()
    torch.manual_seed(0)
    out = model.generate(prompt(), max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=streamer,
                         stochastic_activation=True, stochastic_p=0.5)
    assert streamer.tokens == out[0].tolist()


def test_pipeline_passes_the_flag_through():
    from hf_stochact.data import train_tokenizer

    tok = train_tokenizer("def f(x):\n    return x + 1\n" * 200, vocab_size=300)
    model = tiny_llama("silu")
    model.resize_token_embeddings(len(tok))
    pipe = tf.pipeline("text-generation", model=model.eval(), tokenizer=tok)
    seen = []
    act = ffn_activations(model)[0][3]
    act.register_forward_pre_hook(lambda m, i: seen.append(switched(m)))
    text = pipe("def f(x):", max_new_tokens=8, do_sample=False, stochastic_activation=True, stochastic_p=0.3)
    assert text[0]["generated_text"].startswith("def f(x):")
    assert len(seen) >= 8 and set(seen) == {True}, "every forward of the pipeline's generate is stochastic"
    seen.clear()
    pipe("def f(x):", max_new_tokens=4, do_sample=False)
    assert set(seen) == {False}
    assert_restored(model)


def test_model_is_restored_when_generate_raises(model):
    with pytest.raises(ValueError):
        model.generate(prompt(), max_new_tokens=-1, stochastic_activation=True)
    assert_restored(model)


def test_generation_config_default_saves_and_reloads(tmp_path):
    model = tiny_llama("silu").eval()
    set_generation_defaults(model, stochastic_activation=True, stochastic_p=0.5)
    model.save_pretrained(tmp_path)
    loaded = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.stochastic_activation is True and loaded.generation_config.stochastic_p == 0.5
    a, _ = scores(loaded, 0)
    b, _ = scores(loaded, 0, stochastic_activation=False)
    c, _ = scores(loaded, 0, generation_config=tf.GenerationConfig(stochastic_activation=True, stochastic_p=0.5,
                                                                  max_new_tokens=6))
    assert not torch.equal(a, b), "the saved default turns stochastic decoding on"
    torch.testing.assert_close(a, c)


def test_stochastic_model_uses_its_own_p_and_eval_is_deterministic():
    model = tiny_llama("stochastic").eval()
    hf_stochact.configure(model, p=0.2)
    a, _ = scores(model, 0)
    b, _ = scores(model, 5)
    assert torch.equal(a, b), "eval mode without the flag: deterministic ReLU"
    seen = []
    act = ffn_activations(model)[0][3]
    act.register_forward_pre_hook(lambda m, i: seen.append((m.is_sampling, scope.draw_for(m).p)))
    scores(model, 0, stochastic_activation=True)
    assert set(seen) == {(False, 0.2)}, "the call draws with the module's own p, without switching the module"
    assert act.p == 0.2 and act.sampling is None


@pytest.mark.parametrize("p", [1.5, -0.2, float("nan")])
def test_bad_stochastic_p(p):
    with pytest.raises(ValueError, match="stochastic_p"):
        tiny_llama().generate(prompt(), max_new_tokens=2, stochastic_activation=True, stochastic_p=p)


def test_model_without_ffn_activation_raises():
    model = tiny_llama()
    for _, parent, attr, _ in ffn_activations(model):
        setattr(parent, attr, torch.nn.Identity())
    with pytest.raises(ValueError, match="no FFN activation"):
        model.generate(prompt(), max_new_tokens=2, stochastic_activation=True)
    with pytest.raises(ValueError, match="no FFN activation"):
        with stochastic_decoding(model):
            pass
