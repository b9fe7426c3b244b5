"""Which decode path `fast_decode` takes per model family, and its speed against the model's own (eager) forward.

Random-weight models of each family at two sizes: tiny (the test configs) and SmolLM2-135M-sized (d=576, 30 layers,
9 heads / 3 KV heads, d_ff=1536, vocab 49152), in the layouts of Llama, Mistral (default config: sliding window
4096), Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 (fused projections). Eager and fast_decode copies are timed
alternately (A B A B), greedy, decode tokens/s with the prefill taken out ((n - 1) / (time of n tokens - time of 1
token)), medians.

    python examples/decode_families.py --rounds 3 --new-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers as tf

import hf_stochact
from hf_stochact.analysis.machine import describe, machine_report

FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, {}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, {"head_dim": 64}),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, {"head_dim": 64}),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, {"head_dim": 64}),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "SmolLM2-sized": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152),
}


def rate(model, ids, n) -> float:
    def run(k):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    return (n - 1) / (run(n) - run(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="tiny,SmolLM2-sized")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(describe(machine_report()))
    print()
    print("| family | size | path | eager tok/s | fast_decode tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for name, (cls, config_cls, extra) in FAMILIES.items():
            torch.manual_seed(0)
            config = config_cls(**{**SIZES[size], **extra})
            if size != "tiny" and "head_dim" in extra:
                config.head_dim = 64
            eager = cls(config).eval()
            fast = hf_stochact.fast_decode(copy.deepcopy(eager))
            ids = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
            rates = {"eager": [], "fast": []}
            rate(eager, ids, 4), rate(fast, ids, 4)  # warm-up
            for _ in range(args.rounds):
                rates["eager"].append(rate(eager, ids, args.new_tokens))
                rates["fast"].append(rate(fast, ids, args.new_tokens))
            e, f = statistics.median(rates["eager"]), statistics.median(rates["fast"])
            path = hf_stochact.decode_path(fast).split(";")[0]
            print(f"| {name} | {size} | {path} | {e:.1f} | {f:.1f} | {f / e:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
