"""Pre-training comparison (issue #15 item 3): the same small Llama trained from scratch with SiLU, ReLU, Swi+FT
and StochA+FT, several seeds per recipe, at two model sizes.

Corpus: CPython's standard library (train / held-out split by file, the same for every run), local BPE; the model
and optimiser of `hf-stochact demo`. A run's seed sets the initial weights, the batch order and the StochA draws.
Held-out loss is evaluated with the activation the recipe ends with (ReLU for the ReLU-ending recipes, SiLU for the
SiLU baseline); FFN sparsity = exact zeros of the FFN activation at inference.

Every finished run is appended to ``<out>_runs.jsonl`` and skipped when the command is run again, so an interrupted
sweep resumes where it stopped; ``--report`` redraws the table and plot from that file.

    python examples/pretrain_comparison.py --seeds 0 1 2                                   # today's size (1x)
    python examples/pretrain_comparison.py --seeds 0 1 2 --hidden-size 256 --intermediate-size 1024   # 4x
    python examples/pretrain_comparison.py --report       # docs/pretraining.md, .png, .json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, set_seed  # noqa: E402

from hf_stochact import StochActSchedule  # noqa: E402
from hf_stochact.analysis.metrics import measure_sparsity  # noqa: E402
from hf_stochact.cli.demo import DemoConfig, build_corpus, build_model, held_out_loss, training_arguments  # noqa: E402

RECIPES = {  # name: (activation the model is built with, P(SiLU) or None, schedule factory or None)
    "SiLU": ("silu", None, None),
    "ReLU": ("relu", None, None),
    "Swi+FT": ("silu", None, lambda a, p: StochActSchedule(preset="swi+ft", relu_fraction=a.relu_fraction)),
    "StochA+FT p=0.5": ("stochastic", 0.5, lambda a, p: StochActSchedule(p=p, relu_fraction=a.relu_fraction)),
    "StochA+FT p=0.7": ("stochastic", 0.7, lambda a, p: StochActSchedule(p=p, relu_fraction=a.relu_fraction)),
}


def size_label(run: dict) -> str:
    return f"{run['params'] / 1e6:.1f}M ({run['layers']}x{run['hidden_size']}, FFN {run['intermediate_size']}), " \
           f"lr {run['lr']:g}"


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarise(runs: list[dict]) -> dict:
    """{size label: {recipe: {mean/std of loss, ppl, sparsity, n, seeds}}} plus paired differences vs ReLU."""
    out: dict = {}
    for run in runs:
        out.setdefault(size_label(run), {}).setdefault(run["recipe"], []).append(run)
    summary = {}
    for size, recipes in out.items():
        summary[size] = {}
        relu = {r["seed"]: r["held_out_loss"] for r in recipes.get("ReLU", [])}
        for name in [n for n in RECIPES if n in recipes]:
            rs = sorted(recipes[name], key=lambda r: r["seed"])
            losses = [r["held_out_loss"] for r in rs]
            diffs = [r["held_out_loss"] - relu[r["seed"]] for r in rs if r["seed"] in relu]
            summary[size][name] = {
                "n": len(rs), "seeds": [r["seed"] for r in rs], "losses": losses,
                "loss_mean": statistics.fmean(losses), "loss_std": statistics.stdev(losses) if len(rs) > 1 else None,
                "sparsity_mean": statistics.fmean(r["sparsity"] for r in rs),
                "diff_vs_relu_mean": statistics.fmean(diffs) if diffs and name != "ReLU" else None,
                "diff_vs_relu_std": statistics.stdev(diffs) if len(diffs) > 1 and name != "ReLU" else None,
                "steps": rs[0]["steps"], "tokens": rs[0]["tokens"], "params": rs[0]["params"],
                "seconds_mean": statistics.fmean(r["seconds"] for r in rs),
            }
    return summary


def plot(summary: dict, runs: list[dict], path: Path) -> None:
    """Held-out loss per recipe (mean ± std over seeds, every seed as a dot), one panel per model size."""
    fig, axes = plt.subplots(1, len(summary), figsize=(max(7.0, 5.5 * len(summary)), 4.4), squeeze=False)
    for ax, (size, recipes) in zip(axes[0], summary.items()):
        names = list(recipes)
        for i, name in enumerate(names):
            s = recipes[name]
            ax.errorbar(i, s["loss_mean"], yerr=s["loss_std"] or 0, fmt="o", capsize=5, color="C0", ms=7)
            ax.scatter([i + 0.12] * s["n"], s["losses"], s=12, color="grey", zorder=3)
        ax.set_xticks(range(len(names)), [n.replace("StochA+FT ", "StochA+FT\n") for n in names], fontsize=8)
        ax.set_ylabel("held-out loss (nats/token), final activation")
        ax.set_title(f"{size}\n{recipes[names[0]]['tokens'] / 1e6:.1f}M training tokens", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Pre-training on CPython stdlib: held-out loss, mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, runs_path: Path, out: Path) -> None:
    runs = load_runs(runs_path)
    if not runs:
        raise SystemExit(f"no runs in {runs_path}")
    summary = summarise(runs)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(summary, runs, out.with_suffix(".png"))
    first = runs[0]
    lines = [
        "# Pre-training comparison: SiLU, ReLU, Swi+FT, StochA+FT over seeds and two model sizes (issue #15 item 3)",
        "",
        f"Llama models trained from scratch on CPython stdlib source (split by file; the same tokenizer (BPE, vocab "
        f"{first['vocab_size']}), training blocks and held-out blocks for every run: {first['eval_blocks']} blocks of "
        f"{first['block_size']} tokens from held-out files, argparse.py first). Batch {first['batch_size']}x"
        f"{first['block_size']} tokens, AdamW cosine with 5% warm-up (peak lr per section); ReLU phase = last "
        f"{first['relu_fraction']:.0%} of steps for Swi+FT and StochA+FT. A run's seed sets its initial weights, batch "
        "order and StochA draws; the same seed gives every recipe the same initial weights and batches, so "
        "differences to ReLU are also given per seed (paired). CPU, 1 thread per run.",
        "",
    ]
    for size, recipes in summary.items():
        any_ = next(iter(recipes.values()))
        lines += [f"## {size}: {any_['steps']} steps, {any_['tokens'] / 1e6:.2f}M tokens "
                  f"({any_['tokens'] / any_['params']:.2f} tokens per parameter)", "",
                  "| recipe | seeds | held-out loss, mean ± std | perplexity (of the mean) | loss − ReLU, paired "
                  "mean ± std | FFN sparsity at inference | minutes per run |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in recipes.items():
            std = f" ± {s['loss_std']:.4f}" if s["loss_std"] is not None else ""
            diff = "—" if s["diff_vs_relu_mean"] is None else (
                f"{s['diff_vs_relu_mean']:+.4f}" + (f" ± {s['diff_vs_relu_std']:.4f}"
                                                   if s["diff_vs_relu_std"] is not None else ""))
            lines.append(f"| {name} | {s['n']} | {s['loss_mean']:.4f}{std} | {math.exp(s['loss_mean']):.2f} | "
                         f"{diff} | {s['sparsity_mean']:.1%} | {s['seconds_mean'] / 60:.1f} |")
        lines.append("")
    lines += ["![held-out loss per recipe](pretraining.png)", "", "Reproduce (appends to docs/pretraining_runs.jsonl, "
              "skips runs already there):", "", "```bash"]
    for size, recipes in summary.items():
        r = next(r for r in runs if size_label(r) == size)
        by_seeds: dict[tuple, list[str]] = {}  # one command per set of seeds (recipes run with the same seeds)
        for name, s in recipes.items():
            by_seeds.setdefault(tuple(s["seeds"]), []).append(name)
        for seeds, names in by_seeds.items():
            chosen = "" if len(names) == len(RECIPES) else " --recipes " + " ".join(f"'{n}'" for n in names)
            lines.append(f"python examples/pretrain_comparison.py --steps {r['steps']} --seeds "
                         f"{' '.join(map(str, seeds))} --hidden-size {r['hidden_size']} --intermediate-size "
                         f"{r['intermediate_size']} --layers {r['layers']} --lr {r['lr']:g}{chosen}")
    lines += ["python examples/pretrain_comparison.py --report", "```", ""]
    if args.reading and Path(args.reading).exists():
        lines += [Path(args.reading).read_text().rstrip(), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run for every recipe")
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--intermediate-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine)")
    ap.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks of 128 tokens")
    ap.add_argument("--relu-fraction", type=float, default=0.1)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", default="docs/pretraining", help="prefix of the .md/.png/.json and _runs.jsonl outputs")
    ap.add_argument("--reading", default="docs/pretraining_reading.md",
                    help="hand-written interpretation appended to the report when the file exists")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    args = ap.parse_args()
    out = Path(args.out)
    runs_path = out.parent / f"{out.name}_runs.jsonl"
    if args.report:
        report(args, runs_path, out)
        return
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(steps=args.steps, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                     layers=args.layers, lr=args.lr, eval_blocks=args.eval_blocks,
                     output_dir="runs/pretrain_comparison")
    set_seed(0)
    tokenizer, train, held = build_corpus(cfg)  # seed 0: one corpus, tokenizer and split for every run
    done = {(r["recipe"], r["seed"], r["hidden_size"], r["intermediate_size"], r["layers"], r["steps"], r["lr"])
            for r in load_runs(runs_path)}
    for seed in args.seeds:
        for name in args.recipes:
            key = (name, seed, cfg.hidden_size, cfg.intermediate_size, cfg.layers, cfg.steps, cfg.lr)
            if key in done:
                continue
            activation, p, make_schedule = RECIPES[name]
            run_cfg = DemoConfig(**{**cfg.__dict__, "p": p or cfg.p, "seed": seed})
            set_seed(seed)
            model = build_model(run_cfg, len(tokenizer), activation)
            callbacks = [make_schedule(args, run_cfg.p)] if make_schedule else []
            t0 = time.perf_counter()
            trainer = Trainer(model=model, args=training_arguments(run_cfg, logging_steps=10, disable_tqdm=True),
                              train_dataset=train, callbacks=callbacks)
            trainer.train()
            model.eval()
            loss = held_out_loss(model, held)
            run = {"recipe": name, "seed": seed, "steps": cfg.steps, "hidden_size": cfg.hidden_size,
                   "intermediate_size": cfg.intermediate_size, "layers": cfg.layers, "heads": cfg.heads,
                   "vocab_size": len(tokenizer), "block_size": cfg.block_size, "batch_size": cfg.batch_size,
                   "lr": cfg.lr, "relu_fraction": args.relu_fraction, "eval_blocks": len(held),
                   "params": sum(p.numel() for p in model.parameters()),
                   "tokens": cfg.steps * cfg.batch_size * cfg.block_size,
                   "held_out_loss": loss, "sparsity": measure_sparsity(model, held).overall,
                   "final_activation": model.config.hidden_act, "seconds": time.perf_counter() - t0,
                   "curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]}
            with runs_path.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"{name:<16} seed {seed} {size_label(run)}: held-out loss {loss:.4f} sparsity "
                  f"{run['sparsity']:.1%} ({run['seconds']:.0f} s)", flush=True)
    report(args, runs_path, out)


if __name__ == "__main__":
    main()
