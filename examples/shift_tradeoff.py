"""Perplexity vs FFN sparsity with gate shifts calibrated on text, no training (hf_stochact.calibrate_shift).

For each model and each target sparsity: load the model, calibrate per-neuron gate shifts on training-split stdlib
text (8 x 512 tokens, files disjoint from the held-out one), fold them, measure perplexity and exact FFN zeros on
the held-out text (first 50,000 characters of argparse.py, 512-token windows, as `hf-stochact relufy` does).
Writes a JSON, a plot and prints a markdown table.

    python examples/shift_tradeoff.py --model runs/smollm2-relu-kd --model runs/smollm2-relu-shift86 \\
        --sparsity 0 0.75 0.8 0.85 0.9 0.95 --out docs/shift_tradeoff
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_stochact import calibrate_shift, data
from hf_stochact.loading import load_causal_lm
from hf_stochact.relufy import RelufyConfig, eval_ids, perplexity


def calibration_ids(tokenizer, rows: int = 8, window: int = 512, eval_file: str = "argparse.py") -> torch.Tensor:
    train_files, _ = data.split_files(data.stdlib_files())
    files = [f for f in train_files if f.name != eval_file]
    ids = torch.tensor(data.encode(tokenizer, data.read_text(files[:60], max_chars=20 * rows * window)))
    if len(ids) < rows * window:
        raise ValueError(f"calibration text too short: {len(ids)} tokens for rows={rows} x window={window}")
    return ids[: rows * window].view(rows, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="model folder (repeat for several)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.75, 0.8, 0.85, 0.9, 0.95],
                    help="target sparsities; 0 = the model as is")
    ap.add_argument("--out", default="docs/shift_tradeoff")
    args = ap.parse_args()
    results = {}
    for folder in args.model:
        name = Path(folder).name
        results[name] = []
        for target in args.sparsity:
            tokenizer, model = load_causal_lm(folder)
            windows = eval_ids(tokenizer, RelufyConfig())
            if target > 0:
                calibrate_shift(model, calibration_ids(tokenizer), target)
            ppl, per_layer = perplexity(model, windows)
            zeros = sum(per_layer.values()) / len(per_layer)
            results[name].append({"target": target, "ppl": ppl, "sparsity": zeros})
            print(f"{name} target {target}: ppl {ppl:.3f}, exact zeros {zeros:.1%}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print("\n| model | target | exact zeros (held-out) | perplexity |\n|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['target'] or 'none'} | {r['sparsity']:.1%} | {r['ppl']:.3f} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in results.items():
        ax.plot([r["sparsity"] for r in rows], [r["ppl"] for r in rows], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("exact zeros in the FFN hidden (held-out argparse.py)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Gate shifts calibrated without training: perplexity vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
