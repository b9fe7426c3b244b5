"""`hf-stochact bench`: dense vs sparse FFN speed on this CPU, side by side in one process (medians).

* Microbenchmark: a Llama-style gated MLP of each shape ``d x d_ff`` whose gate is arranged so that exactly a
  fraction ``s`` of neurons is zero for the input (rows of a Gaussian W_gate sign-flipped), copies rotated so the
  weights come from memory rather than cache (>= ``min_bytes`` in all), dense and sparsified forward alternated.
* A saved model (``--model``): greedy decode tokens/s with and without :func:`~hf_stochact.sparsify`.

Speed is reported only as ratios measured side by side; the ideal for a dense gate is 1 / (1/3 + 2/3 (1 - s)):
the ratio of bytes read *if both sides stream weights at the same bandwidth*. A ratio above the ideal means they do
not: the dense baseline (torch's matmul, a matrix-vector product for one token) reaches a lower bandwidth than the
sparse loops. The table shows each side's achieved bandwidth (weight bytes read / time) to make that visible.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch
from torch import nn

from ..analysis.machine import warn_if_busy
from ..inference.sparse import sparsify, unsparsify
from .args import (
    UsageError,
    at_least,
    comma_list,
    in_range,
    non_negative,
    one_of,
    option,
    output_file,
    probability,
    shape_list,
    validate,
)
from .loading import load_causal_lm, resolve_model


@dataclasses.dataclass
class BenchConfig:
    shapes: str = option("576x1536,2048x8192,4096x14336", "microbenchmark MLP shapes d x d_ff, comma-separated",
                         check=shape_list)
    sparsities: str = option("0.5,0.8,0.9,0.95,0.99", "fractions of zero neurons, comma-separated",
                             check=comma_list(probability))
    dtypes: str = option("float32,bfloat16", "weight dtypes, comma-separated",
                         check=comma_list(one_of("float32", "bfloat16"), str))
    tokens: int = option(1, "tokens per call (1 = a decode step)", check=in_range(1, 16))
    rounds: int = option(9, "dense/sparse alternations; medians are reported", check=at_least(1))
    threads: int = option(2, "torch threads", check=at_least(1))
    min_bytes: int = option(160 * 2**20, "rotate over copies of the weights totalling at least this many bytes, "
                                         "so they come from memory, not cache", check=non_negative)
    model: str = option("", "benchmark decode tokens/s of this model folder (or --gguf) instead of MLPs")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    new_tokens: int = option(64, "tokens decoded per timed generate call (with --model)", check=at_least(1))
    out: str = option("", "also write the table (markdown) to this file (in an existing folder)",
                      check=output_file(create_folder=False))
    compare: bool = option(False, "with --model/--gguf: one table of decode tok/s and held-out perplexity for HF "
                                  "eager and the native decode step (fast_decode), dense and with input thresholds at "
                                  "--compare-sparsities, "
                                  "float32 and bfloat16, a --relu-model, and llama.cpp on F32/F16 GGUFs written "
                                  "from the same weights (needs llama-cpp-python and --gguf)")
    compare_sparsities: str = option("0.25,0.4,0.5", "input sparsities of the --compare threshold points",
                                     check=comma_list(probability))
    allocation: str = option("block", "threshold allocation of the --compare points (uniform, greedy, block)",
                             check=one_of("uniform", "greedy", "block"))
    relu_model: str = option("", "a relufied model folder to add to --compare (exact zeros, sparsified)")
    llama_cpp: bool = option(True, "include llama.cpp rows in --compare (needs llama-cpp-python and --gguf)")
    gguf_dir: str = option("", "where --compare writes the F32/F16 GGUFs (default: a temporary folder)")
    fast: bool = option(True, "include the native decode step rows (fast_decode) in --compare")
    bf16: bool = option(True, "include bfloat16 rows in --compare")
    eager_sparse: bool = option(False, "also time HF eager rows of the threshold points in --compare")

    def check(self) -> None:
        resolve_model(self.model, self.gguf, required=False)
        if self.out and (self.model or self.gguf) and not self.compare:
            raise UsageError("--out", "writes the microbenchmark or --compare table; --model/--gguf alone prints a "
                                      "two-line result: leave out --out, or add --compare")
        if self.compare and not (self.model or self.gguf):
            raise UsageError("--compare", "needs a model: --model FOLDER or --gguf FILE")
        if self.relu_model:
            resolve_model(self.relu_model, "", model_flag="--relu-model")


def ideal(s: float) -> float:
    return 1.0 / (1.0 / 3.0 + 2.0 / 3.0 * (1.0 - s))


class GatedMLP(nn.Module):
    """LlamaMLP's computation with ReLU: down(relu(gate(x)) * up(x))."""

    def __init__(self, d: int, d_ff: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, d_ff, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(d_ff, d, bias=False, dtype=dtype)
        self.act_fn = nn.ReLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(d: int, d_ff: int, s: float, x: torch.Tensor, dtype: torch.dtype, seed: int) -> GatedMLP:
    """A gated MLP whose gate is positive for exactly round((1 - s) d_ff) neurons on every token of ``x``."""
    g = torch.Generator().manual_seed(seed)
    mlp = GatedMLP(d, d_ff, dtype)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
        active = torch.randperm(d_ff, generator=g)[: round((1 - s) * d_ff)]
        sign = -torch.ones(d_ff)
        sign[active] = 1.0
        # flip rows so that the gate's sign on the (mean) input is `sign`: exact for one token; for several tokens
        # the union of active neurons is what the benchmark reports as 1 - s
        pre = mlp.gate_proj.weight.float() @ x.float().mean(0)
        mlp.gate_proj.weight.mul_((sign * torch.sign(pre)).to(dtype)[:, None])
    return mlp


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def microbench(cfg: BenchConfig, progress=print) -> list[dict]:
    torch.set_num_threads(cfg.threads)
    rows = []
    for shape in cfg.shapes.split(","):
        d, d_ff = (int(v) for v in shape.lower().split("x"))
        for dtype_name in cfg.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            bytes_per_mlp = 3 * d * d_ff * torch.tensor([], dtype=dtype).element_size()
            copies = max(1, -(-cfg.min_bytes // bytes_per_mlp))
            x = torch.randn(cfg.tokens, d, generator=torch.Generator().manual_seed(1)).to(dtype)
            for s_text in cfg.sparsities.split(","):
                s = float(s_text)
                mlps = [make_mlp(d, d_ff, s, x, dtype, seed=i) for i in range(copies)]
                measured_s = float((mlps[0].act_fn(mlps[0].gate_proj(x)) == 0).all(0).float().mean())
                dense_ref = [m(x) for m in mlps]
                # the sparse side gets its own copies (sparsify stores W_down transposed; dense keeps the stock layout)
                sparse = [sparsify(copy.deepcopy(m), max_tokens=max(cfg.tokens, 1), max_density=1.0) for m in mlps]
                err = max(float((m(x) - r).abs().max() / r.abs().max()) for m, r in zip(sparse, dense_ref))
                calls = {"dense": mlps, "sparse": sparse}
                t = {"dense": [], "sparse": []}
                for _ in range(cfg.rounds):
                    for name, fns in calls.items():
                        t[name].append(_time(lambda fns=fns, x=x: [f(x) for f in fns], 3) / copies)
                dense_ms, sparse_ms = statistics.median(t["dense"]) * 1e3, statistics.median(t["sparse"]) * 1e3
                sparse_bytes = bytes_per_mlp * (1 / 3 + 2 / 3 * (1 - measured_s))  # gate + active rows of up/down
                row = {"shape": shape, "dtype": dtype_name, "tokens": cfg.tokens, "s": s, "measured_s": measured_s,
                       "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                       "ideal": ideal(measured_s), "max_rel_err": err, "copies": copies,
                       "dense_gbs": bytes_per_mlp / dense_ms / 1e6, "sparse_gbs": sparse_bytes / sparse_ms / 1e6}
                rows.append(row)
                progress(f"{shape:>11} {dtype_name:>8} s={measured_s:.2f}: dense {dense_ms:7.3f} ms "
                         f"({row['dense_gbs']:.1f} GB/s), sparse {sparse_ms:7.3f} ms ({row['sparse_gbs']:.1f} GB/s), "
                         f"{row['speedup']:.2f}x (ideal {row['ideal']:.2f}x at equal bandwidth), rel.err {err:.1e}")
                del mlps, sparse
    return rows


@torch.inference_mode()
def model_bench(cfg: BenchConfig, progress=print) -> dict:
    """Greedy decode tokens/s of a saved model, dense vs sparsified, alternated."""

    torch.set_num_threads(cfg.threads)
    tok, model = load_causal_lm(cfg.model, cfg.gguf, command="bench --model")
    model.eval()
    try:
        sparsify(model)  # nothing to skip (no ReLU FFN): say so before timing anything
    except ValueError as error:
        raise UsageError("--gguf" if cfg.gguf else "--model", str(error)) from error
    unsparsify(model)
    ids = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", return_tensors="pt").input_ids
    gen = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id or tok.eos_token_id)
    dense_out = model.generate(ids, **gen)
    sparsify(model)
    sparse_out = model.generate(ids, **gen)
    times = {"dense": [], "sparse": []}
    for _ in range(cfg.rounds):
        for name in ("dense", "sparse"):
            (unsparsify if name == "dense" else sparsify)(model)
            t0 = time.perf_counter()
            model.generate(ids, **gen)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": cfg.model, "gguf": cfg.gguf, "new_tokens": cfg.new_tokens,
              "dense_tok_s": cfg.new_tokens / med["dense"], "sparse_tok_s": cfg.new_tokens / med["sparse"],
              "speedup": med["dense"] / med["sparse"], "identical_tokens": bool(torch.equal(dense_out, sparse_out))}
    progress(f"decode: dense {result['dense_tok_s']:.1f} tok/s, sparse {result['sparse_tok_s']:.1f} tok/s, "
             f"{result['speedup']:.2f}x, identical greedy output: {result['identical_tokens']}")
    return result


def markdown(rows: list[dict], cfg: BenchConfig) -> str:
    lines = [
        f"Gated ReLU MLP, {cfg.tokens} token(s) per call, {cfg.threads} threads, torch {torch.__version__}; weights "
        f"rotated over >= {cfg.min_bytes >> 20} MiB of copies; dense and sparse alternated, {cfg.rounds} rounds, "
        "medians. ideal = 1 / (1/3 + 2/3 (1 - s)), the ratio of weight bytes read, i.e. the speedup if both sides "
        "streamed weights at the same bandwidth; a speedup above it means the dense baseline streams slower than "
        "the sparse loops (GB/s columns: weight bytes read / time).",
        "",
        "| shape d x d_ff | dtype | s | dense ms | dense GB/s | sparse ms | sparse GB/s | speedup | ideal | "
        "max rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['measured_s']:.2f} | {r['dense_ms']:.3f} | "
                     f"{r['dense_gbs']:.3g} | {r['sparse_ms']:.3f} | {r['sparse_gbs']:.3g} | **{r['speedup']:.2f}x** | "
                     f"{r['ideal']:.2f}x | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict:
    validate(cfg)
    warn_if_busy()
    result: dict = {}
    if cfg.compare:
        from ..analysis.decode_bench import CompareSettings, compare

        settings = CompareSettings(sparsities=tuple(float(v) for v in cfg.compare_sparsities.split(",") if v),
                                   allocation=cfg.allocation, relu_model=cfg.relu_model, new_tokens=cfg.new_tokens,
                                   rounds=cfg.rounds, threads=cfg.threads, llama_cpp=cfg.llama_cpp,
                                   fast=cfg.fast, eager_sparse=cfg.eager_sparse, bf16=cfg.bf16, workdir=cfg.gguf_dir)
        result["compare"] = compare(cfg.model, cfg.gguf, settings)
        print("\n" + result["compare"]["markdown"])
        if cfg.out:
            with open(cfg.out, "w") as f:
                f.write(result["compare"]["markdown"] + "\n")
    elif cfg.model or cfg.gguf:
        result["model"] = model_bench(cfg)
    else:
        rows = microbench(cfg)
        result["micro"] = rows
        text = markdown(rows, cfg)
        print("\n" + text)
        if cfg.out:
            with open(cfg.out, "w") as f:
                f.write(text + "\n")
    return result
