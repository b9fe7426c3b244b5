"""Models loaded from GGUF files, made savable and trainable like any other (:func:`make_serializable`)."""

from __future__ import annotations

from torch import nn


def make_serializable(model: nn.Module) -> nn.Module:
    """Clear the GGUF quantizer marker of a model loaded with ``from_pretrained(..., gguf_file=...)``, in place, and
    return it.

    transformers dequantizes GGUF weights on load (plain floating-point ``nn.Linear`` parameters, float32 unless
    ``dtype=`` says otherwise) but keeps the quantizer on the model (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``), so ``save_pretrained`` raises "The model is quantized with gguf and is not
    serializable" and ``Trainer`` refuses to fine-tune it. After this call the model is an ordinary transformers
    model: ``save_pretrained`` writes safetensors and a config without ``quantization_config``. A model that carries
    no quantizer is returned unchanged. ``hf-stochact`` commands given ``--gguf`` do the same.

    Raises:
        ValueError: the model is quantized by another method (bitsandbytes, GPTQ, ...: its weights really are
            quantized, so this cannot help), or a parameter is not a plain floating-point tensor.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    settings = getattr(config, "quantization_config", None)
    if quantizer is None and settings is None:
        return model
    method = getattr(getattr(quantizer, "quantization_config", None) or settings, "quant_method", None)
    method = getattr(method, "value", method)  # QuantizationMethod enum -> "gguf"
    if isinstance(settings, dict):
        method = settings.get("quant_method", method)
    if method != "gguf":
        raise ValueError(f"make_serializable only clears the marker of GGUF-loaded (dequantized) models; this model "
                         f"is quantized with {method!r}: save it as its quantization library documents")
    odd = [name for name, p in model.named_parameters() if type(p) is not nn.Parameter or not p.is_floating_point()]
    if odd:
        raise ValueError(f"make_serializable: {len(odd)} parameter(s) are not plain floating-point tensors (e.g. "
                         f"{odd[0]}): the GGUF weights were not dequantized")
    model.is_quantized = False
    model.hf_quantizer = None
    if config is not None:
        config.quantization_config = None
        if hasattr(config, "__dict__"):
            vars(config).pop("quantization_config", None)  # not written into config.json as "null"
    return model
