"""Every CLI error is one line naming the flag with exit status 2 (argparse's format), never a traceback; Ctrl-C is
one line and exit status 130; a model whose held-out loss is not finite never replaces a saved one.

Most cases call ``main`` in this process (an exception other than ``SystemExit`` fails the test, as a traceback
would); the Ctrl-C, non-UTF-8 argv and missing-matplotlib cases run ``hf-stochact`` as a real subprocess.
"""

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hf_stochact.cli import COMMANDS, main
from hf_stochact.cli.args import flag_name

TEXT = "def f(x):\n    return x + 1\n\n" * 40
HERE = os.path.dirname(__file__)


def save_tiny(path, act):
    from helpers import tiny_llama

    from hf_stochact.data import train_tokenizer

    tok = train_tokenizer("def f(x):\n    return x + 1\n" * 300, vocab_size=97)
    model = tiny_llama(act)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"silu": save_tiny(root / "silu", "silu"), "relu": save_tiny(root / "relu", "relu")}


def fails(argv, capsys, flag, message=""):
    """``main(argv)`` ends with exit status 2 and, as its last line, ``hf-stochact <cmd>: error: <flag>: <message>``."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hf-stochact {argv[0]}: error: {flag}: {message}"), err[-3000:]
    assert "Traceback" not in err
    return last


def config_fields(kind):
    for command, (module, cls_name, _) in COMMANDS.items():
        for f in dataclasses.fields(getattr(importlib.import_module(module), cls_name)):
            if type(f.default) is kind:
                yield command, flag_name(f.name)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_every_float_flag_of_every_command_rejects_non_finite_values(value, capsys):
    cases = list(config_fields(float))
    assert ("relufy", "--lr") in cases and ("relufy", "--l1") in cases and ("demo", "--lr") in cases
    for command, flag in cases:
        fails([command, f"{flag}={value}"], capsys, flag, "must be a finite number")


def test_float_lists_reject_non_finite_items(capsys):
    fails(["bench", "--sparsities", "0.5,inf"], capsys, "--sparsities", "item inf: must be a finite number")
    fails(["frontier", "--model", "x", "--sparsity", "0.4,nan"], capsys, "--sparsity", "item nan: must be a finite")


@pytest.mark.parametrize("command", ["demo", "relufy", "generate"])
def test_seeds_outside_what_numpy_accepts_are_rejected(command, capsys):
    fails([command, "--seed=-1"], capsys, "--seed", "must be in [0, 4294967295], got -1")
    fails([command, f"--seed={2**32}"], capsys, "--seed")


def test_outputs_are_checked_before_any_work(tmp_path, models, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    fails(["relufy", "--model", models["silu"], "--output-dir", str(a_file)], capsys, "--output-dir", "'")
    fails(["demo", "--output-dir", str(a_file)], capsys, "--output-dir", "'")
    fails(["relufy", "--model", models["silu"], "--output-dir", str(a_file / "sub")], capsys, "--output-dir")
    fails(["bench", "--shapes", "64x256", "--out", str(tmp_path / "missing" / "bench.md")], capsys, "--out",
          "no folder")
    fails(["bench", "--shapes", "64x256", "--out", str(tmp_path)], capsys, "--out", f"{str(tmp_path)!r} is a folder")
    fails(["sparsity", "--model", models["relu"], "--out", str(a_file / "report")], capsys, "--out")
    fails(["relufy", "--model", models["silu"], "--push-to-hub", "not a/repo/id"], capsys, "--push-to-hub",
          "not a hub repo id")
    assert a_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU may run bf16")
def test_settings_this_machine_cannot_run_name_the_flag_before_loading(models, capsys):
    fails(["relufy", "--model", models["silu"], "--bf16", "--no-cpu"], capsys, "--bf16", "Your setup doesn't support")


# ---- bad data: one line naming the flag (and the file), for every command that reads text -------------------------

def bad_jsonl(folder):
    (folder / "bad.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": TEXT}) + "\n{oops\n")
    return folder / "bad.jsonl", "bad.jsonl: line 3: not valid JSON"


def latin1_text(folder):
    (folder / "latin.txt").write_bytes(TEXT.encode() + "# café\n".encode("latin-1"))
    return folder / "latin.txt", "latin.txt: line 121: not UTF-8 text (byte 0xe9 at byte 1125)"


def binary_among_text(folder):
    (folder / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / "docs" / name).write_text(TEXT)
    (folder / "docs" / "c.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4)
    return folder / "docs", "c.txt: a binary file, not text"


def empty_jsonl(folder):
    (folder / "empty.jsonl").write_text("")
    return folder / "empty.jsonl", "empty.jsonl: the file is empty"


def numbers_as_text(folder):
    (folder / "numbers.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (TEXT, TEXT, 42)))
    return folder / "numbers.jsonl", "the 'text' column holds mixed-kind values, not text; first at "


BAD_DATA = [bad_jsonl, latin1_text, binary_among_text, empty_jsonl, numbers_as_text]


@pytest.mark.parametrize("make", BAD_DATA, ids=lambda f: f.__name__)
def test_bad_data_is_one_line_naming_the_flag_and_file(make, tmp_path, models, capsys):
    bad, message = make(tmp_path)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        (good / f"{i}.txt").write_text(TEXT)
    relufy = ["relufy", "--model", models["silu"], "--output-dir", str(tmp_path / "out"), "--steps", "1",
              "--block-size", "16", "--eval-chars", "500", "--eval-window", "16"]
    for argv, flag in [(relufy + ["--data", str(bad)], "--data"),
                       (relufy + ["--data", str(good), "--eval-data", str(bad)], "--eval-data"),
                       (["demo", "--data", str(bad), "--output-dir", str(tmp_path / "out")], "--data"),
                       (["sparsity", "--model", models["relu"], "--data", str(bad)], "--data")]:
        last = fails(argv, capsys, flag)
        assert message in last and str(tmp_path) in last, last
    assert not (tmp_path / "out").exists()


# ---- errors found once the model is there ---------------------------------------------------------------------------

def test_prompts_without_tokens_or_not_utf8_name_the_flag(models, capsys):
    fails(["generate", "--model", models["silu"], "--prompt", "", "--no-chat"], capsys, "--prompt", "'' has no tokens")
    fails(["generate", "--model", models["silu"], "--prompt", "caf\udce9", "--no-chat"], capsys, "--prompt",
          "is not valid UTF-8 text (byte 0xe9 at position 3)")


def test_bench_model_with_nothing_to_sparsify_names_the_model(models, capsys):
    fails(["bench", "--model", models["silu"], "--rounds", "1", "--new-tokens", "2"], capsys, "--model",
          "sparsify: no FFN with a ReLU")


def relufy_argv(models, out, *extra):
    return ["relufy", "--model", models["silu"], "--output-dir", str(out), "--steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--block-size", "16", "--warmup-steps", "0", "--eval-chars", "800",
            "--eval-window", "16", "--data", str(out.parent / "docs"), "--held-out-fraction", "0.25", *extra]


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(TEXT)
    return tmp_path / "docs"


def test_a_diverged_model_never_replaces_the_saved_one(tmp_path, docs, models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the good model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    last = fails(relufy_argv(models, out, "--lr", "1e6"), capsys, "--lr", "training diverged: held-out perplexity")
    assert "nothing was saved" in last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failed_push_says_the_model_was_saved(tmp_path, docs, models, capsys, monkeypatch):
    import transformers as tf
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")

    monkeypatch.setattr(tf.Trainer, "push_to_hub", offline)
    out = tmp_path / "out"
    last = fails(relufy_argv(models, out, "--lr", "1e-3", "--push-to-hub", "me/relufied"), capsys, "--push-to-hub",
                 f"the model was saved to {str(out)!r}, but uploading it to 'me/relufied' failed: OfflineModeIsEnabled")
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert "offline mode" in last


# ---- real subprocesses ----------------------------------------------------------------------------------------------

def cli(*args, code=None, timeout=120):
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "hf_stochact.cli", *args]
    return subprocess.run(command, capture_output=True, timeout=timeout, cwd=HERE)


def test_non_utf8_argv_is_an_error_naming_the_flag(models):
    result = cli("generate", "--model", models["silu"], "--prompt", b"caf\xe9 au lait", "--no-chat")
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert "hf-stochact generate: error: --prompt: is not valid UTF-8 text (byte 0xe9" in err


def test_sparsity_out_without_matplotlib_fails_before_measuring(tmp_path, models):
    without = "import sys; sys.modules['matplotlib'] = None; from hf_stochact.cli import main; sys.exit(main())"
    result = cli("sparsity", "--model", models["relu"], "--out", str(tmp_path / "report"), code=without)
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err
    assert "hf-stochact sparsity: error: --out: the plot needs matplotlib" in err
    assert not list(tmp_path.iterdir()), "nothing measured, nothing written"


@pytest.mark.parametrize(("marker", "argv"), [
    ("[1/5]", ["demo", "--output-dir", "{tmp}/demo"]),
    ("[3/5]", ["relufy", "--model", "{silu}", "--output-dir", "{tmp}/out", "--steps", "100000", "--batch-size",
               "2", "--grad-accum", "1", "--block-size", "16", "--warmup-steps", "0", "--eval-chars", "800",
               "--eval-window", "16", "--data", "{tmp}/docs", "--held-out-fraction", "0.25"]),
], ids=["demo", "relufy"])
def test_ctrl_c_is_one_line_and_exit_130(marker, argv, tmp_path, docs, models):
    argv = [a.format(tmp=tmp_path, silu=models["silu"]) for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "hf_stochact.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        seen = ""
        while marker not in seen:
            line = proc.stdout.readline()
            assert line, f"ended before {marker!r}: {proc.stderr.read()[-3000:]}"
            seen += line
        time.sleep(1.0)  # at work: loading the corpus (demo), training (relufy)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"hf-stochact {argv[0]}: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "demo" / "final").exists()
