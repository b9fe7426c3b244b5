"""The fast decode mode in one call: ``hf_stochact.fast_decode(model)``.

It uses transformers' own machinery rather than replacing anything: ``generation_config.cache_implementation =
"static"`` (a pre-allocated KV cache of fixed shape) and a ``CompileConfig`` that makes ``generate`` compile the
decode step (``torch.compile``, fullgraph, static shapes) on every device, the CPU included (transformers compiles
only on accelerators by default). The prefill runs eagerly; every decode step after it runs the compiled graph.

Everything hf_stochact puts in a model compiles without graph breaks (custom operators with fake kernels): a
:func:`~hf_stochact.sparsify`-ed model (exact ReLU FFNs and input thresholds) and stochastic decoding
(``generate(..., stochastic_activation=True)``; the per-call draw reaches the graph through guards, so plain and
stochastic calls each get their graph). The first ``generate`` call after it compiles (tens of seconds on a small
CPU); later calls of the same batch size and maximum length reuse the graph.
"""

from __future__ import annotations

from torch import nn


def fast_decode(model: nn.Module, *, enable: bool = True, fullgraph: bool = True) -> nn.Module:
    """Make ``model.generate`` decode with a static KV cache and a compiled decode step (see the module docstring).
    Returns ``model``. ``enable=False`` undoes it (dynamic cache, no compilation).

    Raises:
        ValueError: ``model`` has no ``generation_config`` (not a generative transformers model).
    """
    from transformers import CompileConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        raise ValueError(f"fast_decode needs a generative transformers model (with a generation_config), got "
                         f"{type(model).__name__}")
    if not enable:
        config.cache_implementation = None
        config.compile_config = None
        return model
    compile_config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers' switch for compiling on the CPU too
    config.cache_implementation = "static"
    config.compile_config = compile_config
    config.disable_compile = False
    return model


def is_fast(model: nn.Module) -> bool:
    """Whether :func:`fast_decode` is in force on ``model``."""
    config = getattr(model, "generation_config", None)
    compile_config = getattr(config, "compile_config", None)
    return bool(config is not None and config.cache_implementation == "static" and compile_config is not None
                and compile_config._compile_all_devices)
