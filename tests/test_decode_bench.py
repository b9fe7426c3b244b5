"""The decode comparison (`hf-stochact bench --compare`): float GGUFs written from the same weights, the table's
rows and columns, and its argument checks."""

import numpy as np
import pytest
import torch
import transformers as tf
from helpers import write_tiny_llama_gguf

from hf_stochact.analysis import decode_bench
from hf_stochact.analysis.machine import cpu_flags, describe, machine_report


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_float_gguf_holds_the_same_weights(tmp_path, dtype):
    import gguf

    source = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(source)
    target = decode_bench.write_float_gguf(source, tmp_path / f"tiny.{dtype}.gguf", dtype)
    reader = gguf.GGUFReader(str(target))
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == (0 if dtype == "f32" else 1)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay float32
    assert kinds["blk.0.ffn_up.weight"] == (gguf.GGMLQuantizationType.F32 if dtype == "f32"
                                           else gguf.GGMLQuantizationType.F16)
    a = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name)
    b = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=target.name)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        expected = x if dtype == "f32" or x.dim() < 2 else x.half().float()
        assert torch.equal(y, expected), name


def test_decode_rate_leaves_out_the_prefill_and_says_when_it_cannot_tell():
    v = decode_bench.Variant("x", "HF", "fp32", lambda p, n: [0] * n)
    v.times = {9: [1.0, 1.2, 1.1], 1: [0.2, 0.3, 0.1]}
    assert decode_bench.decode_rate(v, 9) == pytest.approx(8 / (1.1 - 0.2))
    v.times = {9: [0.1], 1: [0.2]}
    assert np.isnan(decode_bench.decode_rate(v, 9))


def test_machine_report_names_the_cpu_and_measures_bandwidth():
    report = machine_report()
    assert report["cpu"] and report["cores"] >= 1 and report["read_gbps"] > 0
    assert set(report["flags"]) == set(cpu_flags())
    assert report["cpu"] in describe(report) and "GB/s" in describe(report)


@pytest.mark.slow
def test_compare_builds_every_requested_row_with_its_perplexity(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(source)
    settings = decode_bench.CompareSettings(sparsities=(0.3,), new_tokens=3, rounds=1, llama_cpp=False, fast=False,
                                            bf16=True, eval_chars=3000)
    result = decode_bench.compare(str(tmp_path), source.name, settings, progress=lambda s: None)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["HF eager dense fp32", "HF eager + thresholds 30%", "HF eager dense bf16",
                      "HF eager + thresholds 30% bf16"]
    assert all(np.isfinite(r["ppl"]) and len(r["tokens"]) == 3 for r in result["rows"])
    table = result["markdown"]
    assert "| HF eager dense fp32 | HF | fp32 |" in table and "held-out ppl" in table
    assert result["machine"]["cpu"] in table


def test_compare_has_native_rows_and_the_bandwidth_floor(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(source)
    settings = decode_bench.CompareSettings(sparsities=(0.3,), new_tokens=3, rounds=2, llama_cpp=False, fast=True,
                                            bf16=True, eval_chars=3000)
    result = decode_bench.compare(str(tmp_path), source.name, settings, progress=lambda s: None)
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["HF eager dense fp32", "native step dense fp32", "native step + thresholds 30%",
                          "HF eager dense bf16", "native step dense bf16", "native step + thresholds 30% bf16"]
    assert all("NOT native" not in r["note"] for r in rows.values()), [r["note"] for r in rows.values()]
    # bytes a token reads: every linear weight once (the tied head too); thresholds skip a share of theirs
    dense = rows["HF eager dense fp32"]["bytes_per_token"]
    assert rows["native step dense fp32"]["bytes_per_token"] == dense
    assert rows["HF eager dense bf16"]["bytes_per_token"] == dense / 2
    assert rows["native step + thresholds 30%"]["bytes_per_token"] < dense
    assert len(result["machine"]["read_gbps_rounds"]) == 2 and "| % of floor |" in result["markdown"]


def test_bench_compare_needs_a_model(capsys):
    from hf_stochact.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--compare"])
    assert exit_info.value.code == 2
    assert "--compare" in capsys.readouterr().err.strip().splitlines()[-1]
