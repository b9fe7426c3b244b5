"""The relufication recipe's training pieces, usable with any ``Trainer``: the schedule (ReLU, or a StochA warm-up
then ReLU) and the extra loss terms (L1 pressure on FFN activations, distillation from the original model)."""

from __future__ import annotations

import torch
from torch import nn

from ..layouts import find_mlps
from .schedule import Stage, StochActSchedule


def relufy_schedule(stocha_fraction: float = 0.0, p: float = 0.5) -> StochActSchedule:
    """ReLU throughout (Swi+FT's fine-tune phase applied to a SiLU-pretrained model), or StochA for the first
    ``stocha_fraction`` of the steps (p ramping from ``p`` to 0) and then ReLU.

    Raises:
        ValueError: ``stocha_fraction`` outside [0, 1).
    """
    if not 0.0 <= stocha_fraction < 1.0:
        raise ValueError(f"stocha_fraction must be in [0, 1), got {stocha_fraction}")
    if stocha_fraction == 0.0:
        return StochActSchedule([Stage(0, "relu")])
    return StochActSchedule([Stage(0, "stochastic", p=p, ramp=True), Stage(stocha_fraction, "relu")])


class RelufyLoss:
    """Trainer mixin: ``l1 * mean |FFN activation|`` added to the loss (ProSparse-style pressure towards exact
    zeros) and, with a ``teacher``, the loss mixed with the KL divergence from the teacher's next-token
    distribution."""

    l1 = 0.0
    teacher: nn.Module | None = None
    distill = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        acts: list[torch.Tensor] = []
        handles = [mlp.activation.register_forward_hook(lambda mod, i, o: acts.append(o.abs().mean()))
                   for mlp in find_mlps(model)] if self.l1 > 0 else []
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if self.teacher is not None and self.distill > 0:
            ids = inputs["input_ids"]
            if next(self.teacher.parameters()).device != ids.device:  # the Trainer moved the student, not the teacher
                self.teacher.to(ids.device)
            with torch.no_grad():
                target = self.teacher(input_ids=ids).logits.float().log_softmax(-1)
            student = outputs.logits.float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(student.flatten(0, -2), target.flatten(0, -2), log_target=True,
                                            reduction="batchmean")
            loss = (1 - self.distill) * loss + self.distill * kl
        if acts:
            loss = loss + self.l1 * torch.stack(acts).mean()
        return (loss, outputs) if return_outputs else loss
