"""The relufy recipe's training loss: L1 pressure and distillation from the SiLU teacher."""

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

from hf_stochact.cli.relufy import RelufyConfig, load_teacher
from hf_stochact.training.relufy import RelufyLoss


def _trainer(tmp_path, model, **attrs):
    cls = type("T", (RelufyLoss, tf.Trainer), attrs)
    return cls(model=model, args=training_args(tmp_path), train_dataset=token_dataset())


def _batch():
    ids = token_dataset(n_blocks=2)[0]["input_ids"][None].repeat(2, 1)
    return {"input_ids": ids, "labels": ids}


def test_distill_one_with_the_teacher_itself_is_zero_loss(tmp_path):
    student = tiny_llama("relu")
    teacher = copy.deepcopy(student).eval()
    loss = _trainer(tmp_path, student, teacher=teacher, distill=1.0).compute_loss(student, _batch())
    assert abs(float(loss)) < 1e-5


def test_distill_mixes_cross_entropy_and_kl_from_the_teacher(tmp_path):
    student = tiny_llama("relu")
    teacher = tiny_llama("silu")  # the original activation, and weights that differ
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = _batch()
    trainer = _trainer(tmp_path, student, teacher=teacher, distill=0.25)
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        out = student(**batch)
        s = out.logits.log_softmax(-1).flatten(0, 1)
        t = teacher(input_ids=batch["input_ids"]).logits.log_softmax(-1).flatten(0, 1)
        kl = (t.exp() * (t - s)).sum(-1).mean()
    assert float(kl) > 1e-3  # the KL term is not trivially zero
    torch.testing.assert_close(loss.detach(), 0.75 * out.loss + 0.25 * kl, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.model.layers[0].mlp.gate_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_l1_adds_the_mean_absolute_ffn_activation(tmp_path):
    model = tiny_llama("relu")
    batch = _batch()
    acts = []
    handles = [layer.mlp.act_fn.register_forward_hook(lambda m, i, o: acts.append(o.abs().mean()))
               for layer in model.model.layers]
    with torch.no_grad():
        ce = model(**batch).loss
    for h in handles:
        h.remove()
    loss = _trainer(tmp_path, model, l1=2.0).compute_loss(model, batch)
    torch.testing.assert_close(loss.detach(), ce + 2.0 * torch.stack(acts).mean(), rtol=1e-5, atol=1e-6)


def test_no_teacher_without_one_and_bad_distill_weight():
    assert load_teacher(RelufyConfig(model="x")) is None
    with pytest.raises(ValueError, match="distill must be in \\[0, 1\\]"):
        load_teacher(RelufyConfig(model="x", teacher="y", distill=1.5))


def test_bad_target_sparsity_fails_before_any_loading():
    from hf_stochact.cli.relufy import run

    with pytest.raises(ValueError, match=r"--target-sparsity: must be in \[0, 1\)"):
        run(RelufyConfig(model="/nonexistent", target_sparsity=1.2))


def test_relufy_end_to_end_with_gate_shifts(tmp_path):
    """The whole command on a tiny SiLU Llama with its own tokenizer: ReLU + ramped gate shifts, saved plain."""
    from hf_stochact import data
    from hf_stochact.cli.relufy import run

    tokenizer = data.train_tokenizer(data.text_of(data.load_corpus().train, "text", 100_000), vocab_size=300)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            hidden_act="silu")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "silu")
    tokenizer.save_pretrained(tmp_path / "silu")
    report = run(RelufyConfig(model=str(tmp_path / "silu"), output_dir=str(tmp_path / "out"), steps=4,
                              batch_size=2, grad_accum=1, block_size=32, lr=1e-3, warmup_steps=0,
                              train_chars=30_000, eval_chars=6_000, eval_window=64, target_sparsity=0.9,
                              shift_ramp=0.5))
    assert report["sparsity"] > 0.8, report["sparsity"]
    targets = [h["gate_shift/target_sparsity"] for h in report["log_history"] if "gate_shift/target_sparsity" in h]
    assert targets and targets[-1] == pytest.approx(0.9) and targets == sorted(targets)  # the ramp, logged
    def strict(token):
        raise ValueError(f"non-standard JSON constant {token}")

    json.loads((tmp_path / "out" / "relufy_report.json").read_text(), parse_constant=strict)  # no NaN
    saved = tf.AutoConfig.from_pretrained(tmp_path / "out")
    assert saved.hidden_act == "relu" and saved.mlp_bias is True
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.layers[0].mlp.gate_proj.bias.min() < 0
