"""hf_stochact.uncertainty: the scores' definitions, seeds and chunking, every kind of FFN activation, the CLI."""

import math

import pytest
import torch
from helpers import tiny_llama

import hf_stochact
from hf_stochact.activations import scope
from hf_stochact.analysis.uncertainty import (
    SCORES,
    _sample_generator,
    uncertainty,
    uncertainty_curve,
    uncertainty_of_generation,
)
from hf_stochact.cli import main
from hf_stochact.inference.decoding import stochastic_decoding


def ids(n=10, seed=1):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


def sharpened(model):
    """Larger gate inputs and logits than at initialisation: samples (and their argmax) that differ visibly."""
    for mlp in hf_stochact.find_mlps(model):
        mlp.pre.weight.data *= 8
    model.lm_head.weight.data *= 30
    return model.eval()


@pytest.fixture(scope="module")
def silu():
    return sharpened(tiny_llama("silu"))


def reference(model, x, samples, p, seed):
    """The definition, by hand: sample s = a batch-of-one forward drawing from generator s; PE/EE/MI in float64."""
    probs = []
    with torch.inference_mode(), stochastic_decoding(model, p):
        for s in range(samples):
            with scope.row_generators([_sample_generator(seed, s)]):
                probs.append(torch.softmax(model(x[None]).logits[0].double(), -1))
    probs = torch.stack(probs)  # [S, T, V]
    mean = probs.mean(0)
    pe = -(mean * mean.log()).sum(-1)
    ee = -(probs * probs.log()).sum(-1).mean(0)
    with torch.inference_mode():
        det = torch.softmax(model(x[None]).logits[0].double(), -1)
    disagreement = (probs.argmax(-1) != det.argmax(-1)).double().mean(0)
    return probs, pe, ee, disagreement, det


def test_scores_match_the_hand_computed_definition(silu):
    x = ids()
    probs, pe, ee, disagreement, det = reference(silu, x, 5, 0.5, seed=7)
    assert not torch.allclose(probs[0], probs[1]), "samples draw different masks"
    r = uncertainty(silu, x, samples=5, p=0.5, seed=7)
    torch.testing.assert_close(r.predictive_entropy.double(), pe, atol=2e-5, rtol=0)
    torch.testing.assert_close(r.expected_entropy.double(), ee, atol=2e-5, rtol=0)
    torch.testing.assert_close(r.mutual_information.double(), (pe - ee).clamp_min(0), atol=2e-5, rtol=0)
    assert r.mutual_information.max() > 1e-3
    torch.testing.assert_close(r.disagreement.double(), disagreement)
    torch.testing.assert_close(r.entropy.double(), -(det * det.log()).sum(-1), atol=2e-5, rtol=0)
    torch.testing.assert_close(r.max_probability.double(), det.max(-1).values, atol=1e-6, rtol=0)
    assert torch.equal(r.greedy, det.argmax(-1))
    assert torch.equal(r.positions, torch.arange(10)) and torch.equal(r.tokens[:-1], x[1:]) and r.tokens[-1] == -1
    torch.testing.assert_close(r.log_probability[:-1].double(), det[:-1].log().gather(-1, x[1:, None])[:, 0],
                               atol=2e-5, rtol=0)
    assert math.isnan(r.log_probability[-1])
    assert (r.mutual_information >= 0).all()
    s = r.summary()
    assert set(f"mean_{k}" for k in SCORES) <= set(s) and s["positions"] == 10
    assert s["mean_nll"] == pytest.approx(float(-r.log_probability[:-1].mean()))


@pytest.mark.parametrize("act", ["silu", "relu", "stochastic"])
def test_each_batch_row_draws_what_a_batch_of_one_with_its_generator_draws(act):
    model = sharpened(tiny_llama(act))
    x = ids()
    with torch.inference_mode(), stochastic_decoding(model, 0.5):
        with scope.row_generators([_sample_generator(0, s) for s in range(3)]):
            batched = model(x[None].expand(3, -1)).logits
        alone = []
        for s in range(3):
            with scope.row_generators([_sample_generator(0, s)]):
                alone.append(model(x[None]).logits[0])
    assert not torch.allclose(batched[0], batched[1]), "rows draw independent masks"
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_batched_equals_sequential_and_chunking_changes_nothing(silu):
    x = ids(12)
    runs = [uncertainty(silu, x, samples=6, p=0.7, seed=3, batch_size=b) for b in (1, 4, 6)]
    for other in runs[1:]:
        for name in ("predictive_entropy", "expected_entropy", "mutual_information", "disagreement"):
            torch.testing.assert_close(getattr(other, name), getattr(runs[0], name), atol=1e-5, rtol=0)
    curve = uncertainty_curve(silu, x, (2, 6), p=0.7, seed=3, batch_size=4)
    torch.testing.assert_close(curve[6].mutual_information, runs[0].mutual_information, atol=1e-5, rtol=0)
    two = uncertainty(silu, x, samples=2, p=0.7, seed=3)
    torch.testing.assert_close(curve[2].mutual_information, two.mutual_information, atol=1e-5, rtol=0)


