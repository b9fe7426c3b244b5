"""Reproduction of the experiment of the blog post "Fun with stochastic activations" (issue #6).

Data: sklearn make_classification, 5,000 samples, 30 features (all informative), 2 classes; 80/20 split with a
fixed seed; batch 128. Model: 4 linear layers 30 -> 64 -> B -> 64 -> 2 (bottleneck B = 4, and 16), the activation
after each of the three hidden layers, cross-entropy. Adam lr 1e-3, weight decay 0.01, 100 epochs, 10 runs (seeds
0..9). Activations, each used identically in training and validation (the stochastic ones sample in both):
relu, silu, stoch (blog: per element ReLU or SiLU with p = 0.5 regardless of sign), learnable_stoch, gumbel_stoch,
and the paper's StochA (p = 0.5, negative inputs only). Sparsity: fraction of first-hidden-layer outputs with
|y| < THRESHOLD on the validation set, every epoch.

    python examples/blog_experiment.py          # writes docs/blog_experiment.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

from hf_stochact import StochasticActivation  # noqa: E402
from hf_stochact.activations.learnable import GumbelStochActivation, LearnableStochActivation  # noqa: E402

THRESHOLD = 1e-2
HIDDEN = 64
ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "stoch": lambda: StochasticActivation(p=0.5, variant="blog"),
    "learnable_stoch": LearnableStochActivation,
    "gumbel_stoch": lambda: GumbelStochActivation(eval_mode="sample"),
    "StochA (paper)": lambda: StochasticActivation(p=0.5, variant="paper"),
}


class Net(nn.Module):
    def __init__(self, make_act, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(30, HIDDEN), nn.Linear(HIDDEN, bottleneck),
                                     nn.Linear(bottleneck, HIDDEN), nn.Linear(HIDDEN, 2)])
        self.acts = nn.ModuleList([make_act() for _ in range(3)])

    def forward(self, x):
        first = None
        for i, act in enumerate(self.acts):
            x = act(self.layers[i](x))
            first = x if i == 0 else first
        return self.layers[-1](x), first


def set_sampling(net: Net) -> None:
    """Stochastic activations sample at validation too (the blog uses each activation identically)."""
    for act in net.acts:
        if isinstance(act, StochasticActivation):
            act.sampling = True


def gate_value(net: Net, x: torch.Tensor) -> float | None:
    """Mean learned ReLU weight / probability on the first layer's pre-activations (None for other activations)."""
    act = net.acts[0]
    pre = net.layers[0](x)
    if isinstance(act, LearnableStochActivation):
        return float(act.relu_weight(pre).mean())
    if isinstance(act, GumbelStochActivation):
        return float(act.relu_prob(pre).mean())
    return None


def run_one(name: str, bottleneck: int, seed: int, data, epochs: int) -> dict:
    xtr, ytr, xva, yva = data
    torch.manual_seed(seed)
    net = Net(ACTIVATIONS[name], bottleneck)
    set_sampling(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    hist = {"val_loss": [], "sparsity": [], "exact_zero": [], "gate": []}
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(net(xtr[idx])[0], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            logits, first = net(xva)
            hist["val_loss"].append(float(F.cross_entropy(logits, yva)))
            hist["sparsity"].append(float((first.abs() < THRESHOLD).float().mean()))
            hist["exact_zero"].append(float((first == 0).float().mean()))
            hist["gate"].append(gate_value(net, xva))
    return hist


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bottlenecks", type=int, nargs="*", default=[4, 16])
    ap.add_argument("--out", default="docs/blog_experiment")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = make_classification(n_samples=5000, n_features=30, n_informative=30, n_redundant=0, n_repeated=0,
                               n_classes=2, random_state=0)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, random_state=0)
    data = tuple(torch.tensor(a, dtype=torch.float32 if a.ndim == 2 else torch.long) for a in (xtr, ytr, xva, yva))
    results: dict = {}
    t0 = time.perf_counter()
    for b in args.bottlenecks:
        for name in ACTIVATIONS:
            runs = [run_one(name, b, seed, data, args.epochs) for seed in range(args.runs)]
            results[f"{b}/{name}"] = runs
            last = [r["val_loss"][-1] for r in runs]
            best = [min(r["val_loss"]) for r in runs]
            sp = [r["sparsity"][-1] for r in runs]
            print(f"bottleneck {b:>2} {name:<16} final val loss {mean_std(last)[0]:.4f}±{mean_std(last)[1]:.4f} "
                  f"best {mean_std(best)[0]:.4f} sparsity {mean_std(sp)[0]:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results))
    plot(results, args, out.with_suffix(".png"))
    write_table(results, args, out.with_suffix(".md"))


def _band(ax, runs, key, label):
    series = list(zip(*[r[key] for r in runs]))
    m = [statistics.fmean(v) for v in series]
    s = [statistics.pstdev(v) for v in series]
    epochs = range(1, len(m) + 1)
    ax.plot(epochs, m, label=label, lw=1.2)
    ax.fill_between(epochs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)


def plot(results: dict, args, path: Path) -> None:
    fig, axes = plt.subplots(len(args.bottlenecks), 3, figsize=(15, 4.2 * len(args.bottlenecks)), squeeze=False)
    for row, b in enumerate(args.bottlenecks):
        for name in ACTIVATIONS:
            runs = results[f"{b}/{name}"]
            _band(axes[row][0], runs, "val_loss", name)
            _band(axes[row][1], runs, "sparsity", name)
            if runs[0]["gate"][0] is not None:
                _band(axes[row][2], runs, "gate", name)
        axes[row][0].set_title(f"bottleneck {b}: validation loss (mean ± std, {args.runs} runs)")
        axes[row][1].set_title(f"bottleneck {b}: first-layer |y| < {THRESHOLD:g} (validation)")
        axes[row][2].set_title(f"bottleneck {b}: learned ReLU weight / probability (layer 1)")
        for ax in axes[row]:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
        axes[row][1].set_ylim(0, 1)
        axes[row][2].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_table(results: dict, args, path: Path) -> None:
    lines = ["# Blog experiment reproduction (issue #6)", "",
             f"Setup: see `examples/blog_experiment.py` docstring; hidden width {HIDDEN}; sparsity threshold "
             f"|y| < {THRESHOLD:g} on the first hidden layer's outputs over the validation set; {args.runs} runs x "
             f"{args.epochs} epochs; mean ± std over runs.", "",
             "| bottleneck | activation | final val loss | best val loss | sparsity epoch 1 | sparsity final | "
             "exact zeros final | learned ReLU weight/prob. epoch 1 -> final |",
             "|---|---|---|---|---|---|---|---|"]
    for key, runs in results.items():
        b, name = key.split("/", 1)
        f = lambda k, i, runs=runs: mean_std([r[k][i] for r in runs])  # noqa: E731
        best = mean_std([min(r["val_loss"]) for r in runs])
        gate = (f"{f('gate', 0)[0]:.2f} -> {f('gate', -1)[0]:.2f}" if runs[0]["gate"][0] is not None else "")
        lines.append(f"| {b} | {name} | {f('val_loss', -1)[0]:.4f} ± {f('val_loss', -1)[1]:.4f} | {best[0]:.4f} | "
                     f"{f('sparsity', 0)[0]:.3f} | {f('sparsity', -1)[0]:.3f} ± {f('sparsity', -1)[1]:.3f} | "
                     f"{f('exact_zero', -1)[0]:.3f} | {gate} |")
    lines += ["", "![curves](blog_experiment.png)", "", "Reproduce: `python examples/blog_experiment.py`", ""]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
