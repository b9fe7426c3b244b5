"""hf_stochact.make_serializable: a model loaded from a (float32) GGUF file saves and reloads like any other."""

import json

import pytest
import torch
from helpers import write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_stochact


def test_gguf_model_saves_after_make_serializable(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):  # what the helper is for
        model.save_pretrained(tmp_path / "refused")
    assert hf_stochact.make_serializable(model) is model
    assert not model.is_quantized and model.hf_quantizer is None
    model.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert hf_stochact.make_serializable(reloaded) is reloaded  # no marker: unchanged


def test_other_quantization_methods_are_refused(tmp_path):
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=64))
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="bitsandbytes"):
        hf_stochact.make_serializable(model)
