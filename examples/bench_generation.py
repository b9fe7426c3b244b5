"""Decode speed with and without stochastic activations, side by side in one process (A B C A B C, medians).

Variants: plain decoding as hf_stochact leaves a model (every stock FFN activation carries the decoding hook, a no-op
outside stochastic calls), plain decoding with those hooks taken off (the cost of the hook itself), and
``stochastic_activation=True``.

    python examples/bench_generation.py                       # small random Llama, writes docs/generation_overhead.md
    python examples/bench_generation.py --model DIR [--gguf F] # a saved / GGUF model (e.g. SmolLM2-135M)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import transformers as tf

import hf_stochact  # noqa: F401  (wraps generate)
from hf_stochact.cli.loading import load_causal_lm
from hf_stochact.inference import decoding


def load(args):
    if args.model:
        return load_causal_lm(args.model, args.gguf)[1].eval(), args.model
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return tf.LlamaForCausalLM(config).eval(), "random Llama 4x256 (FFN 1024, vocab 8192)"


@contextlib.contextmanager
def without_hooks(model):
    """Take hf_stochact's decoding hooks off the model's activations for the block (benchmark only)."""
    taken = []
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is decoding._stock_draw:
                taken.append((module, key, hook))
                del module._forward_hooks[key]
    try:
        yield len(taken)
    finally:
        for module, key, hook in taken:
            module._forward_hooks[key] = hook


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
    variants = {"deterministic": {}, "deterministic, decoding hooks taken off": {},
                f"stochastic_activation=True, p={args.p}": {"stochastic_activation": True, "stochastic_p": args.p}}
    times = {k: [] for k in variants}

    def run(k, extra):
        with without_hooks(model) if "taken off" in k else contextlib.nullcontext():
            t0 = time.perf_counter()
            model.generate(ids, **kw, **extra)
            return time.perf_counter() - t0

    with torch.inference_mode():
        for k, extra in variants.items():
            run(k, extra)  # warm-up
        for _ in range(args.rounds):
            for k, extra in variants.items():
                times[k].append(run(k, extra))
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
