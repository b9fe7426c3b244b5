"""Decode speed with and without stochastic activations, side by side in one process (A B A B, medians).

    python examples/bench_generation.py                       # small random Llama, writes docs/generation_overhead.md
    python examples/bench_generation.py --model DIR [--gguf F] # a saved / GGUF model (e.g. SmolLM2-135M)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers as tf

import hf_stochact  # noqa: F401  (wraps generate)
from hf_stochact.cli.loading import load_causal_lm


def load(args):
    if args.model:
        return load_causal_lm(args.model, args.gguf)[1].eval(), args.model
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return tf.LlamaForCausalLM(config).eval(), "random Llama 4x256 (FFN 1024, vocab 8192)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--gguf")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/generation_overhead.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, name = load(args)
    ids = torch.randint(10, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    variants = {"deterministic": {}, f"stochastic_activation=True, p={args.p}":
                {"stochastic_activation": True, "stochastic_p": args.p}}
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for extra in variants.values():
            model.generate(ids, **kw, **extra)  # warm-up
        for _ in range(args.rounds):
            for k, extra in variants.items():
                t0 = time.perf_counter()
                model.generate(ids, **kw, **extra)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["deterministic"]
    lines = ["# Decode speed with stochastic activations", "",
             f"Model: {name}; greedy, batch 1, {args.new_tokens} new tokens after a 16-token prompt, {args.threads} "
             f"threads; variants interleaved, {args.rounds} rounds, medians.", "",
             "| decoding | tokens/s | vs deterministic |", "|---|---|---|"]
    for k, t in med.items():
        lines.append(f"| {k} | {args.new_tokens / t:.1f} | {base / t:.3f}x |")
    lines += ["", f"Reproduce: `python examples/bench_generation.py{' --model ' + args.model if args.model else ''}"
                  f"{' --gguf ' + args.gguf if args.gguf else ''}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
