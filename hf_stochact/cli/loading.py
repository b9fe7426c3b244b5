"""Loading a causal LM and its tokenizer from a local folder or a GGUF file (no hub access needed)."""

from __future__ import annotations

import torch


def load_causal_lm(model: str, gguf: str = "", command: str = "this command"):
    """(tokenizer, float32 model) from the folder ``model``, or from the GGUF file ``gguf`` inside it.

    GGUF weights are dequantized to plain float32 ``nn.Linear`` parameters on load, but transformers keeps the GGUF
    quantizer marker on the model, which makes ``Trainer`` refuse to fine-tune it; the marker is cleared.

    Raises:
        ValueError: if ``model`` is empty (``command`` names the CLI command in the message).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model:
        raise ValueError(f"{command} needs --model (a model folder; with --gguf, the folder holding the GGUF file)")
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs)
    if gguf:
        assert all(p.dtype == torch.float32 for p in lm.parameters()), "expected dequantized float32 weights"
        lm.is_quantized = False
        lm.hf_quantizer = None
        lm.config.quantization_config = None
    return tokenizer, lm
