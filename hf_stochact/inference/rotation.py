"""Rotated input sparsity (LaRoSA, Liu et al. 2025, with WINA's weight-aware criterion, Chen et al. 2025): before a
layer group's input is thresholded, it is rotated into the principal-component basis of that input on the
calibration text, so that a token's energy sits in fewer coordinates and a magnitude threshold at the same
sparsity drops much less of it.

For a group of linear layers reading one input ``x`` (q/k/v, gate/up, or a single layer), with ``Q`` the
eigenvectors of ``E[xᵀx]`` (an orthogonal matrix) and ``c_i = ‖W_group Q[:, i]‖`` the column norms of the group's
stacked rotated weights (WINA: an input matters as much as the weights it multiplies):

* the input is ``x' = x R`` with ``R = Q diag(c)``; the threshold keeps ``|x'_i| = |x Q|_i · c_i`` (rotated
  magnitude times column norm);
* each member's weight is ``W'' = W R⁻ᵀ = W Q diag(1/c)``, so ``x' W''ᵀ = x Wᵀ``: with every input kept the
  output is the original one, up to float rounding (tests check logits at sparsity 0).

The rotation is applied at run time (one dense ``d_in x d_in`` product per group and token), so it pays only where
the group's weights are large next to it: ``rotate="pca"`` rotates the groups whose stacked weights have more
entries than ``d_in²`` (for Llama-style blocks: q/k/v and gate/up, the readers of the residual stream), and
``"pca-all"`` every thresholded layer (best quality, slower than dense: docs/frontier.md measures both).

Storage: ``Q`` and ``c`` per group (float32) in ``sparse_rotations.safetensors`` next to the model's weights,
written by ``save_pretrained`` (hf_stochact wraps it) and found again by ``sparsify`` after ``from_pretrained``
(the folder is ``config._name_or_path``); the thresholds in ``config.json`` record the file's SHA-256, and a file
that does not match is refused. The checkpoint's own weights stay in the original basis: stock transformers loads
and runs the dense model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

ROTATIONS = ("none", "pca", "pca-all")
ROTATION_FILE = "sparse_rotations.safetensors"
MODEL_ATTRIBUTE = "_hf_stochact_rotations"


def pca_rotation(cov: torch.Tensor, weight: torch.Tensor, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, c): the eigenvectors of the input covariance ``cov`` [d, d], largest first, and the column norms of
    ``weight`` [out, d] (the group's stacked weights) in that basis (ones when not ``weighted``), both float32."""
    _, q = torch.linalg.eigh(cov.double())
    q = q.flip(1)
    if weighted:
        c = (weight.double() @ q).norm(dim=0)
        c = c.clamp_min(float(c.max()) * 1e-4 if float(c.max()) > 0 else 1.0)
    else:
        c = torch.ones(q.shape[1], dtype=torch.float64)
    return q.float().contiguous(), c.float().contiguous()


def matrices(q: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R⁻¹) = (Q diag(c), diag(1/c) Qᵀ), float32."""
    return (q * c[None, :]).contiguous(), (q / c[None, :]).t().contiguous()


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x R`` in float32 (x's dtype back)."""
    return (x.float() @ r).to(x.dtype) if x.dtype != torch.float32 else x @ r


def rotated_weight(w: torch.Tensor, r_inv: torch.Tensor) -> torch.Tensor:
    """``W R⁻ᵀ`` for an [out, in] weight (computed in float64, in ``w``'s dtype)."""
    return (w.double() @ r_inv.double().t()).to(w.dtype)


