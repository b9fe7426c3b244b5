"""The native decode step: one call into C per generated token (``hf_stochact/kernels/csrc/decode.c``).

:func:`~hf_stochact.fast_decode` puts it behind the model's own ``forward``: a decode step of one sequence (one
new token, HF's static KV cache, no gradient) runs every layer, the final norm and the LM head in one C call that
reads the model's parameters and the cache tensors in place (+0 weight copies); everything else (prefill, batches,
training, outputs of attentions or hidden states, a layout or weight it cannot read) runs the model's ordinary
forward. ``generate`` keeps everything it does around the step: logits processors, stopping criteria, streamers.

What is run is found by walking modules, not by model family: :data:`DECODER_LAYOUTS` names where the norms sit in
a decoder layer (pre-norm Llama-style, or Gemma 2/3's four norms); attention is ``q/k/v/o_proj`` (optional per-head
``q_norm``/``k_norm``), the FFN is found by :func:`hf_stochact.layouts.find_mlps`. The kind of every norm (``w`` or
``1 + w``) and activation is decided by running the module on a probe, and the whole plan is then checked end to
end: two steps of the native plan against the model's own forward on the same tokens, before it is ever used. A
plan that disagrees is not used, and the reason is kept (:func:`describe`).

Safety: shapes, dtypes and layouts are checked when the plan is built (:mod:`hf_stochact.kernels.native`); every
step re-checks the parameters' data pointers and a counter of module/parameter registrations (a replaced child, a
``.to()``, a re-``sparsify`` rebuild the plan), and the plan keeps a reference to every tensor it reads, so even a
stale plan never reads freed memory. Scratch memory is per call: threads with their own caches may share a model.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..kernels import native as kn

#: Where the norms of a decoder layer sit: ``n1`` before attention, ``n2`` on the attention output (before the
#: residual add), ``n3`` before the FFN, ``n4`` on the FFN output. Most specific first.
DECODER_LAYOUTS: tuple[tuple[str, tuple[str | None, str | None, str | None, str | None]], ...] = (
    ("gemma2", ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")),  # Gemma 2, Gemma 3
    ("llama", ("input_layernorm", None, "post_attention_layernorm", None)),  # Llama, Mistral, Qwen2/3, SmolLM, Phi-3
)

_ACT_PROBE = torch.linspace(-4.0, 4.0, 97, dtype=torch.float64)
_ACT_REFERENCES = {
    "silu": nn.functional.silu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu": nn.functional.gelu,
    "relu": torch.relu,
    "relu2": lambda x: torch.relu(x) ** 2,
}

# ---- registrations: a child, parameter or buffer assigned to a module some plan reads bumps the counter (plans
# re-check it every step). Only watched modules count: transformers builds throw-away containers in every forward
# (``self.layers[:n]`` is a new ModuleList), which must not invalidate anything.
_REGISTRATIONS = [0]
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOKS_INSTALLED = threading.Lock()
_INSTALLED: list[Any] = []


def _bump(module: nn.Module, *args: Any) -> None:
    if module in _WATCHED:
        _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    with _HOOKS_INSTALLED:
        if not _INSTALLED:
            from torch.nn.modules import module as m

            _INSTALLED.extend([m.register_module_module_registration_hook(_bump),
                               m.register_module_parameter_registration_hook(_bump),
                               m.register_module_buffer_registration_hook(_bump)])


_DATA_PTR = torch.Tensor.data_ptr
#: the forward arguments a native step takes (anything else given runs the model's own forward)
_STEP_KWARGS = frozenset({"input_ids", "cache", "past_key_values", "attention_mask", "position_ids", "cache_position",
                          "logits_to_keep", "use_cache", "return_dict", "inputs_embeds", "labels",
                          "output_attentions", "output_hidden_states"})


class Unsupported(ValueError):
    """The native step cannot run this model (the message says why)."""


@dataclasses.dataclass
class _Built:
    plan: kn.Plan
    layout: str
    dtype: str
    params: list[torch.Tensor]  # every parameter read (pointers re-checked per step)
    ptrs: list[int]
    versions: list[tuple[torch.Tensor, int]]  # converted biases and rotations: their version at build
    registrations: int
    modules: list[nn.Module]  # hooks checked when a generate call starts
    activations: frozenset[int]  # ids of the FFN activation modules (stochastic decoding)
    act_modules: list[nn.Module]  # per layer: the FFN activation module and its kind
    act_kinds: list[str]
    sampling: list[nn.Module]  # hf_stochact activations, which draw by themselves in training mode
    rotary: nn.Module
    layer_types: list[str] | None
    rope_dim: int
    dims: list[tuple[int, int, int | None]] = dataclasses.field(default_factory=list)
    thresholded: list[tuple[nn.Module, float, torch.Tensor | None]] = dataclasses.field(default_factory=list)
    # each FFN activation's settings object and training flag at build (configure() / set_activation() replace the
    # spec without any registration: the probed kind would be stale)
    act_states: list[tuple[nn.Module, Any, bool]] = dataclasses.field(default_factory=list)
    bindings: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary)
    rope_table: torch.Tensor | None = None
    summary: str = ""
    check_error: float = float("nan")
    plan_bf16: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _act_kind(module: nn.Module) -> str:
    try:
        y = module(_ACT_PROBE.float()).double()
    except Exception as error:  # noqa: BLE001 - any activation that cannot run on a probe is unsupported
        raise Unsupported(f"the FFN activation {type(module).__name__} failed on a probe ({error})") from error
    for name, ref in _ACT_REFERENCES.items():
        if torch.allclose(y, ref(_ACT_PROBE), atol=1e-5, rtol=1e-5):
            return name
    raise Unsupported(f"the FFN activation {type(module).__name__} is none of {', '.join(_ACT_REFERENCES)}")


def _norm_spec(keep: kn.Keep, module: nn.Module | None, d: int, what: str) -> tuple | None:
    if module is None:
        return None
    weight = module._parameters.get("weight")
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None),
                                                                                     float)), None)
    if weight is None or eps is None or weight.shape != (d,):
        raise Unsupported(f"{what} ({type(module).__name__}) is not an RMS norm over {d} features")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, d, generator=generator).to(weight.dtype)
    with torch.no_grad():
        y = module(x).double()
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.detach().double()
    scale = y.abs().max().item() + 1e-6
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    errors = {kn.NORM_RMS: (y - normed * w).abs().max().item(), kn.NORM_RMS_ONE_PLUS: (y - normed * (1 + w)).abs()
              .max().item()}
    kind = min(errors, key=errors.get)
    if errors[kind] > tol * scale:
        raise Unsupported(f"{what} ({type(module).__name__}) computes neither x/rms(x)*w nor x/rms(x)*(1+w)")
    return kn.norm_spec(keep, weight, kind, eps)


def _tracked(layer: nn.Linear, what: str, built: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias, checked (plain CPU float32/bfloat16) and recorded for the per-step re-checks
    (pointers; the version of a bias the step reads through a float32 copy)."""
    weight, bias = layer._parameters["weight"], layer._parameters.get("bias")
    if weight.__class__ not in (torch.Tensor, nn.Parameter) or not weight.is_cpu:
        raise Unsupported(f"{what}'s weight is not a plain CPU tensor")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{what}'s weight is {weight.dtype} (float32 and bfloat16 run natively)")
    built["params"].append(weight)
    if bias is not None:
        built["params"].append(bias)
        if bias.dtype != torch.float32:
            built["versions"].append((bias, bias._version))
    return weight, bias


