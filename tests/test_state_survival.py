"""Module state that is not a parameter or buffer (thresholds, rotations, relaid weights, native plans) survives
every way users copy, load and save models: the matrix of model states x operations, float32 and bfloat16."""

import copy
import io

import pytest
import torch
import transformers as tf
from helpers import tiny_llama

import hf_stochact  # noqa: F401  (save_pretrained writes the rotations)
from hf_stochact import calibrate_thresholds, fast_decode, sparsify
from hf_stochact.runtime import native

STATES = ["dense", "thresholds", "rotated", "exact-relu", "fast_decode"]
OPERATIONS = ["load_state_dict", "deepcopy", "torch.save", "save_pretrained", "to-other-dtype"]


def calib(n=4, t=32, seed=0):
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def build(state, dtype):
    model = tiny_llama("relu" if state == "exact-relu" else "silu").to(dtype).eval()
    if state in ("thresholds", "rotated"):
        calibrate_thresholds(model, calib(), 0.4, allocation="uniform", rotate="pca" if state == "rotated" else "none")
        sparsify(model)
    elif state == "exact-relu":
        sparsify(model)
    elif state == "fast_decode":
        fast_decode(model)
    return model


def outputs(model):
    ids = calib(1, 6, seed=3)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return logits, tokens


def operate(model, operation, state, dtype, tmp_path):
    if operation == "load_state_dict":
        model.load_state_dict(model.state_dict())
        return model
    if operation == "deepcopy":
        return copy.deepcopy(model)
    if operation == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        return fast_decode(loaded) if state == "fast_decode" else loaded  # pickles as the original class
    if operation == "save_pretrained":
        model.save_pretrained(tmp_path)
        loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
        if state in ("thresholds", "rotated", "exact-relu"):
            sparsify(loaded)  # thresholds from the config, rotations from the folder
        elif state == "fast_decode":
            fast_decode(loaded)
        return loaded
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    return model.to(other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("state", STATES)
def test_model_state_survives(state, operation, dtype, tmp_path):
    model = build(state, dtype)
    logits, tokens = outputs(model)
    other = operate(model, operation, state, dtype, tmp_path)
    got_logits, got_tokens = outputs(other)
    if operation == "to-other-dtype":
        error = (got_logits - logits).norm() / logits.norm()
        # one rounding of every weight to (or from) bfloat16; with thresholds, inputs near a threshold also switch
        assert error < (0.1 if state in ("thresholds", "rotated") else 0.05), error
    else:
        torch.testing.assert_close(got_logits, logits, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-4)
        if dtype == torch.float32:
            assert torch.equal(got_tokens, tokens)
    if state == "fast_decode" and operation != "to-other-dtype":
        assert native.runner_of(other) is not None and native.runner_of(other).counts["native"] > 0
