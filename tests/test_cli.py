"""The command line: the demo runs end to end (tiny settings) and reports sparsity."""

import pytest

from hf_stochact.cli import main


def test_demo_runs_and_reports_sparsity(capsys, tmp_path):
    assert main(["demo", "--steps", "6", "--batch-size", "4", "--block-size", "32", "--hidden-size", "32",
                 "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--vocab-size", "300",
                 "--train-chars", "60000", "--relu-fraction", "0.5", "--eval-blocks", "4",
                 "--prompt-tokens", "12", "--new-tokens", "12", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "StochA, sampling (train mode)" in out and "after ReLU fine-tune (final)" in out
    assert "FFN zeros" in out and "config.hidden_act = 'relu'" in out
    assert (tmp_path / "final" / "config.json").exists()
    assert "tokens identical: True" in out and "distinct continuations out of 3" in out


def test_demo_rejects_a_prompt_longer_than_the_context():
    with pytest.raises(ValueError, match="must be positive and fit in block_size"):
        main(["demo", "--block-size", "32", "--prompt-tokens", "24", "--new-tokens", "24"])


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])


def test_bench_microbenchmark_runs_and_checks_exactness(capsys, tmp_path):
    out = tmp_path / "bench.md"
    assert main(["bench", "--shapes", "64x256", "--sparsities", "0.5,0.9", "--dtypes", "float32,bfloat16",
                 "--rounds", "1", "--min-bytes", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("| 64x256 |") == 4 and "ideal" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 64x256")]
    assert {r[3].strip() for r in rows} == {"0.50", "0.90"}  # the requested sparsity is the one measured
    assert all(float(r[8]) < (1e-5 if r[2].strip() == "float32" else 2e-2) for r in rows)


def test_relufy_requires_a_model():
    with pytest.raises(ValueError, match="--model"):
        main(["relufy"])


def save_tiny(path, act="relu"):
    from helpers import tiny_llama

    from hf_stochact.cli.data import train_tokenizer

    tok = train_tokenizer("def f(x):\n    return x + 1\n" * 300, vocab_size=97)
    model = tiny_llama(act)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_generate_command_prints_k_completions(tmp_path, capsys):
    save_tiny(tmp_path / "m", act="silu")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "def f(x):", "--k", "3", "--p", "0.5",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 3 and "distinct of 3" in out
    with pytest.raises(ValueError, match="k must be"):
        main(["generate", "--model", str(tmp_path / "m"), "--k", "0"])


def test_sparsity_command_on_a_saved_model(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    assert main(["sparsity", "--model", str(tmp_path / "m"), "--eval-chars", "4000", "--window", "32",
                 "--max-windows", "2", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "exact_zero" in out and "cett_sparsity" in out and "union_nonzero@16" in out
    assert (tmp_path / "report.png").exists() and (tmp_path / "report.json").exists()
