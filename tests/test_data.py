"""The data path (hf_stochact.data, through `datasets`) and `relufy` on a user's own data: local text folders,
JSONL/Parquet/CSV files, column choice, packing as run_clm.py does, the datasets cache, the stdlib default, the
model card, push-to-hub pass-through, and the 2-process `accelerate launch` run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hf_stochact import data
from hf_stochact.cli import main

STDLIB = data.stdlib_root()
SOURCES = ["argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py",
           "keyword.py"]


def write_text_folder(folder: Path, n: int = 8, chars: int = 6000) -> list[str]:
    folder.mkdir(parents=True)
    texts = []
    for name in SOURCES[:n]:
        text = (STDLIB / name).read_text(encoding="utf-8")[:chars]
        (folder / (name + ".txt")).write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def write_jsonl(path: Path, column: str = "text", n: int = 8, extra: dict | None = None) -> list[str]:
    texts = [(STDLIB / name).read_text(encoding="utf-8")[:5000] for name in SOURCES[:n]]
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({column: t, "id": len(t), **(extra or {})}) + "\n")
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer((STDLIB / "argparse.py").read_text(encoding="utf-8")[:60_000], vocab_size=300)


def test_text_folder_is_one_row_per_file_with_a_held_out_fraction(tmp_path):
    texts = write_text_folder(tmp_path / "docs")
    corpus = data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0.25, seed=0)
    assert corpus.column == "text" and len(corpus.train) == 6 and len(corpus.held_out) == 2
    rows = sorted(list(corpus.train["text"]) + list(corpus.held_out["text"]))
    assert rows == sorted(texts)  # whole files, newlines kept, nothing lost or duplicated
    again = data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0.25, seed=0)
    assert list(again.held_out["text"]) == list(corpus.held_out["text"])  # deterministic for a seed


def test_jsonl_parquet_csv_and_the_text_column(tmp_path):
    from datasets import Dataset

    texts = write_jsonl(tmp_path / "a.jsonl", column="content")
    corpus = data.load_corpus(str(tmp_path / "a.jsonl"), eval_source=str(tmp_path / "a.jsonl"))
    assert corpus.column == "content" and list(corpus.train["content"]) == texts  # the only string column
    Dataset.from_dict({"body": texts, "title": ["t"] * len(texts)}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"text_column: .*several string columns \(body, title\)"):
        data.load_corpus(str(tmp_path / "b.parquet"))
    corpus = data.load_corpus(str(tmp_path / "b.parquet"), text_column_name="body", held_out_fraction=0.25)
    assert sorted(list(corpus.train["body"]) + list(corpus.held_out["body"])) == sorted(texts)
    with pytest.raises(ValueError, match=r"text_column: no column 'nope' in the dataset; its columns are body, title"):
        data.load_corpus(str(tmp_path / "b.parquet"), text_column_name="nope")
    Dataset.from_dict({"text": texts}).to_csv(tmp_path / "c.csv")
    assert sorted(list(data.load_corpus(str(tmp_path / "c.csv"), held_out_fraction=0).train["text"])) == sorted(texts)
    held = data.load_corpus(Dataset.from_dict({"text": texts}), held_out_fraction=0.5)  # a Dataset object
    assert len(held.train) == len(held.held_out) == 4


def test_bad_sources_raise_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="data: no such file or folder: './missing'"):
        data.load_corpus("./missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data: the folder .* has no files"):
        data.load_corpus(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("hello")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"data: .* mixes file kinds \(json, text\)"):
        data.load_corpus(str(tmp_path / "mixed"))
    (tmp_path / "one.txt").write_text("just one file")
    with pytest.raises(ValueError, match="data: .* has one row, nothing to hold out; pass eval_data"):
        data.load_corpus(str(tmp_path / "one.txt"))
    with pytest.raises(ValueError, match=r"held_out_fraction must be a number in \[0, 1\), got 1.0"):
        data.load_corpus(str(tmp_path / "one.txt"), held_out_fraction=1.0)
    with pytest.raises(ValueError, match="data must be a path, a dataset name"):
        data.load_corpus(42)


def _bad_files(folder: Path) -> list[tuple[Path, str]]:
    """(source, the ValueError's message as a regex) for each way a local file can be unreadable."""
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3))
    (folder / "bad.jsonl").write_text(rows + "{not json\n" + rows)
    (folder / "latin.txt").write_bytes(b"line one\nline two caf" + "é\n".encode("latin-1"))
    (folder / "mixed").mkdir()
    (folder / "mixed" / "a.txt").write_text("hello")
    (folder / "mixed" / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.jsonl").write_text("\n\n")
    (folder / "numbers.jsonl").write_text(rows + json.dumps({"text": 7}) + "\n")
    (folder / "lists.jsonl").write_text("".join(json.dumps({"text": ["a", "b"]}) + "\n" for _ in range(3)))
    (folder / "scalar.jsonl").write_text(rows + '"just a string"\n')
    (folder / "bad.csv").write_text('text,id\n"a,1\n')
    (folder / "bad.parquet").write_text("not parquet")
    return [(folder / "bad.jsonl", r"bad.jsonl: line 4: not valid JSON"),
            (folder / "latin.txt", r"latin.txt: line 2: not UTF-8 text \(byte 0xe9 at byte 21\)"),
            (folder / "mixed", r"mixed/b.txt: a binary file, not text"),
            (folder / "empty.jsonl", r"empty.jsonl: the file is empty"),
            (folder / "blank.jsonl", r"blank.jsonl: the file is empty"),
            (folder / "numbers.jsonl", r"'text' column holds mixed-kind values, not text; first at .*numbers.jsonl, "
                                       r"line 4: 7 \(a number\)"),
            (folder / "lists.jsonl", r"'text' column holds list values, not text; first at .*lists.jsonl, line 1"),
            (folder / "scalar.jsonl", r"scalar.jsonl: line 4: a string, not an object"),
            (folder / "bad.csv", r"bad.csv: not valid CSV"),
            (folder / "bad.parquet", r"bad.parquet: not a Parquet file")]


def test_unreadable_files_raise_value_error_naming_file_and_line(tmp_path):
    (tmp_path / "good").mkdir()
    for i in range(3):
        (tmp_path / "good" / f"{i}.txt").write_text(f"text {i}")
    for source, message in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=f"^data: .*{message}") as error:
            data.load_corpus(str(source))
        assert str(tmp_path) in str(error.value), error.value
        with pytest.raises(ValueError, match=f"^eval_data: .*{message}"):
            data.load_corpus(str(tmp_path / "good"), eval_source=str(source))


