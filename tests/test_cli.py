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


def test_frontier_with_rotations_and_a_saved_sparse_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_stochact import calibrate_thresholds

    save_tiny(tmp_path / "m", act="silu")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    calibrate_thresholds(saved, torch.randint(3, 90, (2, 32)), 0.3, allocation="uniform", rotate="pca")
    saved.save_pretrained(tmp_path / "sparse")
    (tmp_path / "sparse" / "tokenizer.json").write_bytes((tmp_path / "m" / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "m" / name).exists():
            (tmp_path / "sparse" / name).write_bytes((tmp_path / "m" / name).read_bytes())
    out = tmp_path / "frontier"
    assert main(["frontier", "--model", str(tmp_path / "m"), "--sparsity", "0.4", "--allocation", "uniform",
                 "--rotate", "none,pca-all", "--no-relu-swap", "--sparse-model", str(tmp_path / "sparse"),
                 "--rounds", "1", "--new-tokens", "2", "--eval-chars", "2000", "--eval-window", "32",
                 "--out", str(out)]) == 0
    result = __import__("json").loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [r["label"] for r in rows][2:] == ["thresholds 40% (uniform)", "thresholds 40% (uniform, rotated pca-all)",
                                              "sparse (its saved thresholds)"]
    assert rows[3]["input_sparsity"] == pytest.approx(0.4, abs=0.03) and rows[3]["sparse_calls"] > 0
    assert rows[4]["input_sparsity"] == pytest.approx(0.3, abs=0.05)
    assert result["machine"]["flags"] and result["machine"]["read_gbps"] > 0


def test_frontier_rejects_a_bad_rotation_and_a_folder_without_thresholds(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frontier", "--model", "x", "--rotate", "none,svd", "--out", str(tmp_path / "f")])
    assert exit_.value.code == 2
    assert "--rotate: item svd: must be one of none, pca, pca-all" in capsys.readouterr().err
    save_tiny(tmp_path / "m", act="silu")
    with pytest.raises(SystemExit) as exit_:
        main(["frontier", "--model", str(tmp_path / "m"), "--sparsity", "", "--no-relu-swap", "--sparse-model",
              str(tmp_path / "m"), "--rounds", "1", "--new-tokens", "2", "--eval-chars", "2000", "--eval-window",
              "32", "--out", str(tmp_path / "f")])
    assert exit_.value.code == 2
    assert "--sparse-model: " in capsys.readouterr().err.strip().splitlines()[-1]


def test_frontier_rejects_a_bad_allocation(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frontier", "--model", "x", "--allocation", "teal"])
    assert exit_.value.code == 2
    assert "--allocation: item teal: must be one of uniform, greedy, block" in capsys.readouterr().err


def test_a_hub_id_loads_from_the_cache_offline(tmp_path):
    """A hub id is what from_pretrained accepts: here from a Hugging Face cache (the hub's own layout), offline."""
    import os
    import subprocess
    import sys

    commit = "0" * 40
    repo = tmp_path / "hub-cache" / "models--me--tiny"
    save_tiny(repo / "snapshots" / commit, act="silu")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "hf_stochact.cli", "generate", "--model", "me/tiny", "--prompt",
                             "def f(x):", "--k", "2", "--max-new-tokens", "3", "--no-chat"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("2 completions") and "distinct of 2" in result.stdout


def test_config_file_sets_options_and_flags_override_it(tmp_path, capsys):
    import json

    save_tiny(tmp_path / "m", act="silu")
    yaml_file = tmp_path / "generate.yaml"
    yaml_file.write_text(f"model: {tmp_path / 'm'}\nprompt: 'def f(x):'\nk: 3\nmax-new-tokens: 4\nchat: false\n"
                         "p: 0.5\n")
    assert main(["generate", "--config", str(yaml_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 completions, stochastic activations p=0.5") and "chat template" not in out
    assert main(["generate", "--config", str(yaml_file), "--k", "2", "--p", "0.7"]) == 0  # the command line wins
    assert capsys.readouterr().out.startswith("2 completions, stochastic activations p=0.7")
    json_file = tmp_path / "sparsity.json"
    json_file.write_text(json.dumps({"model": str(tmp_path / "m"), "eval_chars": 2000, "window": 32,
                                     "max_windows": 1, "target_cett": 0.3}))
    assert main(["sparsity", "--config", str(json_file)]) == 0
    assert "target CETT 0.3" in capsys.readouterr().out


def test_config_file_text_options_take_lists_and_numbers(tmp_path):
    import dataclasses

    from hf_stochact.cli.args import read_config_file
    from hf_stochact.cli.frontier import FrontierConfig

    def read(text):
        path = tmp_path / "f.yaml"
        path.write_text(text)
        return read_config_file(str(path), FrontierConfig)

    assert read("sparsity: [0.25, 0.4]\nrelu-swap: false\n--rounds: 2\n") == {
        "sparsity": "0.25,0.4", "relu_swap": False, "rounds": 2}
    assert read("sparsity: 0.4\n") == {"sparsity": "0.4"} and read("") == {}
    assert {f.name for f in dataclasses.fields(FrontierConfig)} >= {"sparsity", "relu_swap", "rounds"}


def test_help_states_each_default_once():
    import argparse
    import importlib

    from hf_stochact.cli import COMMANDS
    from hf_stochact.cli.args import add_arguments

    for module, cls_name, _ in COMMANDS.values():
        parser = argparse.ArgumentParser()
        add_arguments(parser, getattr(importlib.import_module(module), cls_name))
        for action in parser._actions:
            assert (action.help or "").lower().count("default") <= 1, f"{cls_name} {action.option_strings}"
    parser = argparse.ArgumentParser()
    add_arguments(parser, importlib.import_module("hf_stochact.cli.relufy").RelufyConfig)
    help_text = " ".join(parser.format_help().split())
    assert "--text-column TEXT column holding the text (default: 'text', or the only string column) --eval-data" \
        in help_text
    assert "--steps N optimizer steps to fine-tune (default: 150)" in help_text


def test_bench_warns_when_the_machine_is_busy(monkeypatch, capsys):
    from hf_stochact.analysis import machine

    monkeypatch.setattr(machine, "load", lambda: 99.0)
    monkeypatch.setattr(machine, "_WARNED", [], raising=False)  # it warns once per process
    assert main(["bench", "--shapes", "64x256", "--sparsities", "0.5", "--dtypes", "float32", "--rounds", "1",
                 "--min-bytes", "0"]) == 0
    err = capsys.readouterr().err
    assert "hf-stochact bench: warning: the machine is busy (1-minute load 99.00" in err, err


def test_relufy_saves_in_the_sources_dtype_and_says_so(tmp_path, capsys, monkeypatch):
    import json

    import torch
    from huggingface_hub import ModelCard
    from safetensors import safe_open

    from hf_stochact.cli.relufy import RelufyConfig, model_card, save_dtype

    save_tiny(tmp_path / "m", act="silu")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text("def f(x):\n    return x + 1\n\n" * 40)
    hf_home = tmp_path / "hf"  # accelerate's default config asks for 2 CPU processes: a warning, the run goes on
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text("distributed_type: MULTI_CPU\nnum_processes: 2\n")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    out = tmp_path / "out"
    assert main(["relufy", "--model", str(tmp_path / "m"), "--output-dir", str(out), "--steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--block-size", "16", "--warmup-steps", "3",
                 "--eval-chars", "800", "--eval-window", "16", "--data", str(tmp_path / "docs"),
                 "--held-out-fraction", "0.25", "--lr", "1e-3"]) == 0
    captured = capsys.readouterr()
    assert "[5/5] saving bfloat16 weights to" in captured.out and "auto: the source's dtype" in captured.out
    assert captured.err.count("hf-stochact relufy: warning: --warmup-steps: 3 warm-up steps is more than") == 1
    assert captured.err.count("hf-stochact relufy: warning: accelerate config: accelerate's config") == 1
    assert "--num_processes 2 -m hf_stochact.cli relufy" in captured.err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    report = json.loads((out / "relufy_report.json").read_text())
    assert report["save_dtype"] == "bfloat16" and report["base_model"] is None
    card = ModelCard((out / "README.md").read_text())
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert "| saved weights | bfloat16 (perplexity measured in float32, before the cast) |" in card.text
    hub_card = ModelCard(model_card({**report, "base_model": "HuggingFaceTB/SmolLM2-135M"}))
    assert hub_card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and hub_card.data.base_model_relation == "finetune"
    assert save_dtype(RelufyConfig(model=str(tmp_path / "m"), save_dtype="float32"))[0] == torch.float32
    assert save_dtype(RelufyConfig(model=str(out)))[0] == torch.bfloat16
    gguf_dtype, why = save_dtype(RelufyConfig(gguf="x.gguf"))
    assert gguf_dtype == torch.float32 and "dequantized from GGUF" in why
