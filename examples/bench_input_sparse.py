"""Input-sparse linear layers vs the dense product, per layer shape and input density (one decode token).

For each shape (d_in x d_out) and density: the dense ``F.linear`` on the masked input (MKL, the weight contiguous
[d_out, d_in] as an unsparsified ``nn.Linear`` holds it) against
``hf_stochact::sparse_down`` with a threshold (reads only the weight rows of surviving inputs, weight stored once in
rows layout), alternated in one process, medians over rounds of rotated weight copies (so the weights come from
memory, as in a decode step). Prints a markdown table and the break-even density per shape: the ``max_density`` a
thresholded layer of that shape should use.

    ../shared/tools/quiet python examples/bench_input_sparse.py --out docs/input_sparse_bench.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_stochact import kernels
from hf_stochact.kernels.reference import magnitude_mask


def run(shapes, densities, dtype, rounds, min_bytes, threads):
    torch.set_num_threads(threads)
    rows = []
    for d_in, d_out in shapes:
        copies = max(1, min_bytes // (d_in * d_out * (4 if dtype == torch.float32 else 2)))
        g = torch.Generator().manual_seed(0)
        w = [torch.randn(d_out, d_in, generator=g).to(dtype) for _ in range(copies)]
        w_t = [x.t().contiguous() for x in w]  # the loops' layout (sparsify stores it once; Linear sees .t())
        x = torch.randn(1, d_in, generator=g)
        for density in densities:
            t = float(x.abs().flatten().kthvalue(max(1, int(round((1 - density) * d_in)))).values) \
                if density < 1 else 0.0
            xd = x.to(dtype)
            times = {"dense": [], "sparse": []}
            for _ in range(rounds):
                t0 = time.perf_counter()
                for wi in w:  # an unsparsified nn.Linear: contiguous [d_out, d_in]
                    F.linear(magnitude_mask(xd, t), wi)
                times["dense"].append((time.perf_counter() - t0) / len(w))
                t0 = time.perf_counter()
                for wi in w_t:
                    kernels.sparse_down(xd, wi, None, 1.0, t)
                times["sparse"].append((time.perf_counter() - t0) / len(w))
            dense, sparse = (statistics.median(v) * 1e6 for v in (times["dense"], times["sparse"]))
            rows.append({"shape": f"{d_in}x{d_out}", "density": density, "dense_us": dense, "sparse_us": sparse,
                         "speedup": dense / sparse})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x576,576x192,576x1536,1536x576")
    ap.add_argument("--densities", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-mib", type=int, default=256, help="weight copies rotated per round (MiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    densities = [float(v) for v in args.densities.split(",")]
    rows = run(shapes, densities, getattr(torch, args.dtype), args.rounds, args.min_mib << 20, args.threads)
    lines = [f"{args.dtype}, 1 token, {args.threads} threads, weights rotated over {args.min_mib} MiB, "
             f"{args.rounds} rounds, medians (dense = F.linear on the masked input; sparse = sparse_down with the "
             "threshold)", "", "| shape | density | dense us | sparse us | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['density']:.1f} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    lines += ["", "break-even density per shape (highest density where sparse is not slower):"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = [r["density"] for r in rows if r["shape"] == shape and r["speedup"] >= 1.0]
        lines.append(f"- {shape}: {max(ok) if ok else 'none'}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
