"""Uncertainty from stochastic activations: MC-dropout-style scores for models trained without dropout.

Each sample is one forward of the model with its FFN activations drawn at random, by the rules of stochastic
decoding (:mod:`hf_stochact.inference.decoding`: a stochastic model draws by its own spec, a ReLU/relufied model by
the paper's StochA rule, a SiLU or other model mixes its activation with ReLU); ``p`` is ``stochastic_p``, the
probability of the smooth branch. With S samples of next-token distributions p_1..p_S at a position (nats):

* predictive entropy  PE = H[(1/S) sum_s p_s]       (total uncertainty of the averaged distribution)
* expected entropy    EE = (1/S) sum_s H[p_s]       (what each sampled model is unsure about)
* mutual information  MI = PE - EE >= 0             (how much the samples disagree: the BALD score)

plus, from one extra deterministic forward at no other cost: the softmax entropy and max-probability of the
model's own deterministic distribution, its greedy token, and the log-probability of the next input token.

Samples and seeds: sample s is *defined* as a batch-of-one forward in which every drawing FFN activation takes its
seeds, layer after layer, from its own ``torch.Generator`` seeded from (``seed``, s). Forwards are batched
(``batch_size`` samples per forward), each row drawing from its own generator
(:func:`hf_stochact.activations.scope.row_generators`), so results do not depend on ``batch_size`` (up to float
rounding of batched matmuls), and the first k samples of an S-sample run are a k-sample run. ``seed=None`` draws
the base seed from torch's RNG: ``torch.manual_seed`` reproduces a call.

Memory: one forward holds ``batch_size x positions x vocab`` float32 logits (only the scored positions are
computed where the model's forward takes ``logits_to_keep``), plus one ``positions x vocab`` running sum of
probabilities; entropies are computed from the log-softmax of blocks of positions. Positions are not split
across forwards (that would drop attention context); score very long texts in windows.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..activations import scope
from ..activations.stochastic import check_probability
from ..inference.decoding import stochastic_decoding

#: Scores of :class:`Uncertainty` (per-position tensors), in the order summaries list them.
SCORES = ("mutual_information", "predictive_entropy", "expected_entropy", "disagreement", "entropy",
          "max_probability")
_LOGITS_BUDGET = 512 * 2**20  # bytes of float32 logits per forward when batch_size is automatic
_POSITION_BLOCK = 256  # positions per log-softmax block


@dataclasses.dataclass(frozen=True)
class Uncertainty:
    """Per-position uncertainty of one sequence. Every tensor is 1-D over the n scored positions (CPU; nats).

    ``positions[i]`` is the index t of the input position whose next-token distribution row i describes, and
    ``tokens[i]`` the token that follows it in the input (-1 past the end).
    """

    positions: torch.Tensor  # int64
    tokens: torch.Tensor  # int64, -1 where the input ends
    predictive_entropy: torch.Tensor  # H of the mean of the sampled distributions
    expected_entropy: torch.Tensor  # mean of the sampled distributions' entropies
    mutual_information: torch.Tensor  # PE - EE (clamped at 0 against rounding): BALD
    disagreement: torch.Tensor  # fraction of samples whose argmax is not the deterministic greedy token
    entropy: torch.Tensor  # softmax entropy of the deterministic forward
    max_probability: torch.Tensor  # max softmax probability of the deterministic forward
    greedy: torch.Tensor  # int64, argmax of the deterministic forward
    log_probability: torch.Tensor  # deterministic log p(next input token); nan past the end
    samples: int
    p: float | None  # stochastic_p (None: each FFN kind's default)
    seed: int  # base seed of the samples' generators

    def summary(self) -> dict[str, float]:
        """Sequence-level aggregates: ``mean_<score>`` for every score, ``max_mutual_information``,
        ``mean_nll`` (deterministic, over positions with a next token) and ``greedy_accuracy`` (greedy token ==
        next input token, same positions)."""
        out = {f"mean_{name}": float(getattr(self, name).mean()) for name in SCORES}
        out["max_mutual_information"] = float(self.mutual_information.max())
        known = self.tokens >= 0
        out["mean_nll"] = float(-self.log_probability[known].mean()) if known.any() else math.nan
        out["greedy_accuracy"] = float((self.greedy[known] == self.tokens[known]).float().mean()) \
            if known.any() else math.nan
        out["positions"] = int(self.positions.numel())
        return out

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON-ready)."""
        return {f.name: (v.tolist() if isinstance(v, torch.Tensor) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def uncertainty(model: nn.Module, input_ids: torch.Tensor, samples: int = 8, p: float | None = None, *,
                prompt_length: int = 0, seed: int | None = None, batch_size: int | None = None) -> Uncertainty:
    """Per-token uncertainty of ``input_ids`` under ``samples`` stochastic-activation forwards of ``model``.

    Args:
        model: a causal LM in eval mode (any model stochastic decoding covers: its ``forward`` returns ``logits``).
        input_ids: one sequence, shape ``[T]`` or ``[1, T]``, int64.
        samples: number of stochastic forwards S (>= 1); cost is S + 1 forwards.
        p: ``stochastic_p``, the probability of the smooth branch (SiLU / the model's own activation; for ReLU
            models, of SiLU on negative inputs); None = each FFN kind's default (0.9 SiLU/other, 0.5 ReLU).
        prompt_length: 0 scores every position (the last one predicts past the input); k >= 1 scores only the
            positions that predict ``input_ids[k:]`` (a finished generation: prompt + generated ids, k = prompt
            length), so row i is generated token i.
        seed: base seed of the samples' generators; None draws it from torch's RNG.
        batch_size: samples per forward; None keeps one forward's logits under about 512 MiB. Results do not
            depend on it.

    Raises:
        ValueError: naming the argument: ``samples`` < 1 or not an int, ``p`` outside [0, 1], ``input_ids`` not
            one sequence of integer ids, ``prompt_length`` outside [0, T - 1], ``batch_size`` < 1, the model in
            training mode; or ``model`` has no FFN activation module.
    """
    return uncertainty_curve(model, input_ids, (samples,), p, prompt_length=prompt_length, seed=seed,
                             batch_size=batch_size)[samples]


def uncertainty_curve(model: nn.Module, input_ids: torch.Tensor, counts: Sequence[int] = (2, 4, 8, 16),
                      p: float | None = None, *, prompt_length: int = 0, seed: int | None = None,
                      batch_size: int | None = None) -> dict[int, Uncertainty]:
    """:func:`uncertainty` for several sample counts in one pass of ``max(counts)`` samples: {count: result}, the
    result for k being exactly a k-sample call with the same seed (how many samples are needed?)."""
    counts = _check_counts(counts)
    if p is not None:
        p = check_probability("p", p)
    ids = _check_ids(input_ids)
    total = ids.shape[1]
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or not 0 <= prompt_length < total:
        raise ValueError(f"prompt_length must be an int in [0, {total - 1}] (0 scores every position; k scores the "
                         f"tokens from index k on), got {prompt_length!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 (samples per forward) or None, got {batch_size!r}")
    if model.training:
        raise ValueError("model is in training mode (dropout and training-mode activations would sample in the "
                         "deterministic forward too): call model.eval() first")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    device = next(model.parameters()).device
    ids = ids.to(device)
    first = max(prompt_length - 1, 0)  # first scored position
    last = total - 1 if prompt_length else total  # one past the last scored position
    n = last - first
    forward = _forward(model, ids, first, last)

    with torch.inference_mode():
        base = forward(ids)[0].float()  # [n, V]
    vocab = base.shape[-1]
    entropy = torch.empty(n)
    max_prob = torch.empty(n)
    for blk in _blocks(n):
        lp = torch.log_softmax(base[blk], -1)
        entropy[blk] = -(lp.exp() * lp).sum(-1).cpu()
        max_prob[blk] = lp.max(-1).values.exp().cpu()
    greedy = base.argmax(-1)
    nxt = torch.full((n,), -1, dtype=torch.long)
    ahead = min(last, total - 1) - first
    nxt[:ahead] = ids[0, first + 1:first + 1 + ahead].cpu()
    log_prob = torch.full((n,), math.nan)
    if ahead:
        log_prob[:ahead] = torch.log_softmax(base[:ahead], -1).gather(-1, nxt[:ahead, None].to(device))[:, 0].cpu()
    del base

    per_forward = batch_size or max(1, min(counts[-1], _LOGITS_BUDGET // max(1, 4 * n * vocab)))
    prob_sum = torch.zeros(n, vocab, device=device)
    entropy_sum = torch.zeros(n)
    disagree = torch.zeros(n)
    done = 0
    results = {}
    with torch.inference_mode(), stochastic_decoding(model, p):
        for count in counts:
            while done < count:
                rows = min(per_forward, count - done)
                generators = [_sample_generator(seed, s) for s in range(done, done + rows)]
                with scope.row_generators(generators):
                    logits = forward(ids.expand(rows, -1))
                for blk in _blocks(n):
                    lp = torch.log_softmax(logits[:, blk].float(), -1)  # [rows, block, V]
                    probs = lp.exp()
                    prob_sum[blk] += probs.sum(0)
                    entropy_sum[blk] += -(probs * lp).sum(-1).sum(0).cpu()
                    disagree[blk] += (lp.argmax(-1) != greedy[blk]).sum(0).cpu().float()
                del logits
                done += rows
            pe = torch.empty(n)
            for blk in _blocks(n):
                mean = prob_sum[blk] / count
                pe[blk] = -torch.special.xlogy(mean, mean).sum(-1).cpu()
            ee = entropy_sum / count
            results[count] = Uncertainty(
                positions=torch.arange(first, last), tokens=nxt, predictive_entropy=pe, expected_entropy=ee,
                mutual_information=(pe - ee).clamp_min(0.0), disagreement=disagree / count, entropy=entropy,
                max_probability=max_prob, greedy=greedy.cpu(), log_probability=log_prob, samples=count, p=p,
                seed=seed)
    return results


def uncertainty_of_generation(model: nn.Module, sequences: torch.Tensor, prompt_length: int, samples: int = 8,
                              p: float | None = None, *, pad_token_id: int | None = None, seed: int | None = None,
                              batch_size: int | None = None) -> list[Uncertainty]:
    """Scores of the generated tokens of ``generate``'s output ``sequences`` ``[B, T]`` (prompt of
    ``prompt_length`` tokens, unpadded on the left): one :class:`Uncertainty` per row, trailing ``pad_token_id``
    removed (a row that stopped early), row b seeded with ``seed + b`` (``seed`` None: drawn from torch's RNG).

    Raises:
        ValueError: as :func:`uncertainty`; ``sequences`` not ``[B, T]``; a row with no generated token.
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences must be generate's output, a [batch, length] tensor, got "
                         f"{getattr(sequences, 'shape', type(sequences).__name__)}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    out = []
    for b, row in enumerate(sequences):
        end = row.shape[0]
        if pad_token_id is not None:
            while end > prompt_length and int(row[end - 1]) == pad_token_id:
                end -= 1
        if end <= prompt_length:
            raise ValueError(f"sequences row {b} has no generated token after prompt_length={prompt_length}")
        out.append(uncertainty(model, row[:end], samples, p, prompt_length=prompt_length, seed=seed + b,
                               batch_size=batch_size))
    return out


# ---------------------------------------------------------------------------------------------------------------


def _check_counts(counts: Sequence[int]) -> tuple[int, ...]:
    values = (counts,) if isinstance(counts, int) else tuple(counts)
    if not values or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in values):
        raise ValueError(f"samples must be an int >= 1 (stochastic forwards), got {counts!r}")
    return tuple(sorted(set(values)))


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence, shape [T] or [1, T], got {tuple(input_ids.shape)} "
                         "(score a batch row by row, e.g. uncertainty_of_generation for generate's output)")
    if ids.shape[1] < 1:
        raise ValueError("input_ids is empty: at least one token is needed")
    return ids.long()


def _sample_generator(seed: int, sample: int) -> torch.Generator:
    """Sample ``sample``'s generator: seeded from (seed, sample) through splitmix64, so neighbours are unrelated."""
    z = (seed + 0x9E3779B97F4A7C15 * (sample + 1)) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return torch.Generator().manual_seed((z ^ (z >> 31)) >> 1)


def _blocks(n: int) -> list[slice]:
    return [slice(i, min(i + _POSITION_BLOCK, n)) for i in range(0, n, _POSITION_BLOCK)]


def _forward(model: nn.Module, ids: torch.Tensor, first: int, last: int):
    """``f(batch) -> logits [rows, last - first, V]`` of positions first..last-1, computing only the kept positions'
    logits where the model's forward takes ``logits_to_keep``."""
    total = ids.shape[1]
    keep = {"logits_to_keep": total - first} if _takes_logits_to_keep(type(model)) else {}

    def run(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch, use_cache=False, **keep).logits
        start = first - (total - logits.shape[1])  # logits_to_keep drops the leading positions
        return logits[:, start:start + last - first]

    return run


def _takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
