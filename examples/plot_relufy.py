"""Training curves of one or more chained `hf-stochact relufy` runs, from their relufy_report.json.

Each run continues the previous one (``--model`` of run k+1 = output of run k), so steps are drawn end to end.
Top: training loss. Bottom, for runs with gate shifts: the target sparsity of `GateShiftSchedule` and the zero
fraction ReLU gives on the same training batch without the live shift (shifts folded by earlier runs included);
the held-out sparsity and perplexity at the end of each run are annotated.

    python examples/plot_relufy.py runs/smollm2-relu-shift86/relufy_report.json \\
        runs/smollm2-relu-shift86b/relufy_report.json --out docs/relufy_shift.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="relufy_report.json files, in training order")
    ap.add_argument("--out", default="docs/relufy_shift.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    offset = 0
    for path in args.reports:
        rep = json.loads(Path(path).read_text())
        history = rep.get("log_history")
        if history is None:
            raise ValueError(f"{path} has no log_history (written by hf-stochact relufy since this script exists)")
        name = Path(path).parent.name
        rows = [h for h in history if "loss" in h]
        steps = [offset + h["step"] for h in rows]
        top.plot(steps, [h["loss"] for h in rows], label=name)
        shifted = [h for h in rows if "gate_shift/target_sparsity" in h]
        if shifted:
            xs = [offset + h["step"] for h in shifted]
            bottom.plot(xs, [h["gate_shift/target_sparsity"] for h in shifted], color="C3",
                        label="target (shifted ReLU)" if offset == 0 else None)
            bottom.plot(xs, [h["gate_shift/relu_sparsity"] for h in shifted], color="C0",
                        label="ReLU without the live (unfolded) shift" if offset == 0 else None)
        end = offset + rep["config"]["steps"]
        bottom.plot([end], [rep["sparsity"]], marker="*", markersize=12, color="C2", linestyle="none",
                    label="held-out (argparse.py)" if offset == 0 else None)
        bottom.annotate(f"ppl {rep['ppl_after']:.2f}", (end, rep["sparsity"]), textcoords="offset points",
                        xytext=(-30, -16), fontsize=8)
        for ax in (top, bottom):
            ax.axvline(offset, color="gray", linewidth=0.6, linestyle=":")
        offset = end
    top.set_ylabel("training loss")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("FFN exact zeros")
    bottom.set_xlabel("optimizer step (runs chained)")
    bottom.legend(fontsize=8, loc="center right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
