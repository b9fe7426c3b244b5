"""`hf-stochact sparsity`: per-layer FFN sparsity of a model on real text (ReLU² Wins-style analysis).

Exact zeros, magnitude-threshold sparsity, the CETT-calibrated threshold per layer (binary search for a shared
target CETT) and its sparsity, and the union of active neurons over N consecutive tokens; a table and a plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..analysis.metrics import sparsity_report
from .args import UsageError, at_least, option, output_file, probability, validate
from .loading import load_causal_lm
from .relufy import RelufyConfig, corpus_for, eval_ids


@dataclasses.dataclass
class SparsityConfig:
    model: str = option("", "model folder (config.json, weights, tokenizer) or Hugging Face Hub id; with --gguf, "
                            "the folder or hub repo of the file")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    data: str = option("", "text the model reads: a file or folder (text/JSONL/Parquet/CSV) or a datasets name, "
                           "all its rows; empty = --eval-file of CPython's standard library")
    text_column: str = option("", "column holding the text (default: 'text', or the only string column)")
    eval_file: str = option("argparse.py", "without --data: the file of CPython's standard library the model reads")
    eval_chars: int = option(50_000, "characters of text read", check=at_least(1))
    window: int = option(256, "tokens per forward window", check=at_least(2))
    max_windows: int = option(8, "at most this many windows", check=at_least(1))
    target_cett: float = option(0.2, "CETT budget for the magnitude-threshold sparsity (ReLU² Wins)",
                                check=probability)
    out: str = option("", "write <out>.json and <out>.png (per-layer table and plot; the folder is created; the "
                          "plot needs matplotlib)", check=output_file(create_folder=True))
    label: str = option("", "name of the model in the report (default: the folder or file name)")

    def relufy_config(self) -> RelufyConfig:
        """The same text choice as relufy's held-out text: --data read whole (its rows are the text)."""
        return RelufyConfig(model=self.model, gguf=self.gguf, data=self.data, eval_data=self.data,
                            text_column=self.text_column, eval_file=self.eval_file, eval_chars=self.eval_chars,
                            eval_window=self.window)

    def check(self) -> None:
        try:
            self.relufy_config().check()
        except UsageError as error:  # relufy's --eval-data is this command's --data
            raise UsageError("--data" if error.flag == "--eval-data" else error.flag, error.message) from error
        if self.out:
            try:
                import matplotlib  # noqa: F401 - checked now, not after the model has been measured
            except ImportError as error:
                raise UsageError("--out", "the plot needs matplotlib: pip install 'hf_stochact[examples]' (or "
                                          "leave out --out)") from error


def run(cfg: SparsityConfig) -> dict:
    validate(cfg)
    rcfg = cfg.relufy_config()
    corpus = corpus_for(rcfg, flags={"eval_data": "--data"}) if cfg.data else None
    tokenizer, model = load_causal_lm(cfg.model, cfg.gguf, command="sparsity")
    ids = eval_ids(tokenizer, rcfg, corpus, window_flag="--window")[: cfg.max_windows]
    report = sparsity_report(model, ids, target_cett=cfg.target_cett)
    keys = list(next(iter(report.values())))
    mean = {k: sum(r[k] for r in report.values()) / len(report) for k in keys}
    label = cfg.label or Path(cfg.gguf or cfg.model).name
    print(f"{label}: {len(report)} FFN layers, {ids.numel()} tokens of {cfg.data or cfg.eval_file}, target CETT "
          f"{cfg.target_cett}")
    for k in keys:
        print(f"  {k:<20} mean {mean[k]:.4f}   per layer min {min(r[k] for r in report.values()):.4f} "
              f"max {max(r[k] for r in report.values()):.4f}")
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"label": label, "config": dataclasses.asdict(cfg),
                                                        "mean": mean, "layers": report}, indent=1))
        plot(report, label, cfg.target_cett, out.with_suffix(".png"))
    return {"mean": mean, "layers": report}


def plot(report: dict, label: str, target: float, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the sparsity plot needs matplotlib: pip install 'hf_stochact[examples]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(report))
    rows = list(report.values())
    fig, ax = plt.subplots(figsize=(8, 4))
    series = {"exact zeros": "exact_zero", f"CETT={target} sparsity": "cett_sparsity", "|h| < 0.05": "abs<0.05",
              "active (non-zero) union, 16 tokens": "union_nonzero@16", "CETT-active union, 16 tokens":
              "union_cett@16"}
    for name, key in series.items():
        if key in rows[0]:
            ax.plot(layers, [r[key] for r in rows], marker=".", label=name)
    ax.set_xlabel("FFN layer")
    ax.set_ylabel("fraction of FFN neurons")
    ax.set_ylim(0, 1)
    ax.set_title(f"FFN sparsity per layer: {label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

