"""The input-sparse rows loop against the dense product, per layer shape, one decode token.

For each shape (d_in -> d_out; SmolLM2-135M's four, a q/k/v group, and 2048/8192-class shapes) and dtype: the dense
``F.linear`` (MKL/oneDNN; the weight contiguous [d_out, d_in] as ``nn.Linear`` holds it) against hf_stochact's
``sparse_rows`` loop (the weight stored once in rows layout [d_in, d_out]) with all inputs kept and with 40% of them
zeroed by a threshold. Weight copies are rotated over ``--min-mib`` MiB so they come from memory, as in a decode
step; the variants alternate round by round in one process; medians. GB/s = bytes of weights the call needs (all
rows for dense, the surviving rows for sparse) / time. The CPU, its flags, the load and a measured read bandwidth
head the table.

    python examples/bench_kernels.py --out docs/kernels.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_stochact import kernels
from hf_stochact.analysis.machine import describe, machine_report, warn_if_busy

SHAPES = {
    "576->576 (q, o)": (576, [576]),
    "576->192 (k, v)": (576, [192]),
    "576->[576,192,192] (q/k/v group)": (576, [576, 192, 192]),
    "576->1536 (gate, up)": (576, [1536]),
    "576->[1536,1536] (gate/up group)": (576, [1536, 1536]),
    "1536->576 (down)": (1536, [576]),
    "2048->2048": (2048, [2048]),
    "2048->8192": (2048, [8192]),
    "8192->2048": (8192, [2048]),
}


def threshold_for(x: torch.Tensor, zeroed: float) -> float:
    if zeroed <= 0:
        return 0.0
    return float(x.abs().flatten().kthvalue(max(1, int(round(zeroed * x.numel())))).values)


def bench_shape(d_in: int, d_outs: list[int], dtype: torch.dtype, rounds: int, min_bytes: int) -> dict:
    g = torch.Generator().manual_seed(0)
    size = sum(d_in * d for d in d_outs) * (4 if dtype == torch.float32 else 2)
    copies = max(2, min_bytes // size)
    dense_w = [[torch.randn(d, d_in, generator=g).to(dtype) for d in d_outs] for _ in range(copies)]
    rows_w = [[w.t().contiguous() for w in ws] for ws in dense_w]
    x = torch.randn(1, d_in, generator=g)
    t40 = threshold_for(x, 0.4)
    x = x.to(dtype)
    variants = {
        "dense": lambda ws, rs: [F.linear(x, w) for w in ws],
        "rows all": lambda ws, rs: kernels.sparse_rows_validated(x, [(r, None, 0.0) for r in rs], 1.0),
        "rows 40% zeroed": lambda ws, rs: kernels.sparse_rows_validated(x, [(r, None, t40) for r in rs], 1.0),
    }
    for fn in variants.values():  # warm up
        fn(dense_w[0], rows_w[0])
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for ws, rs in zip(dense_w, rows_w):
                fn(ws, rs)
            times[name].append((time.perf_counter() - t0) / copies)
    med = {name: statistics.median(v) for name, v in times.items()}
    needed = {"dense": size, "rows all": size, "rows 40% zeroed": size * 0.6}
    return {name: {"us": med[name] * 1e6, "gbps": needed[name] / med[name] / 1e9} for name in variants}


def bench_head(vocab: int, d: int, dtype: torch.dtype, rounds: int) -> str:
    """The dense LM head (natural [vocab, d] layout, often tied to the input embedding): ``F.linear`` against the
    C loops' matrix-vector product (``RowsHead``), alternated, medians."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, d, generator=g).to(dtype)
    x = torch.randn(1, d, generator=g).to(dtype)
    fns = {"F.linear": lambda: F.linear(x, w), "dense_rows": lambda: kernels.dense_rows(x, w, None)}
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    size = w.numel() * w.element_size()
    return (f"| {d}->{vocab} LM head, {str(dtype).replace('torch.', '')} | {med['F.linear'] * 1e3:.2f} ms "
            f"({size / med['F.linear'] / 1e9:.1f} GB/s) | {med['dense_rows'] * 1e3:.2f} ms "
            f"({size / med['dense_rows'] / 1e9:.1f} GB/s) | {med['F.linear'] / med['dense_rows']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-mib", type=int, default=256, help="weight copies rotated per round (MiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="", help="comma-separated subset of the shape names' first word")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.c_loops_active():
        ap.error("the C loops are not built (pip install -e . with a C compiler)")
    warn_if_busy()
    machine = machine_report()
    lines = [describe(machine), "",
             f"1 token, {args.threads} threads, weights rotated over {args.min_mib} MiB, {args.rounds} alternated "
             "rounds, medians; GB/s of weights the call needs", ""]
    wanted = set(args.shapes.split(",")) if args.shapes else None
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        lines += [f"### {dtype_name}", "",
                  "| shape | dense us | dense GB/s | rows all us | rows all GB/s | rows all / dense | 40% zeroed us | "
                  "40% zeroed GB/s | 40% zeroed speedup vs dense |", "|---|---|---|---|---|---|---|---|---|"]
        for name, (d_in, d_outs) in SHAPES.items():
            if wanted and name.split()[0] not in wanted:
                continue
            r = bench_shape(d_in, d_outs, dtype, args.rounds, args.min_mib << 20)
            d, a, z = r["dense"], r["rows all"], r["rows 40% zeroed"]
            line = (f"| {name} | {d['us']:.1f} | {d['gbps']:.1f} | {a['us']:.1f} | {a['gbps']:.1f} | "
                    f"{d['us'] / a['us']:.2f}x | {z['us']:.1f} | {z['gbps']:.1f} | {d['us'] / z['us']:.2f}x |")
            print(line, flush=True)
            lines.append(line)
        lines.append("")
    lines += ["### The dense LM head (SmolLM2's tied 576 x 49152), 1 token", "",
              "| layer | F.linear | C loops (dense_rows, same weights in place) | speedup |", "|---|---|---|---|"]
    for dtype_name in args.dtypes.split(","):
        line = bench_head(49152, 576, getattr(torch, dtype_name), args.rounds)
        print(line, flush=True)
        lines.append(line)
    lines.append("")
    lines.append(f"load average after: {machine_report(bandwidth=False)['load']}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
