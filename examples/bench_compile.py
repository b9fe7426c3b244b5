"""torch.compile vs eager, side by side in one process (interleaved rounds, medians), on this CPU.

1. Training step (forward + backward + AdamW) of a small Llama with hidden_act = silu / stochastic, eager and
   ``torch.compile(model)``.
2. Greedy decode tokens/s of a ReLU Llama (SmolLM2-135M's layer shape, random weights, fewer layers), dense and
   sparsified, eager and compiled (static cache, ``torch.compile(model.forward)``); compiled sparse tokens must equal
   eager dense tokens.

    python examples/bench_compile.py            # writes docs/compile.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_stochact


def train_models(args):
    models = {}
    for act in ("silu", "stochastic"):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256, hidden_act=act)
        for mode in ("eager", "compiled"):
            model = LlamaForCausalLM(cfg).train()
            fn = torch.compile(model) if mode == "compiled" else model
            models[f"{act} {mode}"] = (model, fn, torch.optim.AdamW(model.parameters(), lr=1e-4))
    return models


def bench_training(args) -> list[str]:
    models = train_models(args)
    batch = torch.randint(0, 4096, (args.batch, 256))

    def step(name):
        model, fn, opt = models[name]
        t0 = time.perf_counter()
        fn(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up, includes compilation
        step(name)
        step(name)
    times = {n: [] for n in models}
    for _ in range(args.rounds):
        for n in models:
            times[n].append(step(n))
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    lines = ["## Training step", "",
             f"Llama 4 layers, hidden 256, FFN 1024, vocab 4096, batch {args.batch}x256, AdamW; {args.rounds} "
             "interleaved rounds, medians.", "",
             "| activation | eager ms | compiled ms | compiled / eager | vs SiLU (eager) | vs SiLU (compiled) |",
             "|---|---|---|---|---|---|"]
    for act in ("silu", "stochastic"):
        e, c = med[f"{act} eager"], med[f"{act} compiled"]
        lines.append(f"| {act} | {e:.1f} | {c:.1f} | {c / e:.3f}x | {e / med['silu eager']:.3f}x | "
                     f"{c / med['silu compiled']:.3f}x |")
    return lines


@torch.inference_mode()
def bench_decode(args) -> list[str]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=512, hidden_act="relu",
                      tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 49152, (1, 16))
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    variants = {}
    for name in ("dense eager", "sparse eager", "dense compiled", "sparse compiled"):
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict(base.state_dict())
        if name.startswith("sparse"):
            hf_stochact.sparsify(model)
        kw = dict(gen)
        if name.endswith("compiled"):
            kw["cache_implementation"] = "static"
            model.forward = torch.compile(model.forward, fullgraph=True)
        variants[name] = (model, kw)
    outputs = {n: m.generate(ids, **kw) for n, (m, kw) in variants.items()}  # warm-up, compiles
    same = all(torch.equal(o, outputs["dense eager"]) for o in outputs.values())
    times = {n: [] for n in variants}
    for _ in range(args.rounds):
        for n, (m, kw) in variants.items():
            t0 = time.perf_counter()
            m.generate(ids, **kw)
            times[n].append(time.perf_counter() - t0)
    tok_s = {n: args.new_tokens / statistics.median(t) for n, t in times.items()}
    lines = ["## Decode", "",
             f"ReLU Llama with SmolLM2-135M's layer shape (hidden 576, FFN 1536, 9/3 heads, vocab 49152), "
             f"{args.layers} layers, random weights (~50% FFN zeros), greedy, prompt 16 tokens, {args.new_tokens} new "
             f"tokens, {args.rounds} interleaved rounds, medians. Identical greedy tokens in all four: {same}.", "",
             "| variant | tok/s | vs dense eager |", "|---|---|---|"]
    for n, v in tok_s.items():
        lines.append(f"| {n} | {v:.1f} | {v / tok_s['dense eager']:.2f}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/compile.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# torch.compile vs eager", "",
             f"{args.threads} threads, torch {torch.__version__}, inductor CPU backend; run through "
             "`../shared/tools/quiet` (nothing else on the machine).", ""]
    lines += bench_training(args) + [""] + bench_decode(args)
    lines += ["", "Reproduce: `python examples/bench_compile.py`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