def test_reproducible_under_manual_seed(silu):
    x = ids()
    torch.manual_seed(5)
    a = uncertainty(silu, x, samples=3, p=0.5)
    torch.manual_seed(5)
    b = uncertainty(silu, x, samples=3, p=0.5)
    assert a.seed == b.seed and torch.equal(a.mutual_information, b.mutual_information)
    c = uncertainty(silu, x, samples=3, p=0.5, seed=a.seed + 1)
    assert not torch.equal(a.mutual_information, c.mutual_information)


@pytest.mark.parametrize("act,p", [("relu", 0.0), ("silu", 1.0)])
def test_no_mutual_information_when_p_makes_the_model_deterministic(act, p):
    model = tiny_llama(act).eval()
    with pytest.warns(UserWarning, match="draws nothing at random"):
        r = uncertainty(model, ids(), samples=4, p=p, seed=0)
    assert r.mutual_information.abs().max() < 1e-5 and (r.disagreement == 0).all()
    # p=0 on ReLU is plain ReLU, p=1 on SiLU plain SiLU: the samples are the deterministic forward
    torch.testing.assert_close(r.predictive_entropy, r.entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["relu", "gelu", "stochastic"])
def test_every_kind_of_ffn_activation(act):
    model = sharpened(tiny_llama(act))
    r = uncertainty(model, ids(), samples=3, seed=0, batch_size=2)  # p: the kind's default
    assert r.mutual_information.max() > 0 and (r.mutual_information >= 0).all()
    assert r.p is None


def test_finished_generation_scores_only_generated_tokens(silu):
    prompt = ids(6)
    with torch.inference_mode():
        out = silu.generate(prompt[None].repeat(2, 1), attention_mask=torch.ones(2, 6, dtype=torch.long),
                            max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = uncertainty_of_generation(silu, out, prompt_length=6, samples=3, p=0.5, seed=1)
    assert len(results) == 2
    r = results[0]
    assert torch.equal(r.positions, torch.arange(5, 9)) and torch.equal(r.tokens, out[0, 6:])
    assert torch.equal(r.greedy, out[0, 6:]), "greedy generation: every token is the deterministic argmax"
    full = uncertainty(silu, out[0], samples=3, p=0.5, seed=1)
    torch.testing.assert_close(r.mutual_information, full.mutual_information[5:9], atol=1e-5, rtol=0)
    assert results[1].seed == 2


@pytest.mark.parametrize("kwargs,name", [
    (dict(samples=0), "samples"), (dict(samples=2.0), "samples"), (dict(p=1.5), "p"), (dict(p=-0.1), "p"),
    (dict(batch_size=0), "batch_size"), (dict(prompt_length=10), "prompt_length"),
    (dict(prompt_length=-1), "prompt_length"),
])
def test_bad_arguments_name_themselves(silu, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        uncertainty(silu, ids(), **kwargs)


@pytest.mark.parametrize("bad", [torch.zeros(2, 5, dtype=torch.long), torch.zeros(5), torch.zeros(0, dtype=torch.long),
                                 [1, 2, 3]])
def test_bad_input_ids(silu, bad):
    with pytest.raises(ValueError, match="^input_ids "):
        uncertainty(silu, bad)


def test_training_mode_is_refused():
    model = tiny_llama("silu").train()
    with pytest.raises(ValueError, match="training mode"):
        uncertainty(model, ids())


def save_tiny(path):
    from hf_stochact.data import train_tokenizer

    tok = train_tokenizer("def f(x):\n    return x + 1\n" * 300, vocab_size=97)
    model = tiny_llama("silu")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_cli_prints_scores_and_marked_text(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    png = tmp_path / "u.png"
    assert main(["uncertainty", "--model", str(tmp_path / "m"), "--text", "def f(x):\n    return x + 1",
                 "--samples", "3", "--p", "0.5", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "3 samples, stochastic_p=0.5" in out and "MI" in out and "mean: mutual_information" in out
    assert "[[" in out, "plain brackets mark the top tokens when stdout is not a terminal"
    assert png.exists()
    assert main(["uncertainty", "--model", str(tmp_path / "m"), "--prompt", "def f(", "--no-chat", "--samples", "2",
                 "--max-new-tokens", "4"]) == 0
    assert "greedy reply (4 tokens)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,flag", [
    (["--text", "x", "--samples", "0"], "--samples"), (["--text", "x", "--p", "2"], "--p"),
    (["--text", "x", "--prompt", "y"], "--prompt"), ([], "--text"),
])
def test_cli_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    save_tiny(tmp_path / "m")
    with pytest.raises(SystemExit) as exit_:
        main(["uncertainty", "--model", str(tmp_path / "m"), *argv])
    assert exit_.value.code == 2
    assert f"hf-stochact uncertainty: error: {flag}: " in capsys.readouterr().err
