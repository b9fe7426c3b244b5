"""Training-free input sparsity for any model (TEAL, Liu et al. 2024): magnitude thresholds on the inputs of linear
layers, calibrated offline, applied by ``sparsify``.

A linear layer ``y = W x + b`` whose input entries with ``|x_i| <= t`` are set to 0 needs only the columns of ``W``
of the remaining inputs. :func:`calibrate_thresholds` collects the inputs of every linear layer of the transformer
blocks (q/k/v/o, gate/up/down, fc1/fc2, ... found by walking modules; the output embedding is left dense) on a
calibration text, and picks per-layer thresholds:

* ``allocation="uniform"``: every layer at the target sparsity (the ``sparsity``-quantile of its ``|x|``);
* ``allocation="greedy"``: a model-level target, per-layer sparsities chosen greedily at layer level: starting from
  0, repeatedly raise by ``step`` the sparsity of the layer whose measured relative output error
  ``||W (x - m(x))|| / ||W x||`` on the calibration tokens grows least per weight byte skipped, until the skipped
  bytes reach ``sparsity`` of all thresholded weights;
* ``allocation="block"``: TEAL's allocation: every transformer block (the module path up to the first layer
  index, e.g. ``model.layers.3``) reaches ``sparsity`` of its weight bytes; inside it, layers reading the same
  input (q/k/v; gate/up) form one group, and the group whose increment raises the *block's* measured output error
  least per byte skipped is raised by ``step``, the block re-run on captured calibration inputs for every
  candidate.

The result is a :class:`Thresholds` (module path -> threshold) stored in the model config
(``config.sparse_thresholds``), so it is saved with ``save_pretrained`` and found again by ``sparsify`` after
``from_pretrained``. Stock transformers ignores the key.

FFNs with exact ReLU zeros keep the exact path (``SparseMLP``): thresholds are not calibrated for their layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..kernels.reference import magnitude_mask
from ..layouts import PROJECTION_TYPES, find_mlps, relu_kind
from .rotation import ROTATION_FILE, ROTATIONS

CONFIG_FIELD = "sparse_thresholds"
ALLOCATIONS = ("uniform", "greedy", "block")


@dataclasses.dataclass
class Thresholds:
    """Per-layer input thresholds: ``values[path] = t`` (inputs with ``|x| <= t`` count as 0).

    Args:
        values: linear-module path -> threshold (>= 0).
        sparsity: the calibration target (model-level for greedy, per layer for uniform).
        allocation: how the per-layer sparsities were chosen.
        layer_sparsity: the calibrated fraction of zeroed inputs per layer, on the calibration text.
        groups: layers that read the same input tensor (q/k/v, gate/up), found at calibration: ``sparsify``
            computes each group in one call during decoding.
    """

    values: dict[str, float]
    sparsity: float = 0.0
    allocation: str = "uniform"
    layer_sparsity: dict[str, float] = dataclasses.field(default_factory=dict)
    groups: list[list[str]] = dataclasses.field(default_factory=list)
    rotation: str = "none"
    rotated: dict[str, str] = dataclasses.field(default_factory=dict)
    rotation_sha256: str = ""
    rotations: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False,
                                                                             compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rotations"}
        d = {k: (dict(v) if isinstance(v, dict) else [list(g) for g in v] if k == "groups" else v)
             for k, v in d.items()}
        if self.rotation == "none":
            for k in ("rotation", "rotated", "rotation_sha256"):
                d.pop(k)
        return d

    def transform(self, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(R, R⁻¹) of ``path``'s rotation (:mod:`hf_stochact.inference.rotation`), None if it has none.

        Raises:
            ValueError: ``path`` is rotated but the rotations are not loaded (:meth:`resolve_rotations`)."""
        key = self.rotated.get(path)
        if key is None:
            return None
        if key not in self.rotations:
            raise ValueError(f"the rotation of {path!r} is not loaded: sparsify(model) finds the saved file "
                             f"{ROTATION_FILE} next to the model's weights")
        from .rotation import matrices

        cache = self.__dict__.setdefault("_matrices", {})  # one pair per group: its members share the tensors
        q, c = self.rotations[key]
        if key not in cache or cache[key][0] is not q:
            cache[key] = (q, matrices(q, c))
        return cache[key][1]

    def resolve_rotations(self, model: nn.Module) -> None:
        """Attach the rotation tensors these thresholds need: from the model (calibrated in this process) or from
        ``sparse_rotations.safetensors`` in the folder the model was loaded from (checked by SHA-256).

        Raises:
            ValueError: none found, or a file that does not match."""
        if self.rotation == "none" or self.rotations:
            return
        from .rotation import MODEL_ATTRIBUTE, digest, load_rotations

        attached = getattr(model, MODEL_ATTRIBUTE, None)
        if attached and digest(attached) == self.rotation_sha256:
            self.rotations = attached
            return
        folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"these thresholds are rotated ({self.rotation}), but the rotations are not loaded and "
                             f"the model was not loaded from a folder holding {ROTATION_FILE}: pass the Thresholds "
                             "object returned by calibrate_thresholds")
        self.rotations = load_rotations(folder, self.rotation_sha256)
        object.__setattr__(model, MODEL_ATTRIBUTE, self.rotations)  # a later save_pretrained writes them again

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Thresholds:
        if not isinstance(d, dict) or not isinstance(d.get("values"), dict):
            raise ValueError(f"{CONFIG_FIELD} must be a mapping with a 'values' mapping (module path -> threshold), "
                             f"got {type(d).__name__}")
        values = {}
        for path, t in d["values"].items():
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or math.isinf(t):
                raise ValueError(f"{CONFIG_FIELD}.values[{path!r}] must be a finite number >= 0, got {t!r}")
            values[path] = float(t)
        sparsity = d.get("sparsity", 0.0)
        if not _fraction(sparsity):
            raise ValueError(f"{CONFIG_FIELD}.sparsity must be a number in [0, 1], got {sparsity!r}")
        allocation = d.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"{CONFIG_FIELD}.allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        layers = d.get("layer_sparsity", {})
        if not isinstance(layers, dict):
            raise ValueError(f"{CONFIG_FIELD}.layer_sparsity must be a mapping (module path -> fraction), got "
                             f"{type(layers).__name__}")
        for path, v in layers.items():
            if not _fraction(v):
                raise ValueError(f"{CONFIG_FIELD}.layer_sparsity[{path!r}] must be a number in [0, 1], got {v!r}")
        groups = d.get("groups", [])
        if not isinstance(groups, list) or not all(
                isinstance(g, list) and all(isinstance(p, str) and p in values for p in g) for g in groups):
            raise ValueError(f"{CONFIG_FIELD}.groups must be a list of lists of thresholded module paths, got "
                             f"{groups!r}")
        rotation = d.get("rotation", "none")
        if rotation not in ROTATIONS:
            raise ValueError(f"{CONFIG_FIELD}.rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
        rotated = d.get("rotated", {})
        if not isinstance(rotated, dict) or not all(isinstance(k, str) and k in values and isinstance(v, str)
                                                    for k, v in rotated.items()):
            raise ValueError(f"{CONFIG_FIELD}.rotated must map thresholded module paths to rotation names, got "
                             f"{rotated!r}")
        sha = d.get("rotation_sha256", "")
        if rotation != "none" and not (isinstance(sha, str) and len(sha) == 64):
            raise ValueError(f"{CONFIG_FIELD}.rotation_sha256 must be the 64-digit SHA-256 of the rotations, got "
                             f"{sha!r}")
        if rotation == "none" and rotated:
            raise ValueError(f"{CONFIG_FIELD}.rotated names layers, but rotation is 'none'")
        return cls(values, float(sparsity), allocation, {k: float(v) for k, v in layers.items()},
                   [list(g) for g in groups], rotation, dict(rotated), sha if rotation != "none" else "")

    def save_to_config(self, model: nn.Module) -> None:
        setattr(model.config, CONFIG_FIELD, self.to_dict())
        if self.rotations:
            from .rotation import MODEL_ATTRIBUTE

            object.__setattr__(model, MODEL_ATTRIBUTE, self.rotations)  # save_pretrained writes them

    @classmethod
    def from_config(cls, model: nn.Module) -> Thresholds | None:
        d = getattr(getattr(model, "config", None), CONFIG_FIELD, None)
        return None if d is None else cls.from_dict(d)

    def weighted_sparsity(self, model: nn.Module) -> float:
        """Calibrated zero fraction of all thresholded inputs, weighted by the weight bytes each input reads."""
        sizes = {path: _weight_numel(model.get_submodule(path)) for path in self.layer_sparsity}
        total = sum(sizes.values())
        return sum(self.layer_sparsity[p] * n for p, n in sizes.items()) / total if total else 0.0


def _fraction(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0


def _weight_numel(layer: nn.Module) -> int:
    layer = getattr(layer, "wrapped", layer)
    return layer.weight.numel()


def thresholdable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers whose inputs get thresholds: every ``nn.Linear``/``Conv1D`` except the output embedding
    and the projections of ReLU FFNs (exact zeros there: ``SparseMLP``)."""
    skip: set[int] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        skip.update((id(out), id(getattr(out, "wrapped", out))))  # sparsify's RowsHead stands in for it
    for mlp in find_mlps(model):
        if relu_kind(mlp.activation) is not None:
            skip.update(id(m) for m in (mlp.pre, mlp.up, mlp.down) if m is not None)
    layers = []
    for path, module in model.named_modules():
        inner = getattr(module, "wrapped", module)
        if isinstance(inner, PROJECTION_TYPES) and id(inner) not in skip and id(module) not in skip:
            layers.append((path, module))
    return layers


def _check(sparsity: float, allocation: str, step: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 0.5:
        raise ValueError(f"step must be a number in (0, 0.5], got {step!r}")


@torch.no_grad()
def input_groups(model: nn.Module, layers: list[tuple[str, nn.Module]], input_ids: torch.Tensor,
                 tokens: int = 4) -> list[list[str]]:
    """The layers (paths, in call order) that read the very same input tensor in a forward pass (q/k/v; gate/up):
    groups of two or more, found on a short prefix of the first window. Inputs are held for the pass and compared
    by identity, so a freed tensor whose id is reused cannot merge two groups."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_pre_hook(lambda mod, args, path=path: seen.append((path, args[0])))
               for path, module in layers]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids[:1, :tokens].to(next(model.parameters()).device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    owner: list[tuple[torch.Tensor, list[str]]] = []
    for path, x in seen:
        group = next((g for t, g in owner if t is x), None)
        if group is None:
            owner.append((x, [path]))
        elif path not in group:
            group.append(path)
    return [g for _, g in owner if len(g) > 1]


@torch.no_grad()
def _collect(model: nn.Module, layers: list[tuple[str, nn.Module]], input_ids: torch.Tensor, max_tokens: int,
             seed: int) -> dict[str, torch.Tensor]:
    """Up to ``max_tokens`` input rows [N, d_in] (float32) per layer, sampled evenly over the calibration tokens."""
    rows: dict[str, list[torch.Tensor]] = {path: [] for path, _ in layers}

    def hook(mod, args, path):
        rows[path].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

    handles = [module.register_forward_pre_hook(lambda mod, args, path=path: hook(mod, args, path))
               for path, module in layers]
    was_training = model.training
    model.eval()
    try:
        for window in input_ids:
            model(input_ids=window[None].to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = {}
    for path, parts in rows.items():
        x = torch.cat(parts).cpu()
        if len(x) > max_tokens:  # the same rows for every layer: layers reading one input get one threshold
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_tokens]]
        out[path] = x
    return out


def _quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of ``values`` (a flat float tensor; 0 for q = 0)."""
    if q <= 0:
        return 0.0
    k = min(len(values) - 1, max(0, int(math.ceil(q * len(values))) - 1))
    return float(values.kthvalue(k + 1).values)


def _relative_errors(x: torch.Tensor, weight: torch.Tensor, levels: list[float]) -> tuple[list[float], list[float]]:
    """Thresholds at the given sparsity levels and the relative output error ``||W(x - m(x))|| / ||Wx||`` of each."""
    w = weight.detach().float()
    dense = x @ w.t()
    norm = float(dense.norm()) or 1.0
    mags = x.abs().flatten()
    thresholds, errors = [], []
    for level in levels:
        t = _quantile(mags, level)
        dropped = torch.where(x.abs() <= t, x, torch.zeros((), dtype=x.dtype)) if level > 0 else torch.zeros_like(x)
        thresholds.append(t)
        errors.append(float((dropped @ w.t()).norm()) / norm)
    return thresholds, errors


def _levels(step: float) -> list[float]:
    """The sparsity grid the greedy allocations climb: 0, step, 2 step, ... up to 0.95."""
    return [round(i * step, 6) for i in range(int(round(0.95 / step)) + 1)]


def block_of(path: str) -> str:
    """The transformer block holding ``path``: the path up to its first numeric component (``""``: none)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _masked(x: torch.Tensor, t: float, transform: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The input a thresholded layer computes with, in its original basis: ``m(x)``, or ``m(x R) R⁻¹`` rotated."""
    if transform is None:
        return magnitude_mask(x, t)
    r, r_inv = transform
    return (magnitude_mask(x.float() @ r, t) @ r_inv).to(x.dtype)


@torch.no_grad()
def _block_allocation(model: nn.Module, modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
                      sources: dict[str, int], input_ids: torch.Tensor, sparsity: float, step: float,
                      eval_tokens: int, transforms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """TEAL's per-block greedy allocation: the level index (multiple of ``step``) chosen for every layer."""
    levels = _levels(step)
    table = {p: [_quantile(x.abs().flatten(), lv) for lv in levels] for p, x in inputs.items()}
    blocks: dict[str, list[str]] = {}
    for path in inputs:
        blocks.setdefault(block_of(path), []).append(path)
    captured: dict[str, list] = {b: [] for b in blocks}
    handles = []
    for b in blocks:
        block = model.get_submodule(b) if b else model
        handles.append(block.register_forward_hook(
            lambda mod, args, kwargs, out, b=b: captured[b].append((args, kwargs, _first(out).detach())),
            with_kwargs=True))
    width = max(1, min(input_ids.shape[1], eval_tokens))
    rows = max(1, min(len(input_ids), eval_tokens // width))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for window in input_ids[:rows, :width]:
            model(input_ids=window[None].to(device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    chosen: dict[str, int] = {}
    for b, paths in blocks.items():
        block = model.get_submodule(b) if b else model
        groups: dict[int, list[str]] = {}
        for path in paths:
            groups.setdefault(sources.get(path, id(path)), []).append(path)
        group_list = list(groups.values())
        at = [0] * len(group_list)
        sizes = [sum(_weight_numel(modules[p]) for p in g) for g in group_list]
        total = sum(sizes)
        current = {p: 0.0 for p in paths}
        hooks = [modules[p].register_forward_pre_hook(
            lambda mod, args, p=p, current=current: (_masked(args[0], current[p], transforms.get(p)), *args[1:])
            if current[p] > 0 else None)
            for p in paths]

        def error(block: nn.Module = block, runs: list = captured[b]) -> float:
            num = den = 0.0
            for args, kwargs, dense in runs:
                y = _first(block(*args, **kwargs))
                num += float((y - dense).float().pow(2).sum())
                den += float(dense.float().pow(2).sum())
            return num / (den or 1.0)

        try:
            err, skipped = 0.0, 0.0
            while skipped < sparsity * total:
                best, best_cost, best_err = None, math.inf, err
                for gi, group in enumerate(group_list):
                    if at[gi] + 1 >= len(levels):
                        continue
                    for p in group:
                        current[p] = table[p][at[gi] + 1]
                    e = error()
                    for p in group:
                        current[p] = table[p][at[gi]]
                    cost = (e - err) / (sizes[gi] * step)
                    if cost < best_cost:
                        best, best_cost, best_err = gi, cost, e
                if best is None:
                    break
                at[best] += 1
                for p in group_list[best]:
                    current[p] = table[p][at[best]]
                err = best_err
                skipped += sizes[best] * step
        finally:
            for h in hooks:
                h.remove()
        for gi, group in enumerate(group_list):
            for p in group:
                chosen[p] = at[gi]
    return chosen


def calibrate_thresholds(model: nn.Module, input_ids: torch.Tensor, sparsity: float = 0.4, *,
                         allocation: str = "greedy", step: float = 0.05, max_tokens: int = 512, seed: int = 0,
                         eval_tokens: int = 512, rotate: str = "none", save: bool = True) -> Thresholds:
    """Per-layer input thresholds reaching ``sparsity`` (see the module docstring), stored in ``model.config``
    unless ``save=False``.

    Args:
        model: a transformers model (any architecture: layers are found by walking modules).
        input_ids: calibration windows, [N, T] token ids (e.g. 8 x 512 tokens of training text).
        sparsity: target fraction of zeroed inputs, in [0, 1) (greedy: weighted by the weight bytes skipped).
        allocation: ``"uniform"``, ``"greedy"`` or ``"block"``.
        step: greedy's sparsity increment per layer, in (0, 0.5].
        max_tokens: calibration rows kept per layer (sampled over all tokens).
        eval_tokens: ``"block"`` only: calibration tokens each block is re-run on per candidate.
        rotate: ``"none"``; ``"pca"``: rotate the inputs of the groups whose weights outweigh a ``d_in x d_in``
            rotation (q/k/v, gate/up) into their principal components, weighted by the rotated weights' column
            norms, before thresholding (:mod:`hf_stochact.inference.rotation`: LaRoSA + WINA; exact with every
            input kept); ``"pca-all"``: every thresholded layer. The covariances use every calibration token.

    Raises:
        ValueError: bad arguments (the message names them), or no layer to threshold.
    """
    _check(sparsity, allocation, step)
    for name, value in (("max_tokens", max_tokens), ("eval_tokens", eval_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {', '.join(ROTATIONS)}, got {rotate!r}")
    if any(getattr(m, "rotation", None) is not None for m in model.modules() if hasattr(m, "wrapped")):
        raise ValueError("calibrate_thresholds: the model runs rotated thresholds; unsparsify(model) first")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0 \
            or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError("input_ids must be a non-empty [N, T] tensor of integer token ids")
    layers = thresholdable_layers(model)
    if not layers:
        raise ValueError(f"calibrate_thresholds: no linear layer to threshold in {type(model).__name__}")
    with _thresholds_off(model):  # on a sparsified model: calibrate on the dense inputs, as the first time
        groups = input_groups(model, layers, input_ids)
        sources = {p: i for i, g in enumerate(groups) for p in g}
        sources.update({p: -1 - i for i, (p, _) in enumerate(layers) if p not in sources})
        inputs = _collect(model, layers, input_ids, max_tokens, seed)
        modules = dict(layers)
        rotations, rotated = ({}, {}) if rotate == "none" else _rotations(model, layers, groups, input_ids, rotate)
        transforms = {}
        if rotated:
            from .rotation import matrices

            for path, key in rotated.items():
                transforms[path] = matrices(*rotations[key])
                inputs[path] = inputs[path] @ transforms[path][0]
        result = _allocate(model, modules, inputs, sources, input_ids, sparsity, allocation, step, eval_tokens,
                           transforms)
    result.groups = groups
    if rotate != "none":
        from .rotation import digest

        result.rotation, result.rotated, result.rotations = rotate, rotated, rotations
        result.rotation_sha256 = digest(rotations)
    if save:
        result.save_to_config(model)
    return result


@contextlib.contextmanager
def _thresholds_off(model: nn.Module) -> Iterator[None]:
    """Within the block, thresholded layers of a sparsified model keep every input (threshold 0: the exact product)
    — an offline step: a model being calibrated must not serve requests meanwhile."""
    saved = [(m, m.threshold) for m in model.modules() if hasattr(m, "wrapped") and isinstance(
        getattr(m, "threshold", None), float)]
    for m, _ in saved:
        m.threshold = 0.0
    try:
        yield
    finally:
        for m, t in saved:
            m.threshold = t


@torch.no_grad()
def _rotations(model: nn.Module, layers: list[tuple[str, nn.Module]], groups: list[list[str]], input_ids: torch.Tensor,
               rotate: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, str]]:
    """(group key -> (Q, c), path -> group key) for the groups ``rotate`` selects: covariances of their inputs over
    every calibration token."""
    from .rotation import pca_rotation

    modules = dict(layers)
    grouped = {p for g in groups for p in g}
    candidates = [list(g) for g in groups] + [[p] for p, _ in layers if p not in grouped]
    chosen = []
    for g in candidates:
        weights = [_out_in(modules[p]) for p in g]
        d_in = weights[0].shape[1]
        if rotate == "pca-all" or sum(w.numel() for w in weights) > d_in * d_in:
            chosen.append((g, weights))
    covs: dict[str, torch.Tensor] = {g[0]: torch.zeros(w[0].shape[1], w[0].shape[1], dtype=torch.float64)
                                     for g, w in chosen}

    def hook(mod, args, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        covs[key].addmm_(x.t(), x)

    handles = [modules[g[0]].register_forward_pre_hook(lambda mod, args, key=g[0]: hook(mod, args, key))
               for g, _ in chosen]
    was_training = model.training
    model.eval()
    try:
        for window in input_ids:
            model(input_ids=window[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rotations, rotated = {}, {}
    for g, weights in chosen:
        rotations[g[0]] = pca_rotation(covs[g[0]], torch.cat(weights).double())
        rotated.update({p: g[0] for p in g})
    return rotations, rotated


def _out_in(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as [out, in] (Conv1D's is stored [in, out])."""
    w = _inner(layer).weight.detach()
    return w.t() if _is_conv1d(layer) else w


def _allocate(model: nn.Module, modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor],
              sources: dict[str, int], input_ids: torch.Tensor, sparsity: float, allocation: str, step: float,
              eval_tokens: int, transforms: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> Thresholds:
    """The per-layer thresholds of one allocation, from the collected calibration inputs (rotated where
    ``transforms`` has the layer's (R, R⁻¹))."""
    transforms = transforms or {}
    if allocation == "block" and sparsity > 0.0:
        step_levels = _levels(step)
        at = _block_allocation(model, modules, inputs, sources, input_ids, sparsity, step, eval_tokens, transforms)
        values = {p: _quantile(x.abs().flatten(), step_levels[at[p]]) for p, x in inputs.items()}
        chosen = {p: float((inputs[p].abs() <= values[p]).float().mean()) if at[p] else 0.0 for p in inputs}
        result = Thresholds(values, float(sparsity), allocation, chosen)
    elif allocation == "uniform" or sparsity == 0.0:
        values, chosen = {}, {}
        for path, x in inputs.items():
            values[path] = _quantile(x.abs().flatten(), sparsity)
            chosen[path] = float((x.abs() <= values[path]).float().mean()) if sparsity > 0 else 0.0
        result = Thresholds(values, float(sparsity), allocation, chosen)
    else:
        levels = _levels(step)
        tables = {path: _relative_errors(x, _out_in(modules[path]) if path not in transforms else
                                         _out_in(modules[path]).float() @ transforms[path][1].t(), levels)
                  for path, x in inputs.items()}
        sizes = {path: _weight_numel(modules[path]) for path in inputs}
        total = sum(sizes.values())
        at = dict.fromkeys(inputs, 0)
        skipped = 0.0
        while skipped < sparsity * total:
            best, best_cost = None, math.inf
            for path, i in at.items():
                if i + 1 >= len(levels):
                    continue
                errors = tables[path][1]
                cost = (errors[i + 1] ** 2 - errors[i] ** 2) / (sizes[path] * (levels[i + 1] - levels[i]))
                if cost < best_cost:
                    best, best_cost = path, cost
            if best is None:
                break
            at[best] += 1
            skipped += sizes[best] * (levels[at[best]] - levels[at[best] - 1])
        values = {path: tables[path][0][i] for path, i in at.items()}
        chosen = {path: float((inputs[path].abs() <= values[path]).float().mean()) if at[path] else 0.0
                  for path in inputs}
        result = Thresholds(values, float(sparsity), allocation, chosen)
    return result


def _inner(layer: nn.Module) -> nn.Module:
    return getattr(layer, "wrapped", layer)


def _is_conv1d(layer: nn.Module) -> bool:
    return not isinstance(_inner(layer), nn.Linear)
