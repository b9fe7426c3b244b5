"""Sparsity-aware recovery training (hf_stochact.training.recover, `hf-stochact recover`): the training forward equals
the sparse inference path, straight-through and masked gradients, the Bernoulli mix's statistics and schedule,
LoRA through peft, a Trainer run that lowers the sparse model's loss, the CLI end to end, bad input raises."""

import json
import math

import pytest
import torch
import transformers as tf
from helpers import tiny_llama, token_dataset, training_args

import hf_stochact  # noqa: F401
from hf_stochact import calibrate_thresholds, sparsify, unsparsify
from hf_stochact.kernels.reference import magnitude_mask
from hf_stochact.training.recover import InputSparsityHooks, SparseRecoverySchedule, sparse_input


def calib(n=4, t=32, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def test_sparse_input_forward_and_both_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    keep = x.detach().abs() > 0.5
    for gradient, expected_grad in (("ste", torch.ones_like(x)), ("masked", keep.double())):
        y = sparse_input(x, 0.5, gradient=gradient)
        torch.testing.assert_close(y.detach(), magnitude_mask(x.detach(), 0.5), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    assert sparse_input(x, 0.0) is x  # threshold 0: nothing dropped


def test_the_bernoulli_mix_keeps_a_dropped_input_with_probability_p():
    torch.manual_seed(0)
    x = torch.randn(400, 500)
    below = x.abs() <= 0.8
    for p in (0.0, 0.3, 0.9, 1.0):
        kept = (sparse_input(x, 0.8, p=p) != 0) & below
        rate = float(kept.sum() / below.sum())
        n = int(below.sum())
        assert abs(rate - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9, (p, rate)
        assert bool(((sparse_input(x, 0.8, p=p) != 0) | below).all())  # above the threshold: always kept


@pytest.mark.parametrize("rotate", ["none", "pca"])
def test_hooks_in_eval_mode_compute_what_sparsify_computes(rotate):
    model = tiny_llama().eval()
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate=rotate, save=False)
    x = calib(2, 12, seed=4)
    with torch.no_grad():
        dense = model(x).logits
        with InputSparsityHooks(model, th, p=0.9) as hooks:  # p only in training mode
            assert hooks.attached
            hooked = model(x).logits
        assert not hooks.attached
        torch.testing.assert_close(model(x).logits, dense)  # detached: dense again
        sparsify(model, thresholds=th)
        torch.testing.assert_close(hooked, model(x).logits, rtol=1e-4, atol=1e-5)
        unsparsify(model)
    assert (hooked - dense).abs().max() > 1e-3  # the thresholds did something


def test_schedule_ramps_p_then_trains_sparse_and_logs_it(tmp_path):
    model = tiny_llama()
    th = calibrate_thresholds(model, calib(), 0.5, allocation="uniform", save=False)
    schedule = SparseRecoverySchedule(th, mix_fraction=0.5, p=0.8)
    assert [round(schedule.p_at(s, 8), 6) for s in range(9)] == [0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0, 0]
    assert SparseRecoverySchedule(th).p_at(0, 8) == 0.0
    batch = {k: v[:8] for k, v in token_dataset(8, 16)[:8].items()}
    model.eval()
    with torch.no_grad(), InputSparsityHooks(model, th):
        before = float(model(**batch).loss)
    model.train()
    trainer = tf.Trainer(model=model, args=training_args(tmp_path, max_steps=8, learning_rate=3e-3),
                         train_dataset=token_dataset(), callbacks=[schedule])
    trainer.train()
    assert not schedule.hooks.attached  # removed at the end of training
    logged = [h["sparse/p"] for h in trainer.state.log_history if "sparse/p" in h]
    assert logged[0] > 0 and logged[-1] == 0.0 and logged == sorted(logged, reverse=True)
    model.eval()
    with torch.no_grad(), InputSparsityHooks(model, th):
        after = float(model(**batch).loss)
    assert after < before, (before, after)


def test_lora_adapters_see_the_sparse_input_and_merge_to_the_same_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama().eval()
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", save=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=sorted(th.values),
                                                  init_lora_weights=False))
    x = calib(1, 10, seed=2)
    with torch.no_grad(), InputSparsityHooks(peft_model, th):
        hooked = peft_model(input_ids=x).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        sparsify(merged, thresholds=th)
        torch.testing.assert_close(merged(x).logits, hooked, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_naming_them():
    model = tiny_llama()
    th = calibrate_thresholds(model, calib(), 0.4, allocation="uniform", save=False)
    with pytest.raises(ValueError, match="gradient must be one of ste, masked"):
        InputSparsityHooks(model, th, gradient="sign")
    with pytest.raises(ValueError, match="p must be"):
        InputSparsityHooks(model, th, p=1.5)
    with pytest.raises(ValueError, match="mix_fraction must be a number in \\[0, 1\\)"):
        SparseRecoverySchedule(th, mix_fraction=1.0)
    with pytest.raises(ValueError, match="gradient must be one of"):
        SparseRecoverySchedule(th, gradient="x")
    with pytest.raises(ValueError, match="'model.nope', which is not a module"):
        InputSparsityHooks(model, {"values": {"model.nope": 0.1}})


def _tiny_folder(tmp_path):
    from hf_stochact import data

    tokenizer = data.train_tokenizer(data.text_of(data.load_corpus().train, "text", 100_000), vocab_size=300)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            hidden_act="silu")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_recover_command_end_to_end(tmp_path, capsys):
    """The command on a tiny Llama: rotated thresholds, LoRA, the mix; the saved folder loads with stock
    transformers (dense) and sparsify applies the saved thresholds and rotations."""
    from hf_stochact.cli import main

    folder = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["recover", "--model", str(folder), "--output-dir", str(out), "--steps", "4", "--batch-size", "2",
                 "--grad-accum", "1", "--block-size", "32", "--warmup-steps", "0", "--lr", "1e-3",
                 "--train-chars", "30000", "--eval-chars", "6000", "--eval-window", "64", "--sparsity", "0.4",
                 "--allocation", "uniform", "--rotate", "pca", "--lora-rank", "4", "--mix-fraction", "0.5",
                 "--distill", "0.5", "--calibration-rows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[6/6] saving float32 weights" in printed and "model-wide input sparsity" in printed
    report = json.loads((out / "recover_report.json").read_text())
    assert report["tokens"] == 4 * 2 * 32 and report["model_sparsity"] == pytest.approx(0.4, abs=0.05)
    assert all(math.isfinite(report[k]) for k in ("ppl_dense", "ppl_sparse_before", "ppl_sparse_after"))
    ps = [h["sparse/p"] for h in report["log_history"] if "sparse/p" in h]
    assert ps[0] > 0 and ps[-1] == 0
    assert "hf-stochact recover" in report["command"] and "--rotate pca" in report["command"]
    assert "recovery-trained" in (out / "README.md").read_text()
    loaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in loaded.state_dict())  # merged
    sparsify(loaded)
    from hf_stochact import ThresholdedLinear

    wrapped = [m for m in loaded.modules() if isinstance(m, ThresholdedLinear)]
    assert len(wrapped) == 14 and sum(m.rotation is not None for m in wrapped) == 10


@pytest.mark.parametrize("argv, flag", [
    (["--sparsity", "0"], "--sparsity: must be in (0, 1)"),
    (["--sparsity", "1"], "--sparsity: must be in (0, 1)"),
    (["--rotate", "svd"], "--rotate: must be one of none, pca, pca-all"),
    (["--gradient", "sign"], "--gradient: must be one of ste, masked"),
    (["--mix-fraction", "1"], "--mix-fraction: must be in [0, 1)"),
    (["--lora-alpha", "8"], "--lora-alpha: needs --lora-rank > 0"),
    (["--allocation", "x"], "--allocation: must be one of uniform, greedy, block"),
])
def test_recover_bad_flags_exit_2_with_one_line(tmp_path, capsys, argv, flag):
    from hf_stochact.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--model", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1], err
