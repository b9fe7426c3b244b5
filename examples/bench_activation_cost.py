"""Cost of the stochastic activation in a training step of a small Llama, side by side with SiLU.

Measures, in one process with the variants interleaved (A B C A B C ..., medians):
  * optimizer-step time (forward + backward + AdamW) for hidden_act = silu, stochastic (hf_stochact) and a naive
    torch.where + rand_like implementation;
  * bytes saved for backward per FFN hidden element, above SiLU (saved_tensors_hooks, unique storages).

    python examples/bench_activation_cost.py            # writes docs/activation_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import hf_stochact
from hf_stochact.integration import register_activation


class NaiveStochA(nn.Module):
    """The obvious implementation: float uniforms per element and torch.where (autograd saves several tensors)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        silu_drawn = torch.rand_like(x) < self.p
        return torch.where(x >= 0, x, torch.where(silu_drawn, F.silu(x), torch.zeros_like(x)))


def build(act: str, args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         vocab_size=args.vocab, max_position_embeddings=args.seq, hidden_act=act)
    return LlamaForCausalLM(config).train()


def saved_bytes(model, batch) -> int:
    """Bytes of distinct storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch, labels=batch)
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/activation_cost.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    register_activation("naive_stocha", NaiveStochA)

    names = ["silu", "stochastic", "naive_stocha"]
    models = {n: build(n, args) for n in names}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))
    hidden_elements = args.layers * args.batch * args.seq * args.ffn

    def step(n):
        t0 = time.perf_counter()
        loss = models[n](input_ids=batch, labels=batch).loss
        loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for n in names:  # warm-up
        step(n)
        step(n)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            times[n].append(step(n))
    med = {n: statistics.median(t) for n, t in times.items()}
    mem = {n: saved_bytes(models[n], batch) for n in names}

    lines = [
        "# Cost of the stochastic activation in a training step",
        "",
        f"Llama {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}, batch "
        f"{args.batch}x{args.seq} tokens, AdamW, {args.threads} threads, torch {torch.__version__}. "
        f"Variants interleaved in one process, {args.rounds} rounds, medians.",
        "",
        "| activation | step ms | vs SiLU | saved for backward MiB | extra bytes / FFN hidden element |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        extra = (mem[n] - mem["silu"]) / hidden_elements
        ratio = med[n] / med["silu"]
        lines.append(f"| {n} | {med[n] * 1e3:.1f} | {ratio:.3f}x | {mem[n] / 2**20:.1f} | {extra:+.2f} |")
    lines += ["", "Reproduce: `python examples/bench_activation_cost.py`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    assert hf_stochact.StochasticActivation  # registered on import
    main()