def test_symlinked_subfolders_are_followed_once(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    for i in range(4):
        (tmp_path / "elsewhere" / f"{i}.txt").write_text(f"linked row {i}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "own.txt").write_text("own row")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "again").symlink_to(tmp_path / "elsewhere")  # the same folder twice: read once
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data")  # a loop: ends
    (tmp_path / "data" / ".hidden").symlink_to(tmp_path / "elsewhere")  # hidden names stay skipped
    corpus = data.load_corpus(str(tmp_path / "data"), held_out_fraction=0)
    assert sorted(corpus.train["text"]) == ["linked row 0", "linked row 1", "linked row 2", "linked row 3", "own row"]
    (tmp_path / "data" / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=r"data: .*dangling.txt' is a broken symbolic link"):
        data.load_corpus(str(tmp_path / "data"), held_out_fraction=0)


def test_packing_is_the_concatenated_token_stream_cut_into_blocks(tmp_path, tokenizer):
    texts = write_text_folder(tmp_path / "docs", n=4)
    corpus = data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0)
    blocks = data.token_blocks(corpus.train, tokenizer, 64)
    stream = [i for t in list(corpus.train["text"]) for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    n = len(stream) // 64
    assert len(blocks) == n and sorted(list(corpus.train["text"])) == sorted(texts)
    expected = torch.tensor(stream[: n * 64]).view(n, 64)
    assert torch.equal(blocks[:]["input_ids"], expected) and torch.equal(blocks[:]["labels"], expected)
    capped = data.token_blocks(corpus.train, tokenizer, 64, max_chars=7000)  # first file + 1000 chars of the next
    head = "".join(list(corpus.train["text"]))[:7000]
    assert len(capped) == len(tokenizer(head[:6000])["input_ids"] + tokenizer(head[6000:])["input_ids"]) // 64
    with pytest.raises(ValueError, match="data: the text is shorter than one block: .* tokens, block_size=100000"):
        data.token_blocks(corpus.train, tokenizer, 100_000)
    with pytest.raises(ValueError, match="text_column: no column 'body'"):
        data.token_blocks(corpus.train, tokenizer, 64, column="body")


def test_the_datasets_cache_is_reused_on_a_second_run(tmp_path, tokenizer):
    write_text_folder(tmp_path / "docs", n=4)
    first = data.token_blocks(data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0).train, tokenizer, 64)
    files = [f["filename"] for f in first.cache_files]
    assert files, "blocks of file-backed data live in the datasets cache"
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    second = data.token_blocks(data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0).train, tokenizer, 64)
    assert [f["filename"] for f in second.cache_files] == files  # same fingerprint: loaded, not recomputed
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert torch.equal(first[:]["input_ids"], second[:]["input_ids"])
    other = data.token_blocks(data.load_corpus(str(tmp_path / "docs"), held_out_fraction=0).train, tokenizer, 32)
    assert [f["filename"] for f in other.cache_files] != files  # another block size, another fingerprint