def original_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``W'' Rᵀ``: the weight in the original basis again."""
    return (w.double() @ r.double().t()).to(w.dtype)


def digest(rotations: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """SHA-256 of the rotations (names, shapes and float32 bytes, in name order)."""
    h = hashlib.sha256()
    for key in sorted(rotations):
        for part in rotations[key]:
            t = part.detach().float().contiguous().cpu()
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_rotations(rotations: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: str | os.PathLike) -> Path:
    """Write ``rotations`` (group key -> (Q, c)) to ``folder/sparse_rotations.safetensors``."""
    from safetensors.torch import save_file

    path = Path(folder) / ROTATION_FILE
    tensors = {}
    for key, (q, c) in rotations.items():
        tensors[f"{key}.q"] = q.detach().float().contiguous().cpu()
        tensors[f"{key}.c"] = c.detach().float().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "hf_stochact rotations", "sha256": digest(rotations)})
    return path


def check_rotation(q: torch.Tensor, c: torch.Tensor) -> str:
    """What is wrong with a rotation (``q`` orthogonal [d, d], ``c`` positive scales [d]), or '' (fine): shapes,
    floating dtypes, finite values, positive scales, ``qᵀq = I`` within 1e-3 (a file with a matching checksum but bad
    content must not reach the model: NaN logits or a model left half-sparsified)."""
    if not (q.is_floating_point() and c.is_floating_point()):
        return f"not floating point ({q.dtype}, {c.dtype})"
    if q.dim() != 2 or q.shape[0] != q.shape[1] or c.shape != (q.shape[0],):
        return f"shapes {tuple(q.shape)} and {tuple(c.shape)} (expected [d, d] and [d])"
    if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(c).all())):
        return "non-finite values"
    if not bool((c > 0).all()):
        return "scales that are not positive"
    qd = q.double()
    error = (qd.t() @ qd - torch.eye(q.shape[0], dtype=torch.float64)).abs().max().item()
    if error > 1e-3:
        return f"not orthogonal (|qᵀq - I| up to {error:.3g})"
    return ""


def load_rotations(folder: str | os.PathLike, expected: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rotations in ``folder/sparse_rotations.safetensors``, checked against the SHA-256 ``expected``.

    Raises:
        ValueError: no such file, a malformed file, or a digest that does not match (a file from another
            calibration: its rotations would not fit these thresholds).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / ROTATION_FILE
    if not path.is_file():
        raise ValueError(f"these thresholds are rotated (calibrate_thresholds(rotate=...)), but there is no {path}: "
                         "save the model with save_pretrained after calibrating, or pass the Thresholds object")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    rotations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in tensors:
        key, _, part = name.rpartition(".")
        if part not in ("q", "c") or f"{key}.q" not in tensors or f"{key}.c" not in tensors:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
        q, c = tensors[f"{key}.q"], tensors[f"{key}.c"]
        problem = check_rotation(q, c)
        if problem:
            raise ValueError(f"{path}: malformed rotation for {key!r}: {problem}")
        rotations[key] = (q, c)
    if digest(rotations) != expected:
        raise ValueError(f"{path} does not match these thresholds (SHA-256 differs): it belongs to another "
                         "calibration; recalibrate, or save the model again")
    return rotations



def to_save(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The rotations ``save_pretrained`` must write next to ``model``'s weights: those its config's thresholds name
    (None: no rotated thresholds).

    Raises:
        ValueError: the config names rotations whose tensors this model does not hold (saving would write a model
            whose thresholds cannot be applied)."""
    d = getattr(getattr(model, "config", None), "sparse_thresholds", None)
    if not isinstance(d, dict) or d.get("rotation", "none") == "none":
        return None
    rotations = getattr(model, MODEL_ATTRIBUTE, None)
    expected = d.get("rotation_sha256")
    if not rotations or digest(rotations) != expected:
        # loaded with from_pretrained and saved again before sparsify: the rotations travel from the source folder
        folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if folder and os.path.isdir(folder) and (Path(folder) / ROTATION_FILE).is_file():
            rotations = load_rotations(folder, expected)
            object.__setattr__(model, MODEL_ATTRIBUTE, rotations)
            return rotations
        raise ValueError("save_pretrained: config.sparse_thresholds names rotations this model does not hold and "
                         f"its source folder has no {ROTATION_FILE}: calibrate_thresholds(..., rotate=...) on this "
                         "model again, or drop the thresholds (del model.config.sparse_thresholds)")
    return rotations


def write_rotations(rotations: dict | None, folder: str | os.PathLike) -> Path | None:
    """Write ``rotations`` to ``folder`` (None: remove a stale rotation file from an earlier save there)."""
    if rotations is None:
        stale = Path(folder) / ROTATION_FILE
        if stale.is_file():
            stale.unlink()
        return None
    return save_rotations(rotations, folder)
