"""Gate shifts (shifted ReLU): the threshold rule, calibration to a target sparsity on several architectures, exact
folding into the bias (stock reload), sparsify on folded models, the Trainer ramp, and bad input."""

import pytest
import torch
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

from hf_stochact import Stage, StochActSchedule, measure_sparsity, sparsify
from hf_stochact.training.shift import GateShift, GateShiftSchedule, calibrate_shift, shifts_for

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
ARCHS = {  # ReLU FFNs of the three kinds: gated (separate gate), plain with a biased first projection, fused gate_up
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, intermediate_size=256, hidden_act="relu")),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                                     activation_function="relu")),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64,
                                                  activation_function="relu")),
    "phi3-fused": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL, intermediate_size=256, hidden_act="relu",
                                                           pad_token_id=0)),
}


def test_shifts_cut_exactly_the_lowest_scores():
    g = torch.randn(500, 64)
    weight = torch.rand(64) + 0.1
    for sparsity in (0.6, 0.8, 0.95):
        t = shifts_for(g, weight, sparsity)
        assert (t >= 0).all()
        kept = g > t
        assert abs(1 - kept.float().mean().item() - sparsity) < 1e-3
        score = g.clamp(min=0) * weight
        # every kept element outscores every cut one (one global threshold on the impact score)
        assert score[kept].min() >= score[~kept].max()
    # a target below plain ReLU's own sparsity (~50% here) needs no shift
    assert torch.equal(shifts_for(g, weight, 0.2), torch.zeros(64))


def test_weighting_favours_neurons_with_large_output():
    g = torch.rand(1000, 2)  # same pre-activation distribution for both neurons
    t = shifts_for(g, torch.tensor([1.0, 10.0]), 0.5)
    # the neuron whose output weight is 10x larger keeps more of its activations
    assert (g[:, 1] > t[1]).float().mean() > (g[:, 0] > t[0]).float().mean() + 0.3


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_calibration_reaches_target_and_hooks_match_folded_bias(arch, tmp_path):
    model = ARCHS[arch]().eval()
    ids = torch.randint(3, 97, (8, 32))
    before = measure_sparsity(model, ids).overall
    shift = calibrate_shift(model, ids, 0.9, fold=False)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
    sparsity = measure_sparsity(model, ids).overall
    assert before < 0.7 and abs(sparsity - 0.9) < 0.03, (before, sparsity)
    if arch == "phi3-fused":  # no bias on gate_up_proj and no mlp_bias field: cannot be folded
        with pytest.raises(ValueError, match="mlp_bias"):
            shift.fold()
        return
    shift.fold()
    with torch.no_grad():
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, folded)


def test_fold_declares_mlp_bias_and_keeps_other_projections_exact():
    model = ARCHS["llama"]().eval()
    assert model.config.mlp_bias is False
    calibrate_shift(model, torch.randint(3, 97, (4, 32)), 0.85)
    mlp = model.model.layers[0].mlp
    assert model.config.mlp_bias is True
    assert (mlp.gate_proj.bias <= 0).all() and (mlp.gate_proj.bias < 0).any()
    assert torch.equal(mlp.up_proj.bias, torch.zeros(256)) and torch.equal(mlp.down_proj.bias, torch.zeros(64))


def test_fused_shift_only_touches_the_gate_half():
    model = ARCHS["phi3-fused"]().eval()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        plain = mlp.gate_up_proj(x)
        shift = GateShift(model).attach()
        shift.sites[0].shift = torch.full((256,), 0.5)
        shifted = mlp.gate_up_proj(x)
    torch.testing.assert_close(shifted[..., :256], plain[..., :256] - 0.5)
    assert torch.equal(shifted[..., 256:], plain[..., 256:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsify_is_exact_on_a_shifted_model(arch):
    model = ARCHS[arch]().eval()
    calibrate_shift(model, torch.randint(3, 97, (8, 32)), 0.9)
    ids = torch.randint(3, 97, (1, 3))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        sparsify(model, max_density=1.0)
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_schedule_ramps_recalibrates_once_per_step_and_folds(tmp_path, monkeypatch):
    model = tiny_llama("silu")
    calls = []
    original = GateShift._recalibrate
    monkeypatch.setattr(GateShift, "_recalibrate", lambda self, *a: (calls.append(1), original(self, *a)))
    explicit = GateShiftSchedule(0.9, ramp_fraction=0.5, start=0.5)
    assert [explicit.target_at(s, 8) for s in (0, 2, 4, 8)] == pytest.approx([0.5, 0.7, 0.9, 0.9])
    ramp = GateShiftSchedule(0.9, ramp_fraction=0.5)  # start: the model's own ReLU sparsity, measured on step 0
    assert ramp.target_at(3, 8) == 0.0
    args = training_args(tmp_path, max_steps=6, gradient_accumulation_steps=3, learning_rate=1e-3)
    trainer = tf.Trainer(model=model, args=args, train_dataset=token_dataset(),
                         callbacks=[StochActSchedule([Stage(0, "relu")]), ramp])
    trainer.train()
    # one recalibration per layer per optimizer step, not per micro-batch
    assert len(calls) == 6 * 2
    assert 0.3 < ramp._start < 0.8 and ramp.target_at(1, 6) == pytest.approx(ramp._start + (0.9 - ramp._start) / 3)
    assert model.config.mlp_bias is True and model.config.hidden_act == "relu"
    from hf_stochact.inference.decoding import _stock_draw

    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    assert all(h is _stock_draw for h in hooks), "folded: no shift hooks left (only the decoding hooks)"
    sparsity = measure_sparsity(model.eval(), torch.randint(3, 97, (8, 16))).overall
    assert sparsity > 0.8, sparsity
    model.save_pretrained(tmp_path / "out")
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gradients_flow_through_the_shift():
    model = tiny_llama("relu")
    shift = GateShift(model).attach()
    for s in shift.sites:
        s.shift = torch.full((64,), 0.05)
    model(input_ids=torch.randint(3, 97, (2, 8)), labels=torch.randint(3, 97, (2, 8))).loss.backward()
    assert all(s.pre.weight.grad is not None and s.pre.weight.grad.abs().sum() > 0 for s in shift.sites)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity must be a fraction in \\[0, 1\\)"),
    (dict(sparsity=-0.1), "sparsity must be"),
    (dict(sparsity="0.8"), "sparsity must be"),
    (dict(sparsity=0.8, ramp_fraction=1.5), "ramp_fraction must be in \\[0, 1\\]"),
    (dict(sparsity=0.5, start=0.7), "start \\(0.7\\) must not exceed sparsity"),
    (dict(sparsity=0.8, every=0), "every must be a positive"),
    (dict(sparsity=0.8, momentum=1.0), "momentum must be in \\[0, 1\\)"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateShiftSchedule(**kwargs)


def test_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="no FFN with a known pre-activation and down projection"):
        GateShift(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="sparsity must be"):
        calibrate_shift(tiny_llama("relu"), torch.randint(3, 97, (2, 8)), 1.5)
    model = ARCHS["phi3-fused"]()
    with pytest.raises(ValueError, match="mlp_bias"):
        calibrate_shift(model, torch.randint(3, 97, (2, 8)), 0.8)