def _linear(keep: kn.Keep, layer: nn.Module | tuple, d_in: int, d_out: int, what: str, built: dict) -> tuple:
    """The spec of a projection: plain ``nn.Linear`` (rows layout, or the input-rows layout sparsify gives W_down),
    or sparsify's thresholded layer (input rows, its threshold); ``(layer, first, rows)``: rows ``first`` to
    ``first + rows`` of a fused projection's output (Phi-3's qkv_proj and gate_up_proj), rows layout only."""
    from ..inference.sparse import ThresholdedLinear

    if isinstance(layer, tuple):
        fused, first, rows = layer
        if type(fused) is not nn.Linear or not fused.weight.is_contiguous():
            raise Unsupported(f"{what} is part of a fused {type(fused).__name__} the step cannot slice (thresholded "
                              "or re-laid fused projections run in the model's own forward)")
        weight, bias = _tracked(fused, what, built)
        try:
            return kn.linear_spec(keep, weight[first:first + rows], None if bias is None else bias[first:first + rows],
                                  kn.ROWS, d_in, d_out)
        except ValueError as error:
            raise Unsupported(f"{what}: {error}") from error

    threshold, rotation = -1.0, None
    if isinstance(layer, ThresholdedLinear):
        threshold, rotation = layer.threshold, layer.rotation
        built["thresholded"].append((layer, threshold, rotation))
        layer = layer.original
        if rotation is not None:
            if rotation.device.type != "cpu":
                raise Unsupported(f"{what}'s rotation is not on the CPU")
            built["versions"].append((rotation, rotation._version))
    if type(layer) is not nn.Linear:
        raise Unsupported(f"{what} is a {type(layer).__name__}, not a plain nn.Linear (an adapter or quantized "
                          "layer runs in the model's own forward)")
    weight, bias = _tracked(layer, what, built)
    if threshold >= 0.0 or (not weight.is_contiguous() and weight.t().is_contiguous()):
        w_t = weight.t()
        if not w_t.is_contiguous():
            raise Unsupported(f"{what}'s thresholded weight is not in the rows layout")
        try:
            return kn.linear_spec(keep, w_t, bias, kn.INPUT_ROWS, d_in, d_out, threshold, rotation)
        except ValueError as error:
            raise Unsupported(f"{what}: {error}") from error
    try:
        return kn.linear_spec(keep, weight, bias, kn.ROWS, d_in, d_out, rotation=rotation)
    except ValueError as error:
        raise Unsupported(f"{what}: {error}") from error


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm")):
        raise Unsupported(f"{type(model).__name__} has no decoder with embed_tokens/layers/norm")
    return decoder


