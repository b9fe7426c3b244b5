"""`hf-stochact recover`: sparsity-aware recovery training for input thresholds — fine-tune a model with its TEAL-style
input thresholds active, distilled from the dense model, and save it with the thresholds in its config.

Recipe (``Trainer`` + :class:`~hf_stochact.training.recover.SparseRecoverySchedule` on your data, as ``relufy``):

1. load the model (a folder, a hub id, or a GGUF file);
2. calibrate input thresholds at ``--sparsity`` (``--allocation``; ``--rotate pca``: rotated inputs, LaRoSA + WINA;
   ``calibrate_thresholds`` on ``--calibration-rows`` x 512 tokens of training text) and measure the held-out
   perplexity dense and sparse (through ``sparsify``, the inference path);
3. fine-tune with the thresholds in the forward pass: straight-through (``--gradient ste``) or masked gradients;
   ``--mix-fraction`` > 0 first trains on a per-element Bernoulli mix of the sparse and the dense input (StochA for
   thresholds: a dropped input is kept with probability ``--p`` ramping to 0), then on the sparse one; the loss
   is ``(1 - distill) * CE + distill * KL(dense teacher || student)`` (the teacher: the model as loaded, dense);
   full weights, or LoRA adapters on the thresholded layers (``--lora-rank``), merged at the end;
4. recalibrate the thresholds on the trained model (``--recalibrate``, the default: the saved sparsity is the
   target's) and measure the perplexity again; save the model (a plain model of its architecture: it loads with
   stock transformers, dense; ``hf_stochact.sparsify(model)`` applies the saved thresholds), a model card and
   ``recover_report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..inference.rotation import ROTATIONS
from ..inference.sparse import sparsify, unsparsify
from ..inference.thresholds import ALLOCATIONS, Thresholds, calibrate_thresholds
from ..training.recover import GRADIENTS, SparseRecoverySchedule
from ..training.relufy import RelufyLoss
from .args import (
    UsageError,
    at_least,
    fraction_below_one,
    non_negative,
    one_of,
    option,
    output_folder,
    positive,
    probability,
    seed_range,
    validate,
)
from .loading import hub_model_id, load_causal_lm
from .relufy import (
    SAVE_DTYPES,
    check_training_flags,
    command_line,
    corpus_for,
    held_out_description,
    held_out_perplexity,
    save_dtype,
    train_blocks,
)
from .relufy import eval_ids as relufy_eval_ids


@dataclasses.dataclass
class RecoverConfig:
    model: str = option("", "the model: a folder (config.json, weights, tokenizer), a Hugging Face Hub id "
                            "(USER/NAME), or the folder/repo of --gguf")
    gguf: str = option("", "GGUF file: a name inside --model (folder or hub repo), or a path (then --model may be "
                           "omitted)")
    data: str = option("", "training text: a file or folder (.txt/.md/.py/... one row per file; .json/.jsonl; "
                           ".parquet; .csv), or a datasets name; empty = CPython's stdlib source (embedded default)")
    text_column: str = option("", "column holding the text (default: 'text', or the only string column)")
    eval_data: str = option("", "held-out text (same kinds as --data); default: --data's validation/test split, "
                                "else --held-out-fraction of its rows (stdlib: its held-out files, --eval-file)")
    held_out_fraction: float = option(0.05, "fraction of --data's rows (files) held out when there is no "
                                            "--eval-data or validation split", check=fraction_below_one)
    num_proc: int = option(0, "processes for tokenising (datasets' num_proc; 0 = in this process)",
                           check=non_negative)
    output_dir: str = option("runs/recovered", "where the trained model (thresholds in its config), its model card "
                                               "and recover_report.json are saved", check=output_folder)
    save_dtype: str = option("auto", "dtype of the saved weights: auto (the source's; float32 for a GGUF source), "
                                     "float32, bfloat16 or float16; training is float32 either way",
                             check=one_of(*SAVE_DTYPES))
    sparsity: float = option(0.4, "model-wide input sparsity of the thresholds, in (0, 1)",
                             check=lambda v: None if 0.0 < v < 1.0 else f"must be in (0, 1), got {v}")
    allocation: str = option("block", f"how the per-layer sparsities are chosen ({', '.join(ALLOCATIONS)})",
                             check=one_of(*ALLOCATIONS))
    rotate: str = option("none", "rotate the thresholded inputs into their principal components (pca: the groups "
                                 "whose weights outweigh the rotation, e.g. q/k/v and gate/up; pca-all: every "
                                 "layer; LaRoSA + WINA, exact with every input kept)", check=one_of(*ROTATIONS))
    calibration_rows: int = option(8, "training text the thresholds are calibrated on, in 512-token windows (with "
                                      "--data: --block-size blocks spread over it)", check=at_least(1))
    steps: int = option(60, "optimizer steps", check=at_least(1))
    batch_size: int = option(4, "sequences per micro-batch", check=at_least(1))
    block_size: int = option(256, "tokens per training sequence", check=at_least(8))
    grad_accum: int = option(2, "micro-batches per optimizer step", check=at_least(1))
    lr: float = option(5e-5, "peak learning rate (cosine schedule); LoRA usually wants more (e.g. 5e-4)",
                       check=positive)
    warmup_steps: int = option(5, "learning-rate warm-up steps", check=non_negative)
    lora_rank: int = option(0, "train LoRA adapters of this rank on the thresholded layers (merged at the end); 0 = "
                               "full weights", check=non_negative)
    lora_alpha: float = option(0.0, "LoRA alpha (0 = twice the rank)", check=non_negative)
    gradient: str = option("ste", "backward through the thresholds: ste (straight-through: every input gets the "
                                  "gradient) or masked (dropped inputs get none)", check=one_of(*GRADIENTS))
    mix_fraction: float = option(0.0, "fraction of the steps trained on a Bernoulli mix of sparse and dense inputs "
                                      "(StochA for thresholds) before the sparse input; 0 = sparse throughout",
                                 check=fraction_below_one)
    p: float = option(0.5, "the mix's starting probability that a dropped input is kept (ramps to 0)",
                      check=probability)
    distill: float = option(1.0, "weight of KL(dense teacher || student) in the loss, (1 - distill) for "
                                 "cross-entropy", check=probability)
    recalibrate: bool = option(True, "recalibrate the thresholds on the trained model (same target and allocation) "
                                     "before saving")
    cpu: bool = option(True, "train on the CPU even where a GPU is present (--no-cpu: the Trainer's device)")
    train_chars: int = option(4_000_000, "characters of the training text used (0 = all of it)",
                              check=non_negative)
    eval_file: str = option("argparse.py", "with the default data: the held-out file of CPython's standard library "
                                           "(excluded from training and calibration) on which perplexity is "
                                           "measured")
    eval_chars: int = option(50_000, "characters of held-out text scored", check=at_least(1))
    eval_window: int = option(512, "tokens per perplexity window (non-overlapping)", check=at_least(2))
    seed: int = option(0, "random seed of the run", check=seed_range)

    @property
    def default_data(self) -> bool:
        return not self.data or self.data == data.STDLIB

    def check(self) -> None:
        if self.lora_alpha and not self.lora_rank:
            raise UsageError("--lora-alpha", "needs --lora-rank > 0 (LoRA adapters); with full weights there is no "
                                             "alpha")
        check_training_flags(self)


def calibration_blocks(train, n: int) -> torch.Tensor:
    """``n`` training blocks spread evenly over the training data, [n, block_size] (fewer if there are fewer)."""
    n = min(n, len(train))
    picks = torch.linspace(0, len(train) - 1, n).round().long().tolist()
    return torch.stack([torch.as_tensor(train[i]["input_ids"]) for i in picks])


def sparse_perplexity(model: nn.Module, windows: torch.Tensor, thresholds: Thresholds | None,
                      progress: bool = True) -> float:
    """Held-out perplexity of ``model`` dense (``thresholds=None``) or through ``sparsify`` with ``thresholds`` (the
    inference path: every token's inputs masked as in decoding); the model is left as it was."""
    if thresholds is None:
        return held_out_perplexity(model, windows, progress)[0]
    sparsify(model, thresholds=thresholds)
    try:
        return held_out_perplexity(model, windows, progress)[0]
    finally:
        unsparsify(model)


def lora_model(model: nn.Module, thresholds: Thresholds, rank: int, alpha: float) -> nn.Module:
    """``model`` with LoRA adapters (rank ``rank``) on every thresholded layer (peft); the rest frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise UsageError("--lora-rank", "LoRA needs peft: pip install 'hf_stochact[peft]'") from error
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=sorted(thresholds.values), bias="none")
    return get_peft_model(model, config)


def run(cfg: RecoverConfig) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed

    validate(cfg)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps, weight_decay=0.0, logging_steps=max(1, cfg.steps // 30),
        save_strategy="no", report_to=[], seed=cfg.seed, use_cpu=cfg.cpu, dataloader_num_workers=0)
    corpus = corpus_for(cfg)
    print(f"[1/6] loading {cfg.model} {cfg.gguf}")
    tokenizer, model = load_causal_lm(cfg.model, cfg.gguf, command="recover")
    dtype, dtype_reason = save_dtype(cfg)
    context = getattr(model.config, "max_position_embeddings", None)
    for flag, tokens in (("--block-size", cfg.block_size), ("--eval-window", cfg.eval_window)):
        if context and tokens > context:
            raise UsageError(flag, f"{tokens} tokens is longer than the model's context ({context} positions)")
    windows = relufy_eval_ids(tokenizer, cfg, corpus)
    eval_what = held_out_description(cfg, corpus)
    train = train_blocks(cfg, corpus, tokenizer)
    window = min(512, context or 512)
    if cfg.default_data and not cfg.eval_data:  # the calibration text of calibrate_thresholds' docs and frontier
        calibration = data.calibration_windows(tokenizer, rows=cfg.calibration_rows, window=window,
                                               exclude=cfg.eval_file)
    else:
        calibration = calibration_blocks(train, cfg.calibration_rows * 512 // cfg.block_size or 1)
    teacher = None
    if cfg.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    rotated = "" if cfg.rotate == "none" else f", inputs rotated ({cfg.rotate})"
    print(f"[2/6] calibrating input thresholds: {cfg.sparsity:.0%} ({cfg.allocation}{rotated}) on {len(calibration)} "
          f"x {calibration.shape[1]} tokens")
    thresholds = calibrate_thresholds(model, calibration, cfg.sparsity, allocation=cfg.allocation,
                                      rotate=cfg.rotate, save=False)
    print(f"      perplexity on {len(windows)} x {cfg.eval_window} tokens of {eval_what}")
    ppl_dense = sparse_perplexity(model, windows, None)
    if not math.isfinite(ppl_dense):
        raise UsageError("--gguf" if cfg.gguf else "--model", f"the model's held-out perplexity is {ppl_dense}: "
                                                              "its weights are broken")
    ppl_before = sparse_perplexity(model, windows, thresholds)
    print(f"      dense {ppl_dense:.3f}, sparse {ppl_before:.3f} ({ppl_before / ppl_dense - 1:+.1%}) before training")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    student = lora_model(model, thresholds, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else model
    what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full weights"
    print(f"[3/6] training {cfg.steps} steps x {tokens_per_step:,} tokens ({cfg.steps * tokens_per_step:,} tokens; "
          f"{what}, {cfg.gradient} gradient, mix {cfg.mix_fraction:.0%} of the steps from p={cfg.p}, "
          f"distillation {cfg.distill})")
    schedule = SparseRecoverySchedule(thresholds, gradient=cfg.gradient, mix_fraction=cfg.mix_fraction, p=cfg.p)
    trainer_cls = type("RecoverTrainer", (RelufyLoss, Trainer),
                       {"teacher": teacher, "distill": cfg.distill, "create_model_card": lambda self, **kw: None})
    trainer = trainer_cls(model=student, args=args, train_dataset=train, callbacks=[schedule])
    trainer.train()
    if cfg.lora_rank:
        model = student.merge_and_unload()
    model.eval()
    teacher = None
    print("[4/6] perplexity after training, with the thresholds it was trained with")
    ppl_trained = sparse_perplexity(model, windows, thresholds)
    trained_sparsity = measured_sparsity(model, calibration, thresholds)
    final = thresholds
    ppl_after = ppl_trained
    if cfg.recalibrate:
        print(f"[5/6] recalibrating the thresholds ({cfg.sparsity:.0%}, {cfg.allocation}) on the trained model")
        final = calibrate_thresholds(model, calibration, cfg.sparsity, allocation=cfg.allocation, rotate=cfg.rotate,
                                     save=False)
        ppl_after = sparse_perplexity(model, windows, final)
    ppl_trained_dense = sparse_perplexity(model, windows, None, progress=False)
    if not math.isfinite(ppl_after):
        raise UsageError("--lr", f"training diverged: held-out perplexity {ppl_after}; nothing was saved, "
                                 f"{str(out_dir)!r} is as it was: lower --lr (now {cfg.lr})")
    print(f"      sparse {ppl_after:.3f} ({ppl_after / ppl_dense - 1:+.1%} vs the dense model before training)")
    final.save_to_config(model)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"[6/6] saving {dtype_name} weights to {out_dir} ({dtype_reason})")
    model.to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "config": dataclasses.asdict(cfg), "command": command_line(cfg, "recover"), "eval_text": eval_what,
        "data": corpus.description, "tokens": cfg.steps * tokens_per_step, "seconds": time.perf_counter() - t0,
        "base_model": hub_model_id(cfg.model, cfg.gguf), "rotation": cfg.rotate,
        "ppl_dense": ppl_dense, "ppl_sparse_before": ppl_before, "ppl_sparse_trained_thresholds": ppl_trained,
        "ppl_sparse_after": ppl_after, "ppl_dense_after": ppl_trained_dense,
        "model_sparsity": final.weighted_sparsity(model), "trained_thresholds_sparsity": trained_sparsity,
        "save_dtype": dtype_name,
        "log_history": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in h.items()}
                        for h in trainer.state.log_history],
    }
    (out_dir / "recover_report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "README.md").write_text(model_card(report))
    print(summary_table(report))
    return report


@torch.no_grad()
def measured_sparsity(model: nn.Module, calibration: torch.Tensor, thresholds: Thresholds) -> float:
    """The zero fraction ``thresholds`` give on ``calibration`` (model-wide, weighted by weight bytes): after
    training the inputs drift, so fixed thresholds drop a different share than they were calibrated for."""
    fractions: dict[str, list[float]] = {}
    handles = []
    thresholds.resolve_rotations(model)
    for path, t in thresholds.values.items():
        transform = thresholds.transform(path)

        def hook(module, args, path=path, t=t, transform=transform):
            x = args[0] if transform is None else args[0].float() @ transform[0]
            fractions.setdefault(path, []).append(float((x.abs() <= t).float().mean()) if t > 0 else 0.0)
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        for window in calibration:
            model(input_ids=window[None])
    finally:
        for h in handles:
            h.remove()
    result = Thresholds(dict(thresholds.values), thresholds.sparsity, thresholds.allocation,
                        {p: sum(v) / len(v) for p, v in fractions.items()})
    return result.weighted_sparsity(model)


def summary_table(report: dict) -> str:
    cfg = report["config"]
    dense = report["ppl_dense"]
    rows = [("data", report["data"]), ("held-out text", report["eval_text"]),
            ("tokens seen", f"{report['tokens']:,}"), ("perplexity, dense", f"{dense:.3f}"),
            (f"sparse {cfg['sparsity']:.0%}, before training", f"{report['ppl_sparse_before']:.3f} "
                                                               f"({report['ppl_sparse_before'] / dense - 1:+.1%})"),
            ("sparse, after training", f"{report['ppl_sparse_after']:.3f} "
                                       f"({report['ppl_sparse_after'] / dense - 1:+.1%})"),
            ("model-wide input sparsity", f"{report['model_sparsity']:.1%}"), ("time", f"{report['seconds']:.0f} s"),
            ("saved to", f"{cfg['output_dir']} ({report['save_dtype']} weights)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "  summary", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def model_card(report: dict) -> str:
    """The folder's README.md (a ``huggingface_hub.ModelCard``): recipe, budget, perplexities, the command."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = report["config"]
    source = cfg["gguf"] or cfg["model"]
    base = report.get("base_model")
    metadata = ModelCardData(library_name="transformers", tags=["hf_stochact", "activation-sparsity", "teal"],
                             pipeline_tag="text-generation", base_model=base,
                             **({"base_model_relation": "finetune"} if base else {}))
    dense = report["ppl_dense"]
    training = f"{cfg['steps']} steps x {report['tokens'] // cfg['steps']:,} tokens = {report['tokens']:,} tokens, " \
               f"{'LoRA rank ' + str(cfg['lora_rank']) + ' (merged)' if cfg['lora_rank'] else 'full weights'}, " \
               f"lr {cfg['lr']}, {cfg['gradient']} gradient, distillation {cfg['distill']}" + \
               (f", sparse/dense Bernoulli mix for {cfg['mix_fraction']:.0%} of the steps (p from {cfg['p']})"
                if cfg["mix_fraction"] else "")
    rotation = f"rotated inputs (`{cfg['rotate']}`: PCA rotations in `sparse_rotations.safetensors`), " \
        if cfg["rotate"] != "none" else ""
    before = f"{report['ppl_sparse_before']:.3f} ({report['ppl_sparse_before'] / dense - 1:+.1%})"
    after = f"{report['ppl_sparse_after']:.3f} ({report['ppl_sparse_after'] / dense - 1:+.1%})"
    return str(ModelCard(f"""---
{metadata.to_yaml()}
---

# {Path(source).name} with {cfg['sparsity']:.0%} input sparsity, recovery-trained

`{source}` fine-tuned with hf_stochact's `hf-stochact recover`: {rotation}input thresholds
(`{cfg['allocation']}` allocation, {report['model_sparsity']:.1%} of the weight bytes skipped model-wide) active in
the forward pass while training. The thresholds are stored in `config.json` (`sparse_thresholds`): stock
transformers loads this model and runs it dense; `hf_stochact.sparsify(model)` applies the thresholds (decode steps
read only the weight rows of the kept inputs).

| | |
|---|---|
| data | {report['data']} |
| training | {training} |
| held-out perplexity, dense model before training | {dense:.3f} |
| with the thresholds, before training | {before} |
| with the thresholds, after training | {after} |
| saved weights | {report['save_dtype']} |

Perplexity on {report['eval_text']} ({cfg['eval_chars']:,} characters, non-overlapping {cfg['eval_window']}-token
windows).

## Reproduce

```bash
{report['command']}
```
"""))
