"""Decode speed of one model in every way a CPU user would run it, side by side in one process: HF transformers
eager, the native decode step (:func:`~hf_stochact.fast_decode`) dense ("dense rows": what the kernels give with no
sparsity) and with hf_stochact's sparse points, float32 and bfloat16, and llama.cpp (``llama-cpp-python``) on F32
and F16 GGUFs written from the same weights — each with its held-out perplexity, so a speed is never quoted without
its quality, and with its bandwidth floor: the weight bytes a token must read over the measured read rate.

Timing: greedy decoding of ``new_tokens`` tokens after a fixed prompt; decode tokens/s = (new_tokens - 1) / (time
of a ``new_tokens`` call - time of a 1-token call), both timed in every round, so the prompt's prefill is left
out for every engine alike. Variants are alternated round by round (A B C ... A B C ...), medians reported, the
machine's CPU, flags, load and read bandwidth recorded with the table.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "def quicksort(arr):\n"


@dataclasses.dataclass
class Variant:
    """One way of decoding: ``decode(prompt_ids, n)`` -> the n greedy token ids (a list)."""

    label: str
    engine: str
    dtype: str
    decode: Callable[[list[int], int], list[int]]
    ppl: float | None = None
    note: str = ""
    times: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    tokens: list[int] = dataclasses.field(default_factory=list)
    bytes_per_token: float = float("nan")  # weight bytes a decode step must read


def weight_bytes(model, skipped: float = 0.0, thresholded: set[str] | None = None,
                 dtype_bytes: float | None = None) -> float:
    """Bytes of linear-layer weights a decode token reads: every ``nn.Linear`` (the LM head included, once even when
    tied), the layers in ``thresholded`` (module paths) scaled by ``1 - skipped``; ``dtype_bytes`` overrides the
    element size (a GGUF engine's F16 copy of float32 weights)."""
    from torch import nn

    from ..layouts import param

    total, seen = 0.0, set()
    for path, module in model.named_modules():
        inner = getattr(module, "original", module)
        if not isinstance(inner, nn.Linear):
            continue
        w = param(inner, "weight")
        if id(w) in seen:
            continue
        seen.add(id(w))
        size = w.numel() * (dtype_bytes or w.element_size())
        total += size * (1.0 - skipped) if thresholded and path in thresholded else size
    return total


def hf_decoder(model, pad_id: int) -> Callable[[list[int], int], list[int]]:
    @torch.no_grad()
    def decode(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)
        return out[0, len(prompt):].tolist()

    return decode


def llama_cpp_decoder(path: Path, threads: int, n_ctx: int) -> Callable[[list[int], int], list[int]]:
    """Greedy decoding with llama.cpp through llama-cpp-python's low-level ``eval`` (argmax of each step's
    logits: the same rule as HF greedy)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                verbose=False)

    vocab = llm.n_vocab()

    def last_logits():  # the logits of the last token evaluated (llama-cpp-python keeps no copy without logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def decode(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(n):
            token = int(np.argmax(last_logits()))
            out.append(token)
            if len(out) < n:
                llm.eval([token])
        return out

    return decode


def write_float_gguf(source: Path, target: Path, dtype: str) -> Path:
    """``source`` (any GGUF, e.g. Q4_1) with every tensor dequantized and stored as F32 (``dtype="f32"``) or F16
    (2-D tensors; 1-D norms stay F32, as llama.cpp's converter does), metadata copied, ``general.file_type`` set:
    exactly the weights transformers loads from ``source`` (it dequantizes on load)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    file_type = 0 if dtype == "f32" else 1
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(file_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(v) for v in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        values = values.reshape(shape)
        if dtype == "f16" and values.ndim >= 2:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def time_variants(variants: list[Variant], prompt: list[int], new_tokens: int, rounds: int,
                  progress: Callable[[str], None] = print,
                  every_round: Callable[[], None] | None = None) -> None:
    """Warm every variant up, then alternate them ``rounds`` times, timing an n-token and a 1-token call each;
    ``every_round`` runs once per round (e.g. a read-bandwidth probe, interleaved like the variants)."""
    for v in variants:
        progress(f"warm-up: {v.label}")
        v.tokens = v.decode(prompt, new_tokens)
        v.decode(prompt, 1)
    for r in range(rounds):
        if every_round is not None:
            every_round()
        for v in variants:
            for n in (new_tokens, 1):
                t0 = time.perf_counter()
                v.decode(prompt, n)
                v.times.setdefault(n, []).append(time.perf_counter() - t0)
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{v.label} {decode_rate(v, new_tokens):.1f}"
                                                          for v in variants))


def decode_rate(v: Variant, new_tokens: int) -> float:
    """Decode tokens/s (prefill excluded): (n - 1) / (median time of n tokens - median time of 1 token)."""
    full, one = statistics.median(v.times[new_tokens]), statistics.median(v.times[1])
    return (new_tokens - 1) / (full - one) if full > one else float("nan")  # nan: too noisy to tell


def markdown(variants: list[Variant], new_tokens: int, reference: str, machine_line: str,
             read_gbps: float | None = None) -> str:
    base = next(v for v in variants if v.label == reference)
    base_rate = decode_rate(base, new_tokens)
    fastest_llama = {v.dtype: decode_rate(v, new_tokens) for v in variants if v.engine == "llama.cpp"}
    lines = [machine_line, "",
             "| variant | engine | dtype | decode tok/s | vs HF eager dense fp32 | vs llama.cpp same dtype | "
             "MB/token | floor tok/s | % of floor | held-out ppl | greedy tokens = dense | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense_tokens = {v.dtype: v.tokens for v in variants if v.label.startswith("HF eager dense")}
    for v in variants:
        rate = decode_rate(v, new_tokens)
        llama = fastest_llama.get(v.dtype if v.dtype != "bf16" else "f16")
        same = dense_tokens.get(v.dtype, base.tokens)
        agree = sum(a == b for a, b in zip(v.tokens, same))
        floor = read_gbps * 1e9 / v.bytes_per_token if read_gbps and v.bytes_per_token > 0 else float("nan")
        lines.append(f"| {v.label} | {v.engine} | {v.dtype} | {rate:.1f} | {rate / base_rate:.2f}x | "
                     f"{'' if llama is None else f'{rate / llama:.2f}x'} | "
                     f"{'' if math.isnan(v.bytes_per_token) else f'{v.bytes_per_token / 1e6:.0f}'} | "
                     f"{'' if math.isnan(floor) else f'{floor:.0f}'} | "
                     f"{'' if math.isnan(floor) else f'{rate / floor:.0%}'} | "
                     f"{'' if v.ppl is None or math.isnan(v.ppl) else f'{v.ppl:.3f}'} | "
                     f"{agree}/{len(same)} | {v.note} |")
    return "\n".join(lines)


def _native_note(model, note: str) -> str:
    from ..runtime.fast import decode_path

    path = decode_path(model)
    return note if path.startswith("native decode step") else f"{note}; NOT native: {path}".lstrip("; ")


def thresholded_copy(model, calib: torch.Tensor, sparsity: float, allocation: str):
    """A copy of ``model`` with input thresholds at ``sparsity`` (calibrated on ``calib``), sparsified."""
    from ..inference.sparse import sparsify
    from ..inference.thresholds import calibrate_thresholds

    m = copy.deepcopy(model)
    th = calibrate_thresholds(m, calib, sparsity, allocation=allocation, max_tokens=256)
    sparsify(m)
    return m, th


@dataclasses.dataclass
class CompareSettings:
    sparsities: tuple[float, ...] = (0.25, 0.4, 0.5)
    allocation: str = "block"
    relu_model: str = ""
    new_tokens: int = 48
    rounds: int = 5
    threads: int = 2
    llama_cpp: bool = True
    fast: bool = True
    eager_sparse: bool = False
    bf16: bool = True
    eval_chars: int = 20_000
    workdir: str = ""


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def compare(model_dir: str, gguf: str, settings: CompareSettings, progress: Callable[[str], None] = print) -> dict:
    """Build every variant of the model (see the module docstring), measure held-out perplexity and decode speed
    side by side, and return ``{"markdown": table, "rows": [...], "machine": {...}}``."""
    import tempfile

    from .. import data
    from ..cli.loading import load_causal_lm
    from ..inference.sparse import sparsify
    from ..runtime.fast import fast_decode
    from .machine import describe, machine_report, read_bandwidth, warn_if_busy
    from .metrics import perplexity

    torch.set_num_threads(settings.threads)
    warn_if_busy()
    machine = machine_report()
    tok, model = load_causal_lm(model_dir, gguf, command="bench --compare")
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    text = (data.stdlib_root() / "argparse.py").read_text(encoding="utf-8")[: settings.eval_chars]
    windows = data.windows(tok, text, 512, what=f"{settings.eval_chars} characters of argparse.py")
    calib = data.calibration_windows(tok)
    prompt = tok(PROMPT).input_ids

    def ppl(m) -> float:
        with torch.no_grad():
            return perplexity(m, windows, progress=False)[0]

    variants: list[Variant] = []

    def dense_rows(m, dtype: str, p: float) -> None:
        """HF eager and (with settings.fast) the native step on the dense model ``m``."""
        nbytes = weight_bytes(m)
        variants.append(Variant(f"HF eager dense {dtype}", "HF", dtype, hf_decoder(m, pad), p, bytes_per_token=nbytes))
        if settings.fast:
            native = fast_decode(copy.deepcopy(m))
            variants.append(Variant(f"native step dense {dtype}", "hf_stochact", dtype, hf_decoder(native, pad), p,
                                    _native_note(native, "dense rows: no sparsity"), bytes_per_token=nbytes))

    dense_ppl = ppl(model)
    progress(f"dense fp32: held-out perplexity {dense_ppl:.3f}")
    dense_rows(model, "fp32", dense_ppl)
    first = None
    for s in settings.sparsities:
        m, th = thresholded_copy(model, calib, s, settings.allocation)
        p = ppl(m)
        skipped = th.weighted_sparsity(m)
        nbytes = weight_bytes(m, skipped, set(th.layer_sparsity))
        note = f"input sparsity {skipped:.0%} (calibrated, {settings.allocation})"
        progress(f"thresholds {s:.0%}: perplexity {p:.3f} ({p / dense_ppl - 1:+.1%})")
        if settings.eager_sparse or not settings.fast:
            variants.append(Variant(f"HF eager + thresholds {s:.0%}", "HF+hf_stochact", "fp32", hf_decoder(m, pad),
                                    p, note, bytes_per_token=nbytes))
        if settings.fast:
            native = fast_decode(copy.deepcopy(m))
            variants.append(Variant(f"native step + thresholds {s:.0%}", "hf_stochact", "fp32",
                                    hf_decoder(native, pad), p, _native_note(native, note), bytes_per_token=nbytes))
        if first is None:
            first = (s, th, p, skipped)
    if settings.bf16:
        dense16 = copy.deepcopy(model).to(torch.bfloat16)
        dense_rows(dense16, "bf16", ppl(dense16))
        if first is not None:
            s, th, _, skipped = first
            m16 = copy.deepcopy(model).to(torch.bfloat16)
            sparsify(m16, thresholds=th)
            if settings.fast:
                fast_decode(m16)
            variants.append(Variant(f"{'native step' if settings.fast else 'HF eager'} + thresholds {s:.0%} bf16",
                                    "hf_stochact" if settings.fast else "HF+hf_stochact", "bf16",
                                    hf_decoder(m16, pad), ppl(m16), _native_note(m16, "") if settings.fast else "",
                                    bytes_per_token=weight_bytes(m16, skipped, set(th.layer_sparsity))))
    if settings.relu_model:
        _, relu = load_causal_lm(settings.relu_model, "", command="bench --compare", model_flag="--relu-model")
        relu.eval()
        p = ppl(relu)
        sparsify(relu)
        variants.append(Variant("HF eager relufied + sparsify", "HF+hf_stochact", "fp32", hf_decoder(relu, pad), p,
                                f"exact zeros; {settings.relu_model}"))
    if settings.llama_cpp:
        source = Path(model_dir) / gguf if gguf and model_dir and not Path(gguf).is_absolute() else Path(gguf or "")
        if not gguf:
            progress("llama.cpp rows skipped: they need the model as a GGUF file (--gguf)")
        elif not llama_cpp_available():
            progress("llama.cpp rows skipped: pip install llama-cpp-python (CMAKE_ARGS=-DGGML_NATIVE=ON builds it "
                     "for this CPU)")
        else:
            work = Path(settings.workdir or tempfile.mkdtemp(prefix="hf_stochact_gguf_"))
            work.mkdir(parents=True, exist_ok=True)
            for dtype, label in (("f32", "fp32"), ("f16", "f16")):
                target = work / f"{source.stem}.{dtype.upper()}.gguf"
                if not target.exists():
                    progress(f"writing {target}")
                    write_float_gguf(source, target, dtype)
                try:
                    decode = llama_cpp_decoder(target, settings.threads,
                                               n_ctx=len(prompt) + settings.new_tokens + 8)
                except ValueError as error:  # llama.cpp refuses the file (e.g. a tokenizer it cannot read)
                    progress(f"llama.cpp {dtype.upper()} row skipped: {error}")
                    continue
                variants.append(Variant(f"llama.cpp {dtype.upper()}", "llama.cpp", label, decode,
                                        dense_ppl if dtype == "f32" else float("nan"),
                                        "the same weights (dequantized GGUF); ppl = HF dense fp32" if dtype == "f32"
                                        else "the same weights in F16",
                                        bytes_per_token=weight_bytes(model, dtype_bytes=4 if dtype == "f32" else 2)))
    reads: list[float] = []
    time_variants(variants, prompt, settings.new_tokens, settings.rounds, progress,
                  lambda: reads.append(read_bandwidth(repeats=3)))
    machine["read_gbps_rounds"] = [round(r, 1) for r in reads]
    machine["read_gbps"] = round(statistics.median(reads), 1)
    after = machine_report(bandwidth=False)
    line = describe(machine) + (f" (median of one probe per round, {min(reads):.1f}-{max(reads):.1f}; the floor "
                                f"column divides it by the MB a token reads); load average after {after['load']}")
    header = (f"SmolLM2-class decode, {settings.threads} threads, greedy, prompt {PROMPT!r}, {settings.new_tokens} new "
              f"tokens, decode tok/s excluding prefill, {settings.rounds} alternated rounds, medians; held-out "
              f"perplexity on the first {settings.eval_chars} characters of argparse.py (512-token windows).")
    table = markdown(variants, settings.new_tokens, "HF eager dense fp32", line, machine.get("read_gbps"))
    rows = [{"label": v.label, "engine": v.engine, "dtype": v.dtype, "tok_s": decode_rate(v, settings.new_tokens),
             "ppl": v.ppl, "note": v.note, "tokens": v.tokens, "bytes_per_token": v.bytes_per_token}
            for v in variants]
    return {"markdown": header + "\n\n" + table, "rows": rows, "machine": machine}