def _head(model: nn.Module) -> nn.Module:
    from ..inference.sparse import RowsHead

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, RowsHead):
        head = head.original
    if type(head) is not nn.Linear:
        raise Unsupported(f"the LM head is a {type(head).__name__}, not a plain nn.Linear")
    return head


def _hooked(modules: list[nn.Module]) -> str | None:
    from ..inference.sparse import _global_hooks, _internal

    if _global_hooks():
        return "a global module hook is registered"
    for m in modules:
        if m._forward_pre_hooks or (m._forward_hooks and not all(_internal(h) for h in m._forward_hooks.values())):
            return f"a {type(m).__name__} has a forward hook (hooks run in the model's own forward)"
        if m.__dict__.get("_hf_hook") is not None:  # (not getattr: nn.Module's miss path costs ~1 us a module)
            return f"a {type(m).__name__} has an accelerate hook"
    return None


def build(model: nn.Module) -> _Built:
    """Build and self-check the plan for ``model``. Raises :class:`Unsupported` with the reason. The probes and the
    self-check run the model's modules deterministically, even inside a stochastic ``generate`` call."""
    from ..activations import scope

    with scope.suspended():
        return _build(model)


@dataclasses.dataclass
class _Walk:
    """What a plan build collects while it walks the decoder layers."""

    keep: kn.Keep
    mlps: dict[int, Any]  # id(MLP module) -> hf_stochact.layouts.MLP
    d: int
    config: Any
    layer_types: list[str] | None
    rotary: nn.Module
    layout: str | None = None
    built: dict[str, list] = dataclasses.field(
        default_factory=lambda: {"params": [], "versions": [], "thresholded": []})
    modules: list[nn.Module] = dataclasses.field(default_factory=list)
    activations: set[int] = dataclasses.field(default_factory=set)
    act_modules: list[nn.Module] = dataclasses.field(default_factory=list)
    act_kinds: list[str] = dataclasses.field(default_factory=list)
    dims: list[tuple[int, int, int | None]] = dataclasses.field(default_factory=list)  # kv heads, head dim, window

    @property
    def params(self) -> list[torch.Tensor]:
        return self.built["params"]


