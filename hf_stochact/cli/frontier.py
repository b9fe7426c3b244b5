"""`hf-stochact frontier`: the quality-speed frontier of sparse decoding on a real model (e.g. SmolLM2-135M):
held-out perplexity against end-to-end greedy decode tokens/s, dense and sparse alternated in one process (medians),
per point.

Points: the dense model; every linear on the rows loop with threshold 0 (exact); input thresholds
(``calibrate_thresholds``, TEAL-style) at each ``--sparsity`` for each ``--allocation``; the plain ReLU swap (exact
zeros, no training) alone and with attention thresholds; any ``--relu-model`` folder (a relufied model) alone and
with attention thresholds. Each row: perplexity on the held-out text (default: the first 50,000 characters of
argparse.py in 512-token windows, as ``hf-stochact relufy``), the calibrated model-wide input sparsity (weighted by
weight bytes), the decode speed ratio vs the same model dense, and resident memory (RSS) sparse vs dense.
Calibration text: 8 x 512 tokens of training-split stdlib files. Writes ``<out>.json`` and ``<out>.png`` and prints
a markdown table. Run it on a quiet machine: the speed ratios are only as good as the machine's quiet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .. import data
from ..analysis.machine import machine_report
from ..analysis.metrics import perplexity
from ..inference.rotation import ROTATIONS
from ..inference.sparse import sparse_stats, sparsify, unsparsify
from ..inference.thresholds import ALLOCATIONS, Thresholds, calibrate_thresholds
from ..training.schedule import set_activation
from .args import UsageError, at_least, comma_list, fraction_below_one, one_of, option, output_file, validate
from .loading import load_causal_lm, resolve_model
from .relufy import RelufyConfig, eval_ids

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@dataclasses.dataclass
class FrontierConfig:
    model: str = option("", "model folder (config.json, weights, tokenizer) or Hugging Face Hub id; with --gguf, "
                            "the folder or hub repo of the file")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    sparsity: str = option("0.25,0.4,0.5", "model-wide input sparsities to calibrate, comma-separated (empty: no "
                                           "threshold points, e.g. to measure --relu-model folders only)",
                           check=lambda v: comma_list(fraction_below_one)(v) if v else None)
    allocation: str = option("block", f"threshold allocations, comma-separated ({', '.join(ALLOCATIONS)})",
                             check=comma_list(one_of(*ALLOCATIONS), str))
    relu_swap: bool = option(True, "add the ReLU-swap points (the FFN activation replaced by ReLU, no training)")
    relu_model: str = option("", "relufied model folders to add, comma-separated")
    rotate: str = option("none", "input rotations of the threshold points, comma-separated (none, pca, pca-all: "
                                 "calibrate_thresholds(rotate=...))", check=comma_list(one_of(*ROTATIONS), str))
    sparse_model: str = option("", "model folders with saved thresholds to add (e.g. from `hf-stochact recover`), "
                                   "comma-separated: each runs with its own thresholds")
    eval_chars: int = option(50_000, "characters of argparse.py (held out) scored", check=at_least(1))
    eval_window: int = option(512, "tokens per perplexity window", check=at_least(2))
    rounds: int = option(5, "dense/sparse alternations per point; medians", check=at_least(1))
    new_tokens: int = option(64, "tokens decoded per timed generate call", check=at_least(1))
    threads: int = option(2, "torch threads", check=at_least(1))
    dtype: str = option("float32", "weight dtype of every point (float32, bfloat16: the loops read both)",
                        check=one_of("float32", "bfloat16"))
    out: str = option("", "required: write <out>.json and <out>.png, e.g. runs/frontier/smollm2 (the folder is "
                          "created)", check=output_file(create_folder=True))

    def check(self) -> None:
        if not self.out:
            raise UsageError("--out", "required: where to write <out>.json and <out>.png, e.g. --out "
                                      "runs/frontier/smollm2 (the folder is created)")
        resolve_model(self.model, self.gguf)
        for folder in filter(None, self.relu_model.split(",")):
            resolve_model(folder, "", model_flag="--relu-model")
        for folder in filter(None, self.sparse_model.split(",")):
            resolve_model(folder, "", model_flag="--sparse-model")

def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@torch.inference_mode()
def decode_ratio(model, tok, apply, rounds: int, new_tokens: int) -> dict:
    """Median decode time of the dense model vs the model after ``apply`` (alternated), tokens checked."""
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id or tok.eos_token_id)
    times = {"dense": [], "sparse": []}
    rss = {}
    for _ in range(rounds):
        for name in ("dense", "sparse"):
            unsparsify(model)
            if name == "sparse":
                apply()
            model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=gen["pad_token_id"])
            t0 = time.perf_counter()
            model.generate(ids, **gen)
            times[name].append(time.perf_counter() - t0)
            rss[name] = rss_mib()
    stats = sparse_stats(model)
    unsparsify(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"dense_tok_s": new_tokens / med["dense"], "sparse_tok_s": new_tokens / med["sparse"],
            "speedup": med["dense"] / med["sparse"], "rss_dense_mib": rss["dense"], "rss_sparse_mib": rss["sparse"],
            "sparse_calls": stats["sparse"], "dense_calls": stats["dense"]}


def attention_only(th: Thresholds) -> Thresholds:
    values = {p: t for p, t in th.values.items() if ".mlp." not in p}
    return Thresholds(values, th.sparsity, th.allocation, {p: th.layer_sparsity[p] for p in values})


def run(cfg: FrontierConfig) -> dict:
    validate(cfg)
    torch.set_num_threads(cfg.threads)
    tok, model = load_causal_lm(cfg.model, cfg.gguf, command="frontier")
    model.to(getattr(torch, cfg.dtype)).eval()
    windows = eval_ids(tok, RelufyConfig(eval_chars=cfg.eval_chars, eval_window=cfg.eval_window))
    calib = data.calibration_windows(tok)
    rows: list[dict] = []

    def point(label, m, thresholds=None, exact=False):
        sparse = thresholds is not None or exact

        def apply():  # thresholds=None: the exact ReLU path only (calibration here never writes the config)
            sparsify(m, thresholds=thresholds)

        if sparse:
            apply()
        ppl, _ = perplexity(m, windows, progress=False)
        unsparsify(m)
        speed = decode_ratio(m, tok, apply, cfg.rounds, cfg.new_tokens) if sparse else None
        row = {"label": label, "ppl": ppl, "input_sparsity": thresholds.weighted_sparsity(m) if thresholds else None,
               **(speed or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    point("dense", model)
    base_ppl = rows[0]["ppl"]
    zero = calibrate_thresholds(model, calib, 0.0, allocation="uniform", max_tokens=256, save=False)
    point("every linear on the rows loop (threshold 0: exact)", model, zero)
    for rotate in cfg.rotate.split(","):
        for allocation in cfg.allocation.split(","):
            for s in (float(v) for v in filter(None, cfg.sparsity.split(","))):
                t0 = time.perf_counter()
                th = calibrate_thresholds(model, calib, s, allocation=allocation, max_tokens=256, rotate=rotate,
                                          save=False)
                print(f"calibration {allocation} {rotate} {s}: {time.perf_counter() - t0:.0f} s", flush=True)
                kind = allocation if rotate == "none" else f"{allocation}, rotated {rotate}"
                point(f"thresholds {s:.0%} ({kind})", model, th)
    if cfg.relu_swap:
        set_activation(model, "relu")
        point("ReLU swap (no training), exact", model, exact=True)
        th = calibrate_thresholds(model, calib, 0.4, allocation="greedy", max_tokens=256, save=False)
        point("ReLU swap + attention thresholds 40%", model, attention_only(th))
    for folder in filter(None, cfg.relu_model.split(",")):
        _, relu = load_causal_lm(folder, "", command="frontier")
        relu.to(getattr(torch, cfg.dtype)).eval()
        point(f"{Path(folder).name}, exact", relu, exact=True)
        th = calibrate_thresholds(relu, calib, 0.4, allocation="greedy", max_tokens=256, save=False)
        point(f"{Path(folder).name} + attention thresholds 40%", relu, attention_only(th))
    for folder in filter(None, cfg.sparse_model.split(",")):
        _, saved = load_causal_lm(folder, "", command="frontier", model_flag="--sparse-model")
        saved.to(getattr(torch, cfg.dtype)).eval()
        th = Thresholds.from_config(saved)
        if th is None:
            raise UsageError("--sparse-model", f"{folder}: its config has no sparse_thresholds (save a model after "
                                               "calibrate_thresholds, or train one with `hf-stochact recover`)")
        th.resolve_rotations(saved)
        point(f"{Path(folder).name} (its saved thresholds)", saved, th)
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / base_ppl
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "load": os.getloadavg(),
                                                    "machine": machine_report(), "rows": rows}, indent=1))
    print(table(rows))
    plot(rows, out.with_suffix(".png"), Path(cfg.gguf or cfg.model).name)
    return {"rows": rows}


def table(rows: list[dict]) -> str:
    lines = ["| point | ppl | ppl / dense | input sparsity | decode tok/s dense -> sparse | speedup | "
             "RSS sparse/dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['input_sparsity']:.1%}" if r.get("input_sparsity") is not None else "-"
        speed = f"{r['dense_tok_s']:.1f} -> {r['sparse_tok_s']:.1f} | {r['speedup']:.2f}x | " \
                f"{r['rss_sparse_mib'] / r['rss_dense_mib']:.3f}" if "speedup" in r else "- | - | -"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} | {sp} | {speed} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, name: str) -> None:
    """Perplexity ratio vs speedup; one series per kind of point (thresholds per allocation, lines through the
    sparsities), points beyond 3x perplexity listed in the title instead of plotted."""
    try:
        import matplotlib
    except ImportError:  # the table and JSON are written; the plot needs the examples extra
        print("(no plot: pip install 'hf_stochact[examples]' for matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[dict]] = {}
    off = []
    for r in rows:
        if r["ppl_ratio"] > 3:
            off.append(f"{r['label']}: {r['ppl_ratio']:.0f}x ppl")
            continue
        kind = r["label"].rsplit("(", 1)[1].rstrip(")") if r["label"].startswith("thresholds ") and \
            "(" in r["label"] else r["label"]
        series.setdefault(kind, []).append(r)
    for kind, points in series.items():
        xs = [r.get("speedup", 1.0) for r in points]
        ys = [r["ppl_ratio"] for r in points]
        ax.plot(xs, ys, marker="o", lw=1, label=kind if len(points) == 1 else f"thresholds, {kind} allocation")
        if len(points) > 1:
            for r, x, y in zip(points, xs, ys):
                ax.annotate(f"{r['input_sparsity']:.0%}", (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.axhline(1.10, ls="--", lw=0.8, color="gray")
    ax.axhline(1.25, ls=":", lw=0.8, color="gray")
    ax.axvline(1.5, ls="--", lw=0.8, color="gray")
    ax.axvline(2.0, ls=":", lw=0.8, color="gray")
    ax.set_xlabel("end-to-end decode speedup vs the same model dense (batch 1)")
    ax.set_ylabel("held-out perplexity / dense model's")
    title = f"{name}: quality vs decode speed"
    if off:
        title += "\noff the chart: " + "; ".join(off)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
