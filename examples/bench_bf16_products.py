"""Why bf16 prefill of a sparse model runs float32 products on CPUs without native bf16 (docs/frontier.md).

One layer's product (a SmolLM2 down projection, 576 x 1536) for a prefill-sized input, in the ways torch can compute
it, side by side in one process (rounds alternated, medians), 1 thread:

    ../shared/tools/quiet python examples/bench_bf16_products.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
torch.manual_seed(0)
print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16: "
      f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
for tokens in (19, 128):
    h = torch.relu(torch.randn(tokens, 1536)).bfloat16()
    w = torch.randn(576, 1536).bfloat16()
    w_t = w.t().contiguous()  # the rows layout sparsify stores (nn.Linear sees w_t.t())
    ways = {
        "bf16, original layout": lambda h=h, w=w: F.linear(h, w),
        "bf16, rows-layout view": lambda h=h, w_t=w_t: F.linear(h, w_t.t()),
        "float32 of the upcast operands": lambda h=h, w_t=w_t: (h.float() @ w_t.float()).bfloat16(),
    }
    times = {name: [] for name in ways}
    for _ in range(7):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float32 of the upcast operands"])
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"{tokens:4d} tokens  {name:32s} {ms:8.2f} ms  {ms / 1e3 / base:6.1f}x")
