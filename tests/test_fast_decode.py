"""fast_decode: static cache + compiled decode step through transformers' CompileConfig, on the CPU, with sparsify
and stochastic decoding: same tokens as eager, no graph breaks, undoable."""

import pytest
import torch
import torch._dynamo
from helpers import tiny_llama
from torch import nn

import hf_stochact
from hf_stochact import calibrate_thresholds, fast_decode, sparsify
from hf_stochact.runtime.fast import is_fast


@pytest.mark.slow
def test_fast_decode_of_a_sparsified_model_equals_eager_with_no_graph_breaks():
    model = tiny_llama("relu").eval()  # exact ReLU FFNs + thresholds on attention
    calibrate_thresholds(model, torch.randint(3, 97, (4, 32)), 0.4, allocation="uniform")
    sparsify(model, max_density=1.0)
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    eager = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert fast_decode(model, native=False) is model and is_fast(model)  # the compiled path (native: its own tests)
    assert model.generation_config.cache_implementation == "static"
    fast = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast, eager)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    # stochastic decoding in the fast mode: reproducible under a seed, and it does change the tokens
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                    stochastic_activation=True, stochastic_p=0.5))
    assert torch.equal(draws[0], draws[1])
    fast_decode(model, enable=False)
    assert not is_fast(model) and model.generation_config.cache_implementation is None


def test_fast_decode_needs_a_generative_model():
    with pytest.raises(ValueError, match="fast_decode needs a generative transformers model"):
        fast_decode(nn.Linear(2, 2))
    assert hf_stochact.fast_decode is fast_decode