def _layer_spec(walk: _Walk, i: int, layer: nn.Module) -> tuple:
    """The C spec of decoder layer ``i`` (norms, q/k norms, the seven projections, head counts, activation, sparse
    FFN flag, rope table, scale, soft-cap); records what the plan reads in ``walk``. Raises :class:`Unsupported`."""
    keep, built, d = walk.keep, walk.built, walk.d
    row = next(((name, norms) for name, norms in DECODER_LAYOUTS
                if all(n is None or n in layer._modules for n in norms)), None)
    attn, mlp_module = layer._modules.get("self_attn"), layer._modules.get("mlp")
    if row is None or attn is None or mlp_module is None:
        raise Unsupported(f"decoder layer {i} ({type(layer).__name__}) matches no row of DECODER_LAYOUTS")
    walk.layout = walk.layout or row[0]
    n1, n2, n3, n4 = (layer._modules[n] if n else None for n in row[1])
    a = attn._modules
    head_dim, scale = getattr(attn, "head_dim", None), getattr(attn, "scaling", None)
    if not isinstance(head_dim, int) or not isinstance(scale, float):
        raise Unsupported(f"layer {i}'s attention has no head_dim/scaling")
    if all(k in a for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        q_out, k_out = _out_features(a["q_proj"]), _out_features(a["k_proj"])
        qkv = {"q": a["q_proj"], "k": a["k_proj"], "v": a["v_proj"]}
    elif "qkv_proj" in a and "o_proj" in a:  # Phi-3: [q; k; v] stacked along the output
        heads = getattr(walk.config, "num_attention_heads", None)
        kv_heads = getattr(walk.config, "num_key_value_heads", None) or heads
        if not isinstance(heads, int) or not isinstance(kv_heads, int) or \
                _out_features(a["qkv_proj"]) != (heads + 2 * kv_heads) * head_dim:
            raise Unsupported(f"layer {i}'s fused qkv_proj does not split into the config's heads")
        q_out, k_out = heads * head_dim, kv_heads * head_dim
        qkv = {"q": (a["qkv_proj"], 0, q_out), "k": (a["qkv_proj"], q_out, k_out),
               "v": (a["qkv_proj"], q_out + k_out, k_out)}
    else:
        raise Unsupported(f"layer {i}'s attention has neither q_proj/k_proj/v_proj/o_proj nor qkv_proj/o_proj")
    if q_out % head_dim or k_out % head_dim:
        raise Unsupported(f"layer {i}: projections do not split into heads of {head_dim}")
    softcap = getattr(attn, "attn_logit_softcapping", None) or 0.0
    mlp = walk.mlps.get(id(mlp_module))
    if mlp is None or not mlp.layout.gated:
        raise Unsupported(f"layer {i}'s FFN is not a gated MLP")
    act_module = mlp.activation
    act = _act_kind(act_module)
    walk.activations.add(id(act_module))
    walk.act_modules.append(act_module)
    walk.act_kinds.append(act)
    gate, down = mlp.child(mlp.layout.pre), mlp.child(mlp.layout.down)
    if mlp.layout.fused_gate_up:  # Phi-3: [gate; up] stacked along the output
        dff = _out_features(gate) // 2
        gate, up = (gate, 0, dff), (gate, dff, dff)
    else:
        up = mlp.child(mlp.layout.up)
        dff = _out_features(gate)
    specs = {name: _linear(keep, lin, din, dout, f"layer {i} {name}", built)
             for name, lin, din, dout in (("q", qkv["q"], d, q_out), ("k", qkv["k"], d, k_out),
                                          ("v", qkv["v"], d, k_out), ("o", a["o_proj"], q_out, d),
                                          ("gate", gate, d, dff), ("up", up, d, dff), ("down", down, dff, d))}
    sparse_ffn = int(act in ("relu", "relu2") and specs["down"][3] == kn.INPUT_ROWS and specs["down"][6] < 0
                     and specs["gate"][3] == kn.ROWS and specs["up"][3] == kn.ROWS
                     and not (specs["gate"][7] or specs["up"][7] or specs["down"][7]))
    norms = [_norm_spec(keep, n, d, f"layer {i} norm") for n in (n1, n2, n3, n4)]
    qk = [_norm_spec(keep, a.get(n), head_dim, f"layer {i} {n}") for n in ("q_norm", "k_norm")]
    walk.params.extend(n._parameters["weight"] for n in (n1, n2, n3, n4, a.get("q_norm"), a.get("k_norm"))
                       if n is not None)
    layer_types = walk.layer_types
    rope = 0
    if layer_types is not None and _rotary_takes_layer_type(walk.rotary):
        rope = sorted(set(layer_types)).index(layer_types[i])
    window = getattr(attn, "sliding_window", None)
    if window is None and layer_types is None:
        window = getattr(walk.config, "sliding_window", None)
    walk.dims.append((k_out // head_dim, head_dim, window if isinstance(window, int) else None))
    walk.modules.extend([layer, attn, mlp_module, *(m for m in (n1, n2, n3, n4) if m is not None),
                         *(a[k] for k in a), *mlp_module._modules.values()])
    return (*norms, *qk, specs["q"], specs["k"], specs["v"], specs["o"], specs["gate"], specs["up"], specs["down"],
            q_out // head_dim, k_out // head_dim, head_dim, kn.ACTIVATIONS[act], sparse_ffn, rope, scale,
            float(softcap))


def _build(model: nn.Module) -> _Built:
    from ..activations.stochastic import StochasticActivation
    from ..layouts import find_mlps

    if not kn.available():
        raise Unsupported("the C loops are not built or are switched off in this thread")
    _watch_registrations()
    registrations = _REGISTRATIONS[0]
    config = getattr(model, "config", None)
    decoder = _decoder(model)
    embed, layers, final_norm = decoder.embed_tokens, decoder.layers, decoder.norm
    rotary = getattr(decoder, "rotary_emb", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or rotary is None:
        raise Unsupported("the decoder has no list of layers or no rotary embedding")
    weight = embed._parameters.get("weight") if isinstance(embed, nn.Embedding) else None
    if weight is None:
        raise Unsupported(f"the input embedding is a {type(embed).__name__}, not an nn.Embedding")
    vocab, d = weight.shape
    head = _head(model)
    walk = _Walk(kn.Keep(), {id(m.module): m for m in find_mlps(model, need="pre+down")}, d, config,
                 getattr(config, "layer_types", None), rotary)
    walk.params.append(weight)
    walk.modules.extend([model, decoder, embed, final_norm, head])
    layer_specs = tuple(_layer_spec(walk, i, layer) for i, layer in enumerate(layers))
    keep, built, layer_types, dims = walk.keep, walk.built, walk.layer_types, walk.dims
    modules, activations, act_modules, act_kinds = walk.modules, walk.activations, walk.act_modules, walk.act_kinds
    layout_name = walk.layout
    embed_ptr, embed_dtype, _ = kn.embedding_spec(keep, weight, d)
    head_spec = _linear(keep, head, d, vocab, "the LM head", built)
    if head_spec[3] != kn.ROWS:
        raise Unsupported("the LM head's weight is not in the rows layout")
    final = _norm_spec(keep, final_norm, d, "the final norm")
    built["params"].append(final_norm._parameters["weight"])
    rope_dim, n_rope = _rope_dim(rotary, d), 1
    if layer_types is not None and _rotary_takes_layer_type(rotary):
        n_rope = len(set(layer_types))
    logit_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
    embed_scale = _embed_scale(decoder, embed, weight)
    model_spec = (embed_ptr, embed_dtype, embed_scale, vocab, d, final, head_spec, logit_softcap, n_rope, rope_dim)
    hooked = _hooked(modules)
    if hooked:
        raise Unsupported(hooked)
    modules.append(layers)
    _WATCHED.update(modules)
    plan = kn.Plan(model_spec, layer_specs, keep)
    params = built["params"]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in params})
    result = _Built(plan, layout_name or "?", "/".join(dtypes), params, [t.data_ptr() for t in params],
                    [(t, t._version) for t, _ in built["versions"]], registrations, modules, frozenset(activations),
                    act_modules, act_kinds, [m for m in act_modules if isinstance(m, StochasticActivation)],
                    rotary, list(layer_types) if layer_types is not None else None, rope_dim, dims)
    result.plan_bf16 = any(t.dtype == torch.bfloat16 for t in params)
    result.thresholded = built["thresholded"]
    result.act_states = [(m, m.__dict__.get("_spec"), m.training) for m in act_modules]
    thresholded = sum(1 for spec in layer_specs for lin in spec[6:13] if lin[6] >= 0)
    rotated = sum(1 for spec in layer_specs for lin in spec[6:13] if lin[7])
    sparse = sum(spec[17] for spec in layer_specs)
    result.summary = (f"native decode step ({result.layout} layout, {len(layer_specs)} layers, {result.dtype} "
                      f"weights{f', {thresholded} thresholded layers' if thresholded else ''}"
                      f"{f' ({rotated} rotated)' if rotated else ''}"
                      f"{f', {sparse} exact sparse ReLU FFNs' if sparse else ''})")
    if result.plan_bf16:
        _structure_check(model)
    _self_check(model, result)
    return result


#: A bfloat16 model is also checked through a float32 copy of itself up to this size (the same plan structure, run
#: exactly: a layout mistake too small to see through bfloat16 rounding shows there).
FP32_TWIN_MAX_BYTES = 4 << 30


def _structure_check(model: nn.Module) -> None:
    import copy

    if sum(p.numel() for p in model.parameters()) * 4 > FP32_TWIN_MAX_BYTES:
        return
    twin = copy.deepcopy(model).float()
    twin.__dict__.pop("_hf_stochact_native", None)
    build(twin)


def _draw_specs(built: _Built, draws: dict) -> tuple | None | str:
    """The per-layer draws of a stochastic ``generate`` call for the C step: None (no layer draws), a tuple, or a
    string saying why the native step cannot draw them (k-way mixes, per-token or per-tensor granularity)."""
    from ..activations.stochastic import StochasticSpec
    from ..inference.decoding import OWN_OR_RELU, SILU_OR_RELU, STOCHA

    out, any_draw = [], False
    for module, kind in zip(built.act_modules, built.act_kinds):
        draw = draws.get(id(module))
        if draw is None:
            out.append(None)
            continue
        any_draw = True
        if isinstance(draw, StochasticSpec):
            if draw.choices is not None or draw.granularity != "element":
                return "a k-way or per-token/per-tensor stochastic draw"
            p, negative_only, smooth = draw.p, draw.variant == "paper", "silu"
        else:
            rule, p = draw
            smooth = {STOCHA: "silu", SILU_OR_RELU: "silu", OWN_OR_RELU: kind}.get(rule)
            if smooth is None:
                return f"the stochastic rule {rule!r}"
            negative_only = rule == STOCHA
        out.append((min(2**32, max(0, round(float(p) * 2**32))), int(negative_only), kn.ACTIVATIONS[smooth]))
    return tuple(out) if any_draw else None


def _out_features(layer: nn.Module) -> int:
    from ..inference.sparse import ThresholdedLinear

    if isinstance(layer, ThresholdedLinear):
        layer = layer.original
    out = getattr(layer, "out_features", None)
    if not isinstance(out, int):
        raise Unsupported(f"a projection ({type(layer).__name__}) has no out_features")
    return out


@functools.cache
def _takes_layer_type(cls: type) -> bool:
    import inspect

    return "layer_type" in inspect.signature(cls.forward).parameters


def _rotary_takes_layer_type(rotary: nn.Module) -> bool:
    return _takes_layer_type(type(rotary))


def _rope_dim(rotary: nn.Module, d: int) -> int:
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        found = [b for n, b in rotary.named_buffers() if n.endswith("inv_freq")]
        inv_freq = found[0] if found else None
    if inv_freq is None:
        raise Unsupported(f"the rotary embedding {type(rotary).__name__} has no inv_freq")
    rope_type = getattr(rotary, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    if any(t in ("dynamic", "longrope") for t in types):
        raise Unsupported(f"rope type {rope_type} depends on the sequence length (runs in the model's own forward)")
    return 2 * inv_freq.numel()


def _embed_scale(decoder: nn.Module, embed: nn.Module, weight: torch.Tensor) -> float:
    """The factor between the embedding row and what the first layer receives (Gemma: sqrt(d)), by probing."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs.get("hidden_states")
        raise _Stop

    layer0 = decoder.layers[0]
    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=torch.tensor([[1]]), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    x = seen.get("x")
    if x is None:
        raise Unsupported("the first decoder layer's input could not be observed")
    row = weight[1].detach().double()
    got = x.reshape(-1).double()
    if row.abs().max() == 0:
        return 1.0
    return float((got @ row) / (row @ row))


class _Stop(Exception):
    pass


def _self_check(model: nn.Module, built: _Built) -> None:
    """Two native steps (after a prefill of two tokens by the model's own forward) against the model's forward on
    the four tokens. Raises :class:`Unsupported` when they disagree beyond float rounding (a layout this plan does
    not describe)."""
    from transformers import StaticCache

    vocab = built.plan.vocab
    ids = torch.tensor([[3 % vocab, 5 % vocab, 7 % vocab, 11 % vocab]])
    bf16 = built.plan_bf16
    with torch.no_grad():
        full = model_forward(model, input_ids=ids, use_cache=False).logits[0].float()
        cache = StaticCache(config=model.config, max_cache_len=8)
        model_forward(model, input_ids=ids[:, :2], use_cache=True, cache_position=torch.arange(2),
                      **{_cache_field(): cache})
        steps = []
        for position in (2, 3):  # the second step reads what the first wrote into the cache
            logits = torch.empty(vocab, dtype=torch.float32, device="cpu")
            if not _run(built, cache, int(ids[0, position]), position, 0, None, logits):
                raise Unsupported("the self-check's step found no room in the cache")
            steps.append(logits)
    built.check_error = 0.0
    for logits, reference in zip(steps, full[2:]):
        _compare(built, logits, reference, bf16)


def _compare(built: _Built, logits: torch.Tensor, reference: torch.Tensor, bf16: bool) -> None:
    if bf16:
        # bfloat16: the step keeps activations in float32, the model's forward rounds them to bfloat16 after every
        # operation; on SmolLM2 the step is the closer of the two to a float32 forward (relative L2 error 0.3-4% vs
        # 0.6-9%), so the check allows the forward's own error: a layout mistake moves the logits by O(1), and the
        # structure is also checked exactly through a float32 twin (_structure_check)
        error = ((logits - reference).norm() / (reference.norm() + 1e-6)).item()
        built.check_error = max(built.check_error, error)
        if not error <= 0.25:
            raise Unsupported(f"the native step disagrees with the model's forward (relative error {error:.3g}): a "
                              "layout the plan does not describe")
        return
    scale = reference.abs().max().item() + 1e-6
    error = (logits - reference).abs().max().item()
    built.check_error = max(built.check_error, error / scale)
    if not error <= 1e-3 * scale:
        raise Unsupported(f"the native step disagrees with the model's forward ({error:.3g} vs logits up to "
                          f"{scale:.3g}): a layout the plan does not describe")


@functools.cache
def _cache_field() -> str:
    """The name transformers gives the cache in outputs and forward arguments ("cache" from 5.2x, before that
    "past_key_values")."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _output(logits: torch.Tensor, cache: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits, **{_cache_field(): cache})


def model_forward(model: nn.Module, **kwargs: Any) -> Any:
    """The model's own forward, bypassing the native step."""
    cls = type(model)
    base = cls.__mro__[1] if getattr(cls, "_hf_stochact_native_class", False) else cls
    return base.forward(model, **kwargs)


def _cache_layers(built: _Built, cache: Any) -> tuple | None:
    """The per-layer cache specs (k, v, dtype, capacity, length) and sliding flags of a static cache, or None."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != built.plan.n_layers:
        return None
    specs, sliding = [], []
    keep = kn.Keep()
    for i, layer in enumerate(layers):
        if type(layer) not in (StaticLayer, StaticSlidingWindowLayer) or not layer.is_initialized:
            return None
        kv_heads, head_dim, window = built.dims[i]
        is_sliding = type(layer) is StaticSlidingWindowLayer
        if window is not None and not is_sliding and layer.max_cache_len > window:
            return None  # the model's mask keeps a window this full-length cache layer does not
        try:
            specs.append(kn.cache_spec(layer.keys, layer.values, layer.cumulative_length, kv_heads, head_dim, keep))
        except ValueError:
            return None
        sliding.append(is_sliding)
    return tuple(specs), tuple(sliding), keep


def _rope(built: _Built, position: int) -> torch.Tensor:
    table = built.rope_table
    if table is not None and position < table.shape[0]:
        return table
    with built.lock:
        table = built.rope_table
        if table is not None and position < table.shape[0]:
            return table
        n = max(256, 2 * position + 2, 0 if table is None else 2 * table.shape[0])
        positions = torch.arange(n, device="cpu")[None]
        x = torch.zeros(1, 1, dtype=torch.float32, device="cpu")
        kinds = sorted(set(built.layer_types)) if built.layer_types and _rotary_takes_layer_type(built.rotary) \
            else [None]
        parts = []
        with torch.no_grad():
            for kind in kinds:
                cos, sin = built.rotary(x, positions) if kind is None else built.rotary(x, positions, kind)
                parts.append(torch.stack([cos[0, :, :built.rope_dim].float(), sin[0, :, :built.rope_dim].float()], 1))
        built.rope_table = torch.stack(parts, 1).contiguous()  # [n, n_rope, 2, rope_dim]
        return built.rope_table


def _run(built: _Built, cache: Any, token: int, position: int, seed: int, draws: tuple | None,
         logits: torch.Tensor) -> bool:
    bound = built.bindings.get(cache)  # per cache object, held weakly: a cache copies and pickles as before
    cache_layers = cache.layers
    if bound is None or any(layer.keys is not k or layer.values is not v
                            for layer, (k, v) in zip(cache_layers, bound[3])):
        layers = _cache_layers(built, cache)
        if layers is None:
            return False
        bound = (*layers, [(layer.keys, layer.values) for layer in cache_layers])
        built.bindings[cache] = bound
    specs, sliding, _keep, _tensors = bound
    entries = tuple((*spec, cache_layers[i].cumulative_length_int if sliding[i] else -1)
                    for i, spec in enumerate(specs))
    if not kn.step(built.plan, token, _rope(built, position), position, entries, seed, draws, logits):
        return False
    for i, s in enumerate(sliding):
        if s:
            cache_layers[i].cumulative_length_int += 1
    return True


def _mask_sees_all(mask: Any, n: int) -> bool:
    """Whether an attention mask (2-D, 4-D boolean or additive, or transformers' per-layer-type dict, whose
    full-attention entry is checked) lets the new token see the first ``n`` positions (all of a window's)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.shape[0] != 1 or mask.dim() not in (2, 4):
        return False
    n = min(n, mask.shape[-1])  # a sliding-window mask spans the window's cache only
    row = mask[0, :n] if mask.dim() == 2 else mask[0, 0, -1, :n]
    return bool(row.all()) if row.dtype == torch.bool or mask.dim() == 2 else bool((row == 0).all())


class NativeDecoder:
    """The plan of one model, rebuilt when the model changes, with the reason whenever a step is not native."""

    def __init__(self) -> None:
        self.built: _Built | None = None
        self.reason: str | None = None
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def ensure(self, model: nn.Module) -> _Built | None:
        built = self.built
        if built is not None and self._current(built):
            return built
        with self._lock:
            built = self.built
            if built is not None and self._current(built):
                return built
            try:
                self.built, self.reason = build(model), None
            except Unsupported as error:
                self.built, self.reason = None, str(error)
            except Exception as error:  # noqa: BLE001 - a probe or check that fails: the model's own forward runs
                self.built, self.reason = None, f"the plan could not be built ({type(error).__name__}: {error})"
            return self.built

    @staticmethod
    def _current(built: _Built) -> bool:
        return (_REGISTRATIONS[0] == built.registrations and list(map(_DATA_PTR, built.params)) == built.ptrs
                and all(t._version == v for t, v in built.versions)
                and all(m.threshold == t and m.rotation is r for m, t, r in built.thresholded)
                and all(m.__dict__.get("_spec") is spec and m.training == mode for m, spec, mode in built.act_states))

    def describe(self) -> str:
        if self.built is not None:
            return self.built.summary
        if self.reason is None:
            return "native decode step (its plan is built at the first decode step)"
        return f"model's own forward for every step (native step unavailable: {self.reason})"

    def fallback(self, reason: str) -> None:
        self.counts[reason] += 1

    def step(self, model: nn.Module, args: tuple, kwargs: dict) -> Any | None:
        """The native step's output for this call, or None (the caller runs the model's own forward)."""
        if args:
            if len(args) != 1 or "input_ids" in kwargs:
                return None
            kwargs = {**kwargs, "input_ids": args[0]}
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is None or cache is None or ids.shape != (1, 1) or torch.is_grad_enabled():
            return None
        for key in ("inputs_embeds", "labels", "output_attentions", "output_hidden_states"):
            if kwargs.get(key) not in (None, False):
                self.fallback(f"{key} given")
                return None
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            self.fallback("use_cache=False or return_dict=False")
            return None
        unknown = set(kwargs) - _STEP_KWARGS
        if unknown:
            self.fallback(f"arguments the step does not know ({', '.join(sorted(unknown))})")
            return None
        built = self.ensure(model)
        if built is None:
            self.fallback(self.reason or "no plan")
            return None
        hooked = _hooked(built.modules)  # every step: a hook added between steps must run
        if hooked:
            self.fallback(hooked)
            return None
        from ..activations import scope

        current, draws, seed = scope.current(), None, 0
        if current is not None and any(i in current for i in built.activations):
            if getattr(scope._STATE, "rows", None) is not None:
                self.fallback("per-row generators (uncertainty) draw in the model's own forward")
                return None
            draws = _draw_specs(built, current)
            if isinstance(draws, str):
                self.fallback(f"{draws} draws in the model's own forward")
                return None
            from .. import kernels

            seed = int(kernels.new_seed("cpu"))  # torch's RNG, salted by the distributed rank, as the Python path
        if any(m.is_sampling for m in built.sampling):
            self.fallback("a stochastic activation samples by itself (training mode)")
            return None
        layers = getattr(cache, "layers", None)
        if not layers:
            return None
        first = layers[0]
        length = getattr(first, "cumulative_length_int", None)
        if length is None:
            length = int(first.cumulative_length) if getattr(first, "is_initialized", False) else -1
        position_ids, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")
        where = position_ids if position_ids is not None else cache_position
        position = int(where.reshape(-1)[-1]) if where is not None else length
        if position != length or position < 0:  # left padding shifts the positions: the model's forward masks it
            self.fallback("positions that do not follow the cache (padding)")
            return None
        if not _mask_sees_all(kwargs.get("attention_mask"), position + 1):
            self.fallback("an attention mask that hides cached positions")
            return None
        logits = torch.empty(built.plan.vocab, dtype=torch.float32, device="cpu")
        if not _run(built, cache, int(ids[0, 0]), position, seed, draws, logits):
            self.fallback("the cache is not an initialized static cache with room")
            return None
        self.counts["native"] += 1
        # one token: every choice of logits_to_keep keeps it
        return _output(logits.view(1, 1, -1), cache)


# ---- the model's class gains a forward that tries the native step first ------------------------------------------
_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


def native_class(cls: type) -> type:
    """A subclass of ``cls`` (same name, module and signature) whose ``forward`` runs the native step when it can,
    else ``cls.forward``: the pattern of ``torch.nn.utils.parametrize``, which also gives an instance a generated
    subclass instead of overwriting its ``forward``."""
    if getattr(cls, "_hf_stochact_native_class", False):
        return cls
    with _CLASSES_LOCK:
        if cls in _CLASSES:
            return _CLASSES[cls]
        base_forward = cls.forward

        @functools.wraps(base_forward)
        def forward(self, *args, **kwargs):
            runner = self.__dict__.get("_hf_stochact_native")
            if runner is not None:
                out = runner.step(self, args, kwargs)
                if out is not None:
                    return out
            return base_forward(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, "_hf_stochact_native_class": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                          "__reduce_ex__": _reduce_ex, "__deepcopy__": _deepcopy})
        _CLASSES[cls] = sub
        return sub


def _reduce_ex(self, protocol):
    """Pickled as the original class (the native step is set up again by fast_decode after loading)."""
    state = self.__dict__.copy()
    state.pop("_hf_stochact_native", None)
    return _restore, (type(self).__mro__[1], state)


def _deepcopy(self, memo: dict) -> nn.Module:
    """A deep copy keeps the native step (with a plan of its own, built at its first step)."""
    import copy

    new = object.__new__(type(self))
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        if key != "_hf_stochact_native":
            new.__dict__[key] = copy.deepcopy(value, memo)
    if "_hf_stochact_native" in self.__dict__:
        new.__dict__["_hf_stochact_native"] = NativeDecoder()
    return new


def _restore(cls: type, state: dict) -> nn.Module:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def enable(model: nn.Module) -> NativeDecoder:
    """Give ``model`` the native step (its class becomes :func:`native_class`); build the plan now."""
    runner = model.__dict__.get("_hf_stochact_native")
    if runner is None:
        runner = NativeDecoder()
        model.__dict__["_hf_stochact_native"] = runner
    model.__class__ = native_class(type(model))
    runner.ensure(model)
    return runner


def disable(model: nn.Module) -> None:
    model.__dict__.pop("_hf_stochact_native", None)
    cls = type(model)
    if getattr(cls, "_hf_stochact_native_class", False):
        model.__class__ = cls.__mro__[1]


def runner_of(model: nn.Module) -> NativeDecoder | None:
    return model.__dict__.get("_hf_stochact_native")

