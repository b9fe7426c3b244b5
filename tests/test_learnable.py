"""learnable_stoch and gumbel_stoch: math, gradients to the gate, eval determinism, save/load, schedule, errors."""

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

from hf_stochact import StochActSchedule, ffn_activations, sparsify
from hf_stochact.activations.learnable import GumbelStochActivation, LearnableStochActivation


def test_registered_and_parameter_count():
    for name, cls in (("learnable_stoch", LearnableStochActivation), ("gumbel_stoch", GumbelStochActivation)):
        act = tf.activations.ACT2FN[name]
        assert isinstance(act, cls) and isinstance(tf.activations.ACT2CLS[name](), cls)
        assert sum(p.numel() for p in act.parameters()) == 13  # 3 * gate_hidden + 1


def test_learnable_is_the_stated_mixture_and_gradients_reach_the_gate():
    act = LearnableStochActivation()
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    act = act.double()
    a = act.relu_weight(x)
    torch.testing.assert_close(act(x), a * torch.relu(x) + (1 - a) * F.silu(x))
    assert torch.allclose(a.mean(), torch.tensor(0.5, dtype=torch.float64), atol=0.2)
    act(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in act.parameters())
    assert torch.autograd.gradcheck(lambda t: act(t), (x[:8].clone().requires_grad_(),))


def test_gumbel_forward_is_exactly_one_branch_with_the_learned_probability():
    act = GumbelStochActivation(init_relu_prob=0.3).train()
    x = torch.empty(200_000).uniform_(-4, -0.1)  # negatives: ReLU gives 0, SiLU does not
    y = act(x)
    is_relu, is_silu = y == 0, y == F.silu(x)
    assert bool((is_relu | is_silu).all())
    p_relu = act.relu_prob(x).mean().item()
    assert abs(is_relu.float().mean().item() - p_relu) < 0.01


def test_gumbel_gradients_reach_the_gate_through_the_straight_through_estimator():
    act = GumbelStochActivation().train()
    x = torch.randn(4096, requires_grad=True)
    act(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in act.parameters())
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gumbel_eval_modes():
    act = GumbelStochActivation().eval()
    x = torch.randn(1000)
    assert torch.equal(act(x), act(x)), "argmax is deterministic"
    z = (act.gate(x) > 0).float()
    torch.testing.assert_close(act(x), z * torch.relu(x) + (1 - z) * F.silu(x))
    act.eval_mode = "mean"
    p = act.relu_prob(x)
    torch.testing.assert_close(act(x), p * torch.relu(x) + (1 - p) * F.silu(x))
    act.eval_mode = "sample"
    torch.manual_seed(0)
    a = act(x)
    torch.manual_seed(1)
    assert not torch.equal(a, act(x))


@pytest.mark.parametrize("name", ["learnable_stoch", "gumbel_stoch"])
def test_trainable_in_a_model_and_saved_with_it(name, tmp_path):
    model = tiny_llama(name)
    gates = [m for *_, m in ffn_activations(model)]
    assert len(gates) == 2 and all(type(g).__name__.endswith("StochActivation") for g in gates)
    before = [p.clone() for p in gates[0].parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 97, (4, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, gates[0].parameters())), "gate parameters train"
    model.save_pretrained(tmp_path)
    loaded = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    for a, b in zip(gates[0].parameters(), ffn_activations(loaded)[0][3].parameters()):
        assert torch.equal(a, b)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_keep_ft_schedule_trains_the_learned_gates_then_swaps_to_relu(tmp_path):
    model = tiny_llama("gumbel_stoch")
    gate = ffn_activations(model)[0][3]
    w0 = gate.gate.w1.detach().clone()
    trainer = tf.Trainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                         callbacks=[StochActSchedule(preset="keep+ft", relu_fraction=0.25)])
    trainer.train()
    assert not torch.equal(w0, gate.gate.w1.detach()), "the gate trained during the 'keep' stage"
    assert all(type(m).__name__ == "ReLU" for *_, m in ffn_activations(model))
    assert model.config.hidden_act == "relu"
    sparsify(model)  # the final ReLU model is sparsifiable


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: LearnableStochActivation(gate_hidden=0), ["gate_hidden", ">= 1"]),
        (lambda: LearnableStochActivation(init_relu_weight=1.0), ["init_relu_weight", "(0, 1)"]),
        (lambda: GumbelStochActivation(temperature=0), ["temperature", "> 0"]),
        (lambda: GumbelStochActivation(temperature=float("nan")), ["temperature"]),
        (lambda: GumbelStochActivation(eval_mode="soft"), ["eval_mode", "argmax", "mean", "sample"]),
        (lambda: GumbelStochActivation(init_relu_prob=-0.5), ["init_relu_prob"]),
        (lambda: StochActSchedule([{"start": 0.0, "activation": "silu"}, {"start": 0.5, "activation": "keep"}]),
         ["'keep' stage", "first stage"]),
    ],
)
def test_bad_arguments(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), (w, str(err.value))
