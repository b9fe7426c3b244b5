"""Cost of the stochastic activation on a GPU: forward + backward of a stack of Llama MLPs at 1B-model shapes.

Each variant runs a stack of ``--blocks`` gated MLPs (residual, d = 2048, d_ff = 8192, bfloat16) on a batch of
8 x 2048 tokens; time per forward + backward (CUDA events, variants interleaved, medians), peak memory above the
weights and gradients, and bytes saved for backward per FFN hidden element above SiLU (saved_tensors_hooks, distinct
storages). Variants: silu, relu, stochastic (hf_stochact; eager = the draw's own fused kernels, compiled = the whole
stack under torch.compile), stochastic through the operator (``kernels.CUDA_THROUGH_OPERATOR``: opaque to the
compiled graph), stochastic with the plain unfused torch ops, and the naive rand_like + where form.

    python examples/bench_gpu_activation.py --out docs/activation_cost_gpu.json    # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import hf_stochact
from hf_stochact import kernels
from hf_stochact.kernels import reference


class NaiveStochA(nn.Module):
    def forward(self, x):
        silu_drawn = torch.rand_like(x) < 0.5
        return torch.where(x >= 0, x, torch.where(silu_drawn, F.silu(x), torch.zeros_like(x)))


class Stack(nn.Module):
    def __init__(self, d, d_ff, blocks, act):
        super().__init__()
        self.gate = nn.ModuleList(nn.Linear(d, d_ff, bias=False) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(d, d_ff, bias=False) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(d_ff, d, bias=False) for _ in range(blocks))
        self.act = act

    def forward(self, x):
        for g, u, dn in zip(self.gate, self.up, self.down):
            x = x + dn(self.act(g(x)) * u(x))
        return x


def activation(name: str) -> nn.Module:
    if name == "naive":
        return NaiveStochA()
    if name.startswith("stochastic"):
        return hf_stochact.StochasticActivation(p=0.5).train()
    return {"silu": nn.SiLU(), "relu": nn.ReLU()}[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = Stack(args.d, args.d_ff, args.blocks, nn.SiLU()).to(dev, torch.bfloat16)
    x = torch.randn(args.batch, args.seq, args.d, device=dev, dtype=torch.bfloat16)
    hidden = args.blocks * args.batch * args.seq * args.d_ff

    names = ["silu", "relu", "stochastic", "stochastic-op", "stochastic-unfused", "naive"]
    variants = {}
    for name in names:
        for mode in ("eager", "compiled"):
            if name == "stochastic-unfused" and mode == "compiled":
                continue  # under compile there is only the fused form
            stack = Stack(args.d, args.d_ff, args.blocks, activation(name)).to(dev, torch.bfloat16)
            stack.load_state_dict(base.state_dict())
            fn = torch.compile(stack) if mode == "compiled" else stack
            variants[f"{name} {mode}"] = (name, stack, fn)

    def run(key):
        name, stack, fn = variants[key]
        reference.FUSE_OFF_CPU = name != "stochastic-unfused"
        kernels.CUDA_THROUGH_OPERATOR = name == "stochastic-op"
        stack.zero_grad(set_to_none=True)
        fn(x).float().pow(2).mean().backward()

    results = {}
    for key in variants:  # warm-up (compiles), peak memory, saved bytes
        run(key)
        run(key)
        torch.cuda.synchronize()
        name, stack, fn = variants[key]
        stack.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run(key)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        saved = {}
        if key.endswith("eager"):
            def pack(t, saved=saved):
                st = t.untyped_storage()
                saved[st.data_ptr()] = st.nbytes()
                return t

            reference.FUSE_OFF_CPU = name != "stochastic-unfused"
            kernels.CUDA_THROUGH_OPERATOR = name == "stochastic-op"
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = stack(x)
            del out
        results[key] = {"peak_mib": peak / 2**20, "saved_mib": sum(saved.values()) / 2**20 if saved else None}
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key in variants:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(key)
            b.record()
            torch.cuda.synchronize()
            times[key].append(a.elapsed_time(b))
    for key in variants:
        results[key]["ms"] = statistics.median(times[key])
    silu = {m: results[f"silu {m}"] for m in ("eager", "compiled")}
    lines = [f"# Cost of the stochastic activation on {torch.cuda.get_device_name()}", "",
             f"{args.blocks} gated MLPs d={args.d}, d_ff={args.d_ff}, bf16, batch {args.batch}x{args.seq}, forward + "
             f"backward; torch {torch.__version__}; {args.rounds} interleaved rounds, medians.", "",
             "| activation | mode | ms | vs SiLU (same mode) | peak MiB above weights | extra saved bytes / "
             "hidden element |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        mode = key.split()[-1]
        extra = "" if r["saved_mib"] is None else \
            f"{(r['saved_mib'] - results['silu eager']['saved_mib']) * 2**20 / hidden:+.2f}"
        lines.append(f"| {key.rsplit(' ', 1)[0]} | {mode} | {r['ms']:.1f} | {r['ms'] / silu[mode]['ms']:.3f}x | "
                     f"{r['peak_mib']:.0f} | {extra} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "results": results, "markdown": text}, f, indent=1)


if __name__ == "__main__":
    main()
