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


def test_demo_rejects_a_prompt_longer_than_the_context(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--block-size", "32", "--prompt-tokens", "24", "--new-tokens", "24"])
    assert exit_.value.code == 2
    assert "hf-stochact demo: error: --prompt-tokens: " in capsys.readouterr().err


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
    assert all(float(r[10]) < (1e-5 if r[2].strip() == "float32" else 2e-2) for r in rows)
    assert all(float(r[5]) > 0 and float(r[7]) > 0 for r in rows), "achieved bandwidth of both sides"
    for r in rows:  # ideal = the ratio of weight bytes read at the measured sparsity (shown to 2 decimals)
        s_ = float(r[3])
        assert float(r[9].strip().rstrip("x")) == pytest.approx(1 / (1 / 3 + 2 / 3 * (1 - s_)), abs=0.03)
    assert "a speedup above it means the dense baseline streams slower" in text, "ratios above the ideal explained"


def test_relufy_requires_a_model(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["relufy"])
    assert exit_.value.code == 2 and "error: --model: required" in capsys.readouterr().err


def save_tiny(path, act="relu"):
    from helpers import tiny_llama

    from hf_stochact.data import train_tokenizer

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


def test_sparsity_command_on_a_saved_model(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    assert main(["sparsity", "--model", str(tmp_path / "m"), "--eval-chars", "4000", "--window", "32",
                 "--max-windows", "2", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "exact_zero" in out and "cett_sparsity" in out and "union_nonzero@16" in out
    assert (tmp_path / "report.png").exists() and (tmp_path / "report.json").exists()


def cli(*args, timeout=120):
    """Run hf-stochact in a subprocess, as a user would."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "hf_stochact.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["generate", "--model", "MISSING", "--p", "1.5"], "--p"),
        (["generate", "--model", "MISSING", "--k", "0"], "--k"),
        (["generate", "--temperature", "-1"], "--temperature"),
        (["generate"], "--model"),
        (["generate", "--model", "MISSING"], "--model"),
        (["generate", "--gguf", "nothing.gguf"], "--gguf"),
        (["relufy", "--model", "MISSING", "--stocha-fraction", "1.0"], "--stocha-fraction"),
        (["relufy", "--model", "MISSING", "--distill", "2"], "--distill"),
        (["bench", "--sparsities", "0.5,1.5"], "--sparsities"),
        (["bench", "--shapes", "576by1536"], "--shapes"),
        (["sparsity", "--model", "MISSING", "--target-cett", "-0.1"], "--target-cett"),
        (["relufy", "--model", "MISSING", "--lr", "inf"], "--lr"),
        (["relufy", "--model", "MISSING", "--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag_before_any_model_loads(args, flag):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert f"hf-stochact {args[0]}: error: {flag}: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_model_paths_are_checked_with_clear_messages(tmp_path, capsys):
    from hf_stochact.cli.args import UsageError
    from hf_stochact.cli.loading import resolve_model

    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"<html>not found</html>")
    with pytest.raises(UsageError, match="not a GGUF file"):
        resolve_model("", str(corrupt))
    good = tmp_path / "models" / "small.gguf"
    good.parent.mkdir()
    good.write_bytes(b"GGUF" + b"\0" * 16)
    assert resolve_model("", str(good)) == (str(good.parent), "small.gguf"), "--gguf FILE alone: its folder"
    assert resolve_model(str(good.parent), "small.gguf") == (str(good.parent), "small.gguf")
    with pytest.raises(UsageError, match=r"no config.json\); it holds small.gguf: add --gguf small.gguf"):
        resolve_model(str(good.parent))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="no tokenizer files"):
        resolve_model(str(tmp_path / "cfg_only"))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--gguf", str(corrupt)])
    assert exit_.value.code == 2 and "--gguf: " in capsys.readouterr().err


def test_gguf_file_alone_loads_a_float32_model_and_generates(tmp_path, capsys):
    import torch
    from helpers import write_tiny_llama_gguf

    from hf_stochact.cli.loading import load_causal_lm

    path = tmp_path / "weights" / "tiny.gguf"
    path.parent.mkdir()
    embedding = write_tiny_llama_gguf(path)
    tok, lm = load_causal_lm("", str(path))  # no --model: the file's folder
    assert torch.equal(lm.get_input_embeddings().weight, embedding), "the file's weights, as written"
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    assert not lm.is_quantized and lm.hf_quantizer is None, "quantizer marker cleared (Trainer would refuse it)"
    assert tok("ab").input_ids
    assert main(["generate", "--gguf", str(path), "--prompt", "abc", "--k", "2", "--max-new-tokens", "3",
                 "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 completions") and "--- [1] ---" in out and out.count("abc") == 2


def test_generate_uses_the_chat_template_when_the_tokenizer_has_one(tmp_path, capsys):
    from transformers import AutoTokenizer

    save_tiny(tmp_path / "m", act="silu")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    tok.save_pretrained(tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--k", "2", "--max-new-tokens", "3"]
    assert main(base) == 0
    assert "chat template" in capsys.readouterr().out
    assert main(base + ["--no-chat"]) == 0
    assert "chat template" not in capsys.readouterr().out


def test_every_flag_has_help():
    import dataclasses
    import importlib

    from hf_stochact.cli import COMMANDS

    for module, cls_name, _ in COMMANDS.values():
        for f in dataclasses.fields(getattr(importlib.import_module(module), cls_name)):
            assert len(f.metadata.get("help", "")) > 10, f"{cls_name}.{f.name} has no help text"


def test_frontier_runs_on_a_tiny_model_and_writes_its_table(tmp_path, capsys):
    save_tiny(tmp_path / "m", act="silu")
    out = tmp_path / "frontier"
    assert main(["frontier", "--model", str(tmp_path / "m"), "--sparsity", "0.4", "--allocation", "uniform,block",
                 "--rounds", "1", "--new-tokens", "2", "--eval-chars", "2000", "--eval-window", "32",
                 "--out", str(out)]) == 0
    rows = __import__("json").loads(out.with_suffix(".json").read_text())["rows"]
    labels = [r["label"] for r in rows]
    assert labels[:4] == ["dense", "every linear on the rows loop (threshold 0: exact)",
                          "thresholds 40% (uniform)", "thresholds 40% (block)"]
    assert "ReLU swap (no training), exact" in labels
    assert rows[1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-4)  # threshold 0 changes nothing
    assert all(r["rss_sparse_mib"] > 0 and r["sparse_calls"] > 0 for r in rows[1:])
    assert rows[2]["input_sparsity"] == pytest.approx(0.4, abs=0.03)
    assert "| thresholds 40% (block) |" in capsys.readouterr().out and out.with_suffix(".png").exists()


def test_frontier_with_relu_models_only(tmp_path):
    save_tiny(tmp_path / "m", act="silu")
    save_tiny(tmp_path / "relufied", act="relu")
    out = tmp_path / "frontier"
    assert main(["frontier", "--model", str(tmp_path / "m"), "--sparsity", "", "--no-relu-swap", "--relu-model",
                 str(tmp_path / "relufied"), "--rounds", "1", "--new-tokens", "2", "--eval-chars", "2000",
                 "--eval-window", "32", "--out", str(out)]) == 0
    rows = __import__("json").loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "every linear on the rows loop (threshold 0: exact)",
                                          "relufied, exact", "relufied + attention thresholds 40%"]
    assert rows[2]["sparse_calls"] > 0 and rows[2]["input_sparsity"] is None
    assert rows[3]["input_sparsity"] == pytest.approx(0.4, abs=0.05)


def test_frontier_rejects_a_bad_allocation(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frontier", "--model", "x", "--allocation", "teal"])
    assert exit_.value.code == 2
    assert "--allocation: item teal: must be one of uniform, greedy, block" in capsys.readouterr().err
