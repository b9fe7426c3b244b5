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


@pytest.mark.parametrize("command", ["demo", "relufy", "generate", "uncertainty"])
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


def poison_after_training(monkeypatch):
    """Make the fine-tune end with non-finite weights, whatever the CPU's arithmetic: a callback sets one weight to
    NaN when training ends (a huge --lr gives NaN on some CPUs and a dead but finite model on others, e.g. AMX)."""
    import math

    import torch
    import transformers as tf

    class Poison(tf.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.get_output_embeddings().weight[0, 0] = math.nan

    original_init = tf.Trainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        original_init(self, *args, callbacks=[*(callbacks or []), Poison()], **kwargs)

    monkeypatch.setattr(tf.Trainer, "__init__", init)


def test_a_diverged_model_never_replaces_the_saved_one(tmp_path, docs, models, capsys, monkeypatch):
    poison_after_training(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the good model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    last = fails(relufy_argv(models, out, "--lr", "1e-3"), capsys, "--lr", "training diverged: held-out perplexity nan")
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
    # the child gets Ctrl-C's default disposition, as in a terminal: a runner started in the background (`cmd &`
    # in a script) ignores SIGINT, and an ignored SIGINT is inherited (Python then installs no handler)
    proc = subprocess.Popen([sys.executable, "-m", "hf_stochact.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
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


# ---- hub ids: accepted like from_pretrained, one line when they cannot be resolved ---------------------------------

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_env(tmp_path, **extra):
    """An empty Hugging Face cache, a hub endpoint where nothing listens (unreachable on every machine), short
    timeouts."""
    return dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_ENDPOINT="http://127.0.0.1:9",
                HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3", HF_HUB_DISABLE_TELEMETRY="1", **extra)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_id_that_cannot_be_resolved_is_one_line_and_fast(offline, tmp_path):
    env = hub_env(tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hf_stochact.cli", "generate", "--model", HUB_ID],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    seconds = time.perf_counter() - t0
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hf-stochact generate: error: --model: could not load {HUB_ID!r}: not a folder, and ")
    if offline:
        assert "not in the Hugging Face cache while offline (HF_HUB_OFFLINE is set)" in last
    else:
        assert "the Hugging Face Hub is unreachable (offline?)" in last and "HF_HUB_OFFLINE=1" in last
    assert seconds < 60, f"one request, no retries: {seconds:.0f} s"  # imports included; retries would take 23 s+


def test_a_mistyped_local_path_fails_without_asking_the_hub(tmp_path, monkeypatch, models, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("asked the hub about a local path")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    fails(["generate", "--model", "./models/smol"], capsys, "--model", "no such model folder: ./models/smol (and "
          "not a Hugging Face Hub id: USER/NAME")
    fails(["generate", "--model", "models/smol"], capsys, "--model", "no such model folder: models/smol (and not a "
          "Hugging Face Hub id: 'models' is a local folder, so this is a path)")
    fails(["generate", "--model", str(tmp_path / "missing")], capsys, "--model", "no such model folder")
    (tmp_path / "models" / "small.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    fails(["generate", "--model", "models/small.gguf"], capsys, "--model", "models/small.gguf is a file, not a "
          "model folder or hub id: pass it as --gguf models/small.gguf")


def test_hub_answers_become_one_line_naming_the_flag(monkeypatch, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    answer = {}

    def metadata(url, *args, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("HEAD", url))
        raise answer["error"](f"404 for {url}", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    answer["error"] = RepositoryNotFoundError
    fails(["generate", "--model", "me/nothing-here"], capsys, "--model", "could not load 'me/nothing-here': not a "
          "folder, and the Hugging Face Hub has no model 'me/nothing-here'")
    answer["error"] = RemoteEntryNotFoundError
    fails(["generate", "--model", "me/gguf-only"], capsys, "--model", "could not load 'me/gguf-only': not a folder, "
          "and the hub repo 'me/gguf-only' has no file 'config.json' (not a transformers model; for a GGUF repo add "
          "--gguf FILE)")
    fails(["generate", "--model", "me/repo", "--gguf", "x.gguf"], capsys, "--gguf", "could not load 'me/repo': not a "
          "folder, and the hub repo 'me/repo' has no file 'x.gguf'")


# ---- rough edges -----------------------------------------------------------------------------------------------------

def test_frontier_requires_out_and_never_writes_into_docs(capsys):
    fails(["frontier", "--model", "x"], capsys, "--out", "required: where to write <out>.json and <out>.png")


def test_save_dtype_is_checked(models, capsys):
    fails(["relufy", "--model", models["silu"], "--save-dtype", "fp16"], capsys, "--save-dtype",
          "must be one of auto, float32, bfloat16, float16, got 'fp16'")


def test_more_warmup_steps_than_steps_is_a_warning(models, tmp_path, capsys):
    fails(["relufy", "--model", models["silu"], "--steps", "2", "--warmup-steps", "5", "--data",
           str(tmp_path / "missing")], capsys, "--data")  # the warning, then the run goes on to the next check
    with pytest.raises(SystemExit):
        main(["relufy", "--model", models["silu"], "--steps", "2", "--warmup-steps", "5", "--data",
              str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert err.count("hf-stochact relufy: warning: --warmup-steps: 5 warm-up steps is more than --steps (2): the "
                     "learning rate never reaches --lr (5e-05); lower --warmup-steps\n") == 1, err


def test_launched_as_one_process_by_an_accelerate_config_for_several_fails_before_loading(models, capsys,
                                                                                         monkeypatch):
    from hf_stochact.cli import relufy

    monkeypatch.setattr(relufy, "load_model", lambda cfg: pytest.fail("loaded the model"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch`'s simple launcher sets
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # ... when the config asked for more than one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fails(["relufy", "--model", models["silu"]], capsys, "accelerate launch", "`accelerate launch` started this as 1 "
          "process although its config asks for more (a MULTI_CPU config runs one process unless given "
          "--mpirun_hostfile): for N processes on this machine's CPUs run `CUDA_VISIBLE_DEVICES= accelerate launch "
          "--multi_gpu --num_processes N -m hf_stochact.cli relufy ...`")


def test_accelerate_config_mismatch_is_detected(tmp_path):
    from hf_stochact.cli.relufy import launch_mismatch

    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert launch_mismatch(env) is None, "no accelerate config"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    message, launched = launch_mismatch(env)
    assert not launched and message == (
        f"accelerate's config {config} asks for 2 processes (MULTI_CPU), but this runs as 1 process, started "
        "directly: to use 2, run `CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m "
        "hf_stochact.cli relufy ...`")
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    assert f"run `accelerate launch --config_file {config} -m hf_stochact.cli relufy ...`" in launch_mismatch(env)[0]
    assert launch_mismatch({**env, "WORLD_SIZE": "8", "RANK": "0"}) is None, "one of 8 processes: fine"
    assert launch_mismatch({**env, "PMI_SIZE": "2"}) is None, "mpirun"
    config.write_text("distributed_type: NO\nnum_processes: 1\n")
    assert launch_mismatch(env) is None
    launched_env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}
    assert launch_mismatch(launched_env) is None, "accelerate launch of a 1-process config"
    assert launch_mismatch({**launched_env, "MASTER_ADDR": "127.0.0.1"})[1] is True


def test_an_accelerate_config_passed_as_config_says_so(tmp_path, capsys):
    path = tmp_path / "accelerate.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    fails(["relufy", "--config", str(path)], capsys, "--config", f"{path} is an accelerate config (key "
          f"'compute_environment'), not this command's options: run `accelerate launch --config_file {path} -m "
          "hf_stochact.cli ...`")


# ---- --config FILE: every value checked like its flag ---------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    ("stepz: 3\n", "{path}: unknown key 'stepz'; the options are: model, gguf, data, "),
    ("steps: three\n", "{path}: steps: must be a whole number, got 'three'"),
    ("steps: 2.5\n", "{path}: steps: must be a whole number, got 2.5"),
    ("lr: [1, 2]\n", "{path}: lr: must be a number, got [1, 2]"),
    ("bf16: 'yes'\n", "{path}: bf16: must be true or false, got 'yes'"),
    ("- steps\n", "{path}: must hold a mapping of option names to values, got a list"),
    ("steps: [\n", "{path}: not valid YAML: "),
])
def test_config_file_errors_name_the_file_and_key(content, message, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    fails(["relufy", "--config", str(path)], capsys, "--config", message.format(path=path))


def test_config_file_values_get_the_flags_checks(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "MISSING", "p": 1.5}))
    fails(["relufy", "--config", str(path)], capsys, "--p", f"must be in [0, 1], got 1.5 (set in {path})")
    fails(["relufy", "--config", str(path), "--p", "2"], capsys, "--p", "must be in [0, 1], got 2.0")  # not the file's
    fails(["relufy", "--config", str(tmp_path / "none.yaml")], capsys, "--config", "no such file")
    fails(["relufy", "--config", str(tmp_path / "run.txt")], capsys, "--config", "'")
    path.write_text("{oops")
    fails(["relufy", "--config", str(path)], capsys, "--config", f"{path}: not valid JSON: JSONDecodeError")
