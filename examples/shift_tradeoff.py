"""Perplexity vs FFN sparsity with gate shifts calibrated on text, no training (hf_stochact.calibrate_shift).

For each model and each target sparsity: load the model, calibrate per-layer, impact-weighted gate shifts on
training-split stdlib text (8 x 512 tokens, files disjoint from the held-out one), fold them, measure perplexity and
exact FFN zeros on the held-out text (first 50,000 characters of argparse.py, 512-token windows, as
`hf-stochact relufy` does). Targets below a model's own sparsity are skipped. ``--report`` adds the end points of
`hf-stochact relufy` runs (their relufy_report.json) as stars: calibration alone vs training with the shift.
Writes a JSON, a plot and prints a markdown table.

    python examples/shift_tradeoff.py --model runs/smollm2-relu-kd --model runs/smollm2-relu-shift86 \\
        --sparsity 0 0.8 0.85 0.9 0.95 --report runs/smollm2-relu-shift86/relufy_report.json --out docs/shift_tradeoff
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_stochact import calibrate_shift, data
from hf_stochact.cli.loading import load_causal_lm
from hf_stochact.cli.relufy import RelufyConfig, eval_ids, perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="model folder (repeat for several)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.75, 0.8, 0.85, 0.9, 0.95],
                    help="target sparsities; 0 = the model as is")
    ap.add_argument("--report", action="append", default=[],
                    help="relufy_report.json of a trained run, plotted as a star (repeatable)")
    ap.add_argument("--baseline", type=float, default=None,
                    help="perplexity of the original SiLU model, drawn with its +15%% band")
    ap.add_argument("--out", default="docs/shift_tradeoff")
    args = ap.parse_args()
    if any(not 0.0 <= t < 1.0 for t in args.sparsity):
        ap.error(f"--sparsity values must be in [0, 1), got {args.sparsity}")
    results = {}
    for folder in args.model:
        name = Path(folder).name
        results[name] = []
        tokenizer, _ = load_causal_lm(folder)
        windows, calibration = eval_ids(tokenizer, RelufyConfig()), data.calibration_windows(tokenizer)
        for target in sorted(set([0.0, *args.sparsity])):
            if target > 0 and target <= results[name][0]["sparsity"]:
                print(f"{name} target {target}: skipped (the model already has "
                      f"{results[name][0]['sparsity']:.1%} zeros)", flush=True)
                continue
            _, model = load_causal_lm(folder)  # fresh weights: calibrate_shift folds into the bias
            if target > 0:
                calibrate_shift(model, calibration, target)
            ppl, per_layer = perplexity(model, windows)
            zeros = sum(per_layer.values()) / len(per_layer)
            results[name].append({"target": target, "ppl": ppl, "sparsity": zeros})
            print(f"{name} target {target}: ppl {ppl:.3f}, exact zeros {zeros:.1%}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trained = {}
    for report in args.report:
        rep = json.loads(Path(report).read_text())
        trained[Path(report).parent.name] = {"ppl": rep["ppl_after"], "sparsity": rep["sparsity"],
                                             "config": rep["config"]}
    out.with_suffix(".json").write_text(json.dumps({"calibrated": results, "trained": trained}, indent=1))
    plot(results, trained, out.with_suffix(".png"), args.baseline)
    print("\n| model | target | exact zeros (held-out) | perplexity |\n|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['target'] or 'none'} | {r['sparsity']:.1%} | {r['ppl']:.3f} |")
    for name, r in trained.items():
        print(f"| {name} (trained) | {r['config'].get('target_sparsity') or 'none'} | {r['sparsity']:.1%} "
              f"| {r['ppl']:.3f} |")


def plot(results: dict, trained: dict, path: Path, baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in results.items():
        ax.plot([r["sparsity"] for r in rows], [r["ppl"] for r in rows], marker="o", label=f"{name} + calibrated shift")
    for name, r in trained.items():
        ax.plot([r["sparsity"]], [r["ppl"]], marker="*", markersize=14, linestyle="none",
                label=f"{name} (relufy run, trained)")
    if baseline:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"SiLU original ({baseline:.2f})")
        ax.axhline(1.15 * baseline, color="gray", linestyle=":", linewidth=1, label="SiLU + 15%")
    ax.set_yscale("log")
    ax.set_xlabel("exact zeros in the FFN hidden (held-out argparse.py)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Gate shifts: calibrated only (lines) vs trained (stars)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
