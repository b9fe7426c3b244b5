"""Greedy HumanEval pass@1 of several result files (from ``examples/humaneval.py``) on the problems they share, with
95% bootstrap intervals, and each file's paired difference to the first (an interval excluding 0 is a real
difference). Prints a markdown table.

    python examples/humaneval_paired.py docs/humaneval.jsonl docs/humaneval_pca-all-40.jsonl \\
        docs/humaneval_pca-40.jsonl
"""

from __future__ import annotations

import argparse
import json

from hf_stochact.analysis.codegen import bootstrap_ci


def passed(path: str, config: str) -> dict[str, float]:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["config"] == config:
                out[r["task_id"]] = sum(r["passed"]) / r["n"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSONL files; the first is the reference")
    ap.add_argument("--config", default="greedy", help="configuration compared (default: greedy)")
    args = ap.parse_args()
    runs = {path: passed(path, args.config) for path in args.results}
    common = sorted(set.intersection(*(set(r) for r in runs.values())), key=lambda t: int(t.split("/")[1]))
    ref = [runs[args.results[0]][t] for t in common]
    print(f"{len(common)} problems in every file; pass@1 (greedy) [95% bootstrap], paired difference to "
          f"{args.results[0]}\n")
    print("| results | correct | pass@1 | difference to the first |\n|---|---|---|---|")
    for path in args.results:
        values = [runs[path][t] for t in common]
        mean, lo, hi = bootstrap_ci(values)
        diff = "–" if path == args.results[0] else "{:+.3f} [{:+.3f}, {:+.3f}]".format(
            *bootstrap_ci(values, paired_with=ref))
        print(f"| {path} | {sum(values):.0f} / {len(common)} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | {diff} |")


if __name__ == "__main__":
    main()
