"""Sparse MLP before/after a code change, side by side in one process (cold weights, interleaved rounds, medians).

Loads a second copy of hf_stochact from an older checkout under another package name (``--old-root``: a folder
holding ``hf_old/``, a copy of the older ``hf_stochact/`` with its built C extension) and times dense, old sparse
and new sparse decode-step MLPs on the same weights (``hf-stochact bench``'s construction).

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    mkdir -p /tmp/oldpkg && cp -r /tmp/before/hf_stochact /tmp/oldpkg/hf_old
    python examples/bench_sparse_before_after.py --old-root /tmp/oldpkg
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time

import torch

import hf_stochact
from hf_stochact.cli.bench import make_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-root", required=True)
    ap.add_argument("--shapes", default="576x1536,2048x8192")
    ap.add_argument("--sparsities", default="0.5,0.9")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-bytes", type=int, default=160 * 2**20)
    args = ap.parse_args()
    sys.path.insert(0, args.old_root)
    old_sparse = importlib.import_module("hf_old.sparse")
    torch.set_num_threads(2)
    print("| shape | dtype | s | dense ms | old sparse ms | new sparse ms | old speedup | new speedup | new / old |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        d, d_ff = (int(v) for v in shape.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            copies = max(1, -(-args.min_bytes // (3 * d * d_ff * dtype.itemsize)))
            x = torch.randn(1, d, generator=torch.Generator().manual_seed(1)).to(dtype)
            for s in (float(v) for v in args.sparsities.split(",")):
                with torch.inference_mode():
                    base = [make_mlp(d, d_ff, s, x, dtype, seed=i) for i in range(copies)]
                    new = [hf_stochact.sparsify(copy.deepcopy(m), max_tokens=1, max_density=1.0) for m in base]
                    old = [copy.deepcopy(m) for m in base]
                    for m in old:
                        old_sparse.sparsify(m, max_tokens=1, max_density=1.0)
                    for a, b, c in zip(base, old, new):
                        torch.testing.assert_close(b(x), a(x), rtol=2e-2, atol=2e-2)
                        torch.testing.assert_close(c(x), b(x), rtol=0, atol=0)  # the same loops: same bits
                    t = {"dense": [], "old": [], "new": []}
                    for _ in range(args.rounds):
                        for name, mlps in (("dense", base), ("old", old), ("new", new)):
                            start = time.perf_counter()
                            for _ in range(3):
                                for m in mlps:
                                    m(x)
                            t[name].append((time.perf_counter() - start) / 3 / copies * 1e3)
                med = {k: statistics.median(v) for k, v in t.items()}
                print(f"| {shape} | {str(dtype)[6:]} | {s} | {med['dense']:.3f} | {med['old']:.3f} | "
                      f"{med['new']:.3f} | {med['dense'] / med['old']:.2f}x | {med['dense'] / med['new']:.2f}x | "
                      f"{med['new'] / med['old']:.3f} |", flush=True)
                del base, new, old


if __name__ == "__main__":
    main()