def test_stdlib_default_is_split_by_file_as_documented():
    corpus = data.load_corpus()
    held, train = set(list(corpus.held_out["path"])), set(list(corpus.train["path"]))
    assert {"argparse.py", "typing.py", "difflib.py"} <= held and not held & train
    assert len(held) + len(train) == len(data.stdlib_files())
    assert held == {p for p in held | train if data.held_out_by_file(p, 0.05)}
    row = corpus.held_out.filter(lambda r: r["path"] == "argparse.py")[0]
    assert row["text"] == (STDLIB / "argparse.py").read_text(encoding="utf-8") + "\n\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny") / "silu"
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            hidden_act="silu")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def relufy_args(model, out, *extra):
    return ["relufy", "--model", str(model), "--output-dir", str(out), "--steps", "3", "--batch-size", "2",
            "--grad-accum", "1", "--block-size", "32", "--lr", "1e-3", "--warmup-steps", "0", "--eval-chars",
            "3000", "--eval-window", "64", *extra]


def test_relufy_on_a_text_folder_writes_a_model_card_and_loads_in_stock_transformers(tmp_path, tiny_model,
                                                                                     capsys):
    write_text_folder(tmp_path / "docs")
    out = tmp_path / "out"
    assert main(relufy_args(tiny_model, out, "--data", str(tmp_path / "docs"), "--held-out-fraction", "0.25")) == 0
    report = json.loads((out / "relufy_report.json").read_text())
    assert report["tokens"] == 3 * 2 * 32 and report["processes"] == 1
    assert report["data"] == repr(str(tmp_path / "docs")) and report["eval_text"].startswith("held-out rows of")
    assert report["ranks"][0]["transitions"] == [[0, "relu"]]
    card = (out / "README.md").read_text()
    assert f"{report['ppl_before']:.3f}" in card and f"{report['ppl_after']:.3f}" in card
    assert "| 0 | `model.layers.0.mlp.act_fn` |" in card and "--data" in card and "192 tokens" in card
    summary = capsys.readouterr().out
    assert "summary" in summary and "perplexity after (ReLU)" in summary
    code = ("import sys, transformers as tf\n"
            f"m = tf.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert 'hf_stochact' not in sys.modules, 'needed hf_stochact'\n"
            "print(m.config.hidden_act, type(m.model.layers[0].mlp.act_fn).__name__)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.split() == ["relu", "ReLU"], loaded.stderr[-2000:]


def test_relufy_on_a_jsonl_file_with_separate_eval_data_and_push_to_hub(tmp_path, tiny_model, monkeypatch):
    pushed = {}

    def fake_push(self, commit_message=None, **kwargs):  # the Trainer's own push_to_hub, without the network
        pushed.update(repo=self.args.hub_model_id, message=commit_message, files=sorted(os.listdir(
            self.args.output_dir)), card=(Path(self.args.output_dir) / "README.md").read_text())

    monkeypatch.setattr(tf.Trainer, "push_to_hub", fake_push)
    write_jsonl(tmp_path / "train.jsonl", column="body", extra={"lang": "py"})
    write_jsonl(tmp_path / "eval.jsonl", column="body", n=2)
    out = tmp_path / "out"
    assert main(relufy_args(tiny_model, out, "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                            str(tmp_path / "eval.jsonl"), "--text-column", "body", "--push-to-hub",
                            "me/relufied")) == 0
    assert pushed["repo"] == "me/relufied" and "ppl" in pushed["message"]
    assert {"README.md", "config.json", "model.safetensors", "relufy_report.json"} <= set(pushed["files"])
    assert pushed["card"].startswith("---\nlibrary_name: transformers")  # our card, not the Trainer's


def test_relufy_data_errors_name_the_flag(tmp_path, tiny_model, capsys):
    write_jsonl(tmp_path / "train.jsonl")
    cases = [(["--data", str(tmp_path / "missing.jsonl")], "--data: no such file or folder"),
             (["--data", str(tmp_path / "train.jsonl"), "--text-column", "nope"],
              "--text-column: no column 'nope' in the dataset; its columns are text, id"),
             (["--data", str(tmp_path / "train.jsonl"), "--block-size", "100000"],
              "--block-size: 100000 tokens is longer than the model's context (128 positions"),
             (["--data", str(tmp_path / "train.jsonl"), "--eval-window", "129"],
              "--eval-window: 129 tokens is longer than the model's context")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(relufy_args(tiny_model, tmp_path / "out", *extra))
        assert exit_.value.code == 2, extra
        err = capsys.readouterr().err
        assert f"hf-stochact relufy: error: {message}" in err, err


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_one_process(tmp_path, tiny_model):
    """`accelerate launch` (2 gloo processes, DDP) runs relufy unchanged: ranks agree on the stage switches and end
    with bit-identical weights, and the result equals a 1-process run with the same global batch."""
    write_text_folder(tmp_path / "docs")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    common = ["--data", str(tmp_path / "docs"), "--held-out-fraction", "0.25", "--steps", "4", "--grad-accum", "1",
              "--block-size", "32", "--lr", "1e-3", "--warmup-steps", "0", "--eval-chars", "3000",
              "--eval-window", "64", "--stocha-fraction", "0.5"]
    cli = [sys.executable, "-m", "hf_stochact.cli", "relufy", "--model", str(tiny_model)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29547", "-m", "hf_stochact.cli", "relufy", "--model", str(tiny_model)]
    two = subprocess.run(launch + ["--output-dir", str(tmp_path / "two"), "--batch-size", "2", *common],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    assert two.stdout.count("[3/5]") == 1, "only the main process prints"
    report = json.loads((tmp_path / "two" / "relufy_report.json").read_text())
    assert report["processes"] == 2 and len(report["ranks"]) == 2
    assert report["ranks"][0] == report["ranks"][1]  # same weights digest, same stage transitions
    assert report["ranks"][0]["transitions"] == [[0, "stochastic"], [2, "relu"]]
    # the same global batch (4) in one process; StochA masks differ per rank, so compare the ReLU-only recipe
    relu_common = [c for c in common if c not in ("--stocha-fraction", "0.5")]
    two_relu = subprocess.run(launch + ["--output-dir", str(tmp_path / "two-relu"), "--batch-size", "2",
                                        *relu_common], capture_output=True, text=True, timeout=600, env=env)
    assert two_relu.returncode == 0, two_relu.stderr[-5000:]
    one = subprocess.run(cli + ["--output-dir", str(tmp_path / "one"), "--batch-size", "4", *relu_common],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-5000:]
    a = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "two-relu").state_dict()
    moved = max((a[k] - tf.AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()[k]).abs().max().item()
                for k in a)
    assert moved > 1e-4  # training changed the weights ...
    for k in a:  # ... identically, up to the float order of the gradient all-reduce
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
