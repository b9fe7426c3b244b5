"""The fast decode mode in one call: ``hf_stochact.fast_decode(model)``. It picks the fastest path it supports and
says which (:func:`decode_path`):

1. **The native decode step** (:mod:`hf_stochact.runtime.native`): one C call per generated token runs every layer,
   the final norm and the LM head on the model's own parameters and HF's static KV cache, with no compilation
   (set-up is a plan built and self-checked in well under a second). For the pre-norm decoder layouts of Llama,
   Mistral, Qwen2/3, SmolLM, Gemma 2/3 and Phi-3 with ``nn.Linear`` projections, float32/bfloat16 weights, dense,
   thresholded (rotated or not) or exact-ReLU sparse (:func:`~hf_stochact.sparsify`), stochastic decoding included.
   Every call it cannot take (prefill, batches, padding, gradients, hooks, adapters) runs the model's own forward.
2. **A compiled decode step** otherwise: transformers' own ``generation_config.cache_implementation = "static"`` and
   a ``CompileConfig`` that makes ``generate`` compile the step (``torch.compile``, static shapes) on the CPU too.
   ``fullgraph=False`` by default: a step that would recompile past Dynamo's limit (a 9th batch size, several models
   in one process) runs eagerly instead of raising.
3. **Eager** where a compiled step would recompile every step: models with sliding-window layers and no native
   step (transformers' static sliding-window cache reads a Python int that changes every step).
"""

from __future__ import annotations

from torch import nn


def _sliding(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (getattr(config, "layer_types",
                                                                                           None) or ())


def fast_decode(model: nn.Module, *, enable: bool = True, native: bool = True, fullgraph: bool = False) -> nn.Module:
    """Make ``model.generate`` decode fast: the native decode step where the model's layout allows it, else a
    compiled step, else eager (see the module docstring; :func:`decode_path` says which was taken and why).
    Returns ``model``. ``enable=False`` undoes it: the model's own forward, and the generation config's
    ``cache_implementation``, ``compile_config`` and ``disable_compile`` as they were before the first call.

    Args:
        native: try the native step first (False: the compiled step, as before the native step existed).
        fullgraph: compile the step as one graph (an error, not an eager fallback, where Dynamo gives up).

    Raises:
        ValueError: ``model`` has no ``generation_config`` (not a generative transformers model).
    """
    from transformers import CompileConfig

    from . import native as native_step

    config = getattr(model, "generation_config", None)
    if config is None:
        raise ValueError(f"fast_decode needs a generative transformers model (with a generation_config), got "
                         f"{type(model).__name__}")
    native_step.disable(model)
    model.__dict__.pop("_hf_stochact_path", None)
    saved = model.__dict__.get("_hf_stochact_saved_generation")
    if not enable:
        if saved is not None:  # the user's own settings, as they were before fast_decode
            config.cache_implementation, config.compile_config, config.disable_compile = saved
            del model.__dict__["_hf_stochact_saved_generation"]
        else:
            config.cache_implementation = None
            config.compile_config = None
        return model
    if saved is None:
        model.__dict__["_hf_stochact_saved_generation"] = (config.cache_implementation, config.compile_config,
                                                           config.disable_compile)
    if native:
        runner = native_step.enable(model)
        if runner.built is not None:
            config.cache_implementation = "static"
            config.compile_config = None
            config.disable_compile = True
            return model
        why = runner.reason
        native_step.disable(model)
    else:
        why = "not asked for (native=False)"
    if _sliding(model):
        config.cache_implementation = None
        config.compile_config = None
        model.__dict__["_hf_stochact_path"] = (
            f"eager (native step unavailable: {why}; a compiled step would recompile every step on this model's "
            "sliding-window cache)")
        return model
    compile_config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers' switch for compiling on the CPU too
    config.cache_implementation = "static"
    config.compile_config = compile_config
    config.disable_compile = False
    model.__dict__["_hf_stochact_path"] = f"compiled decode step (native step unavailable: {why})"
    return model


def decode_path(model: nn.Module) -> str:
    """One line: how ``model.generate`` decodes after :func:`fast_decode` (native step, compiled, or eager, and the
    reason), with the count of native and fallback steps so far where the native step is on."""
    from . import native as native_step

    runner = native_step.runner_of(model)
    if runner is not None:
        line = runner.describe()
        if runner.counts:
            line += "; steps: " + ", ".join(f"{n} {k}" for k, n in runner.counts.most_common())
        return line
    return model.__dict__.get("_hf_stochact_path", "the model's own forward (fast_decode not applied)")


def is_fast(model: nn.Module) -> bool:
    """Whether :func:`fast_decode` is in force on ``model`` (native or compiled step)."""
    from . import native as native_step

    config = getattr(model, "generation_config", None)
    if config is None or config.cache_implementation != "static":
        return False
    if native_step.runner_of(model) is not None:
        return True
    compile_config = getattr(config, "compile_config", None)
    return bool(compile_config is not None and compile_config._compile_all_devices)
