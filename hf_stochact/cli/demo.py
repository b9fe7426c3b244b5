"""`hf-stochact demo`: the pipeline end to end on a real corpus, in a few minutes on 2 CPU cores.

1. corpus: CPython's standard-library source (train / held-out split by file; ``--data`` takes your own text the
   same way, through ``datasets``: :mod:`hf_stochact.data`), byte-level BPE trained locally;
2. model: a small Llama built with ``hidden_act="stochastic"`` (StochA, p = P(SiLU));
3. training: transformers' ``Trainer`` with ``StochActSchedule`` (the paper's StochA+FT: StochA, then ReLU for
   the last ``relu_fraction`` of steps, then the final swap to plain ReLU);
4. report: held-out loss/perplexity and exact-zero FFN sparsity at three points -- during StochA (sampling and
   deterministic ReLU eval), and after the ReLU fine-tune -- and the saved model, loadable by stock transformers;
5. inference: greedy decoding of a held-out prompt, dense and with ``sparsify`` (same tokens; how many FFN calls
   took the sparse path), and stochastic decoding (the activations resampled at every step: different greedy
   continuations of the same prompt).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import data
from ..analysis.metrics import measure_sparsity
from ..inference.sparse import sparse_stats, sparsify, unsparsify
from ..integration.config import CONFIG_KEY, stochastic_modules
from ..layouts import ffn_activations
from ..training.schedule import StochActSchedule
from .args import UsageError, at_least, option, output_folder, positive, probability, seed_range, validate


@dataclass
class DemoConfig:
    steps: int = option(480, "optimizer steps to train", check=at_least(1))
    batch_size: int = option(16, "sequences per step", check=at_least(1))
    block_size: int = option(128, "tokens per sequence (the model's context)", check=at_least(8))
    hidden_size: int = option(128, "model width (d_model)", check=at_least(8))
    intermediate_size: int = option(512, "FFN hidden width (d_ff)", check=at_least(8))
    layers: int = option(4, "number of transformer layers", check=at_least(1))
    heads: int = option(4, "attention heads (must divide --hidden-size)", check=at_least(1))
    vocab_size: int = option(2048, "BPE vocabulary trained on the corpus", check=at_least(300))
    p: float = option(0.5, "StochA's P(SiLU) on negative inputs during training, and stochastic_p when decoding",
                      check=probability)
    relu_fraction: float = option(0.1, "fraction of the steps fine-tuned with plain ReLU at the end",
                                  check=probability)
    lr: float = option(2e-3, "peak learning rate (cosine schedule, 5%% warm-up)", check=positive)
    data: str = option("", "training text (a file or folder of text/JSONL/Parquet/CSV, or a datasets name); empty "
                           "= CPython's stdlib source, the embedded default")
    text_column: str = option("", "column holding the text (default: 'text', or the only string column)")
    train_chars: int = option(3_000_000, "characters of the training text used", check=at_least(10_000))
    eval_blocks: int = option(64, "held-out blocks for loss, perplexity and sparsity", check=at_least(1))
    seed: int = option(0, "random seed of the run", check=seed_range)
    prompt_tokens: int = option(24, "held-out prompt length for the decoding demo", check=at_least(1))
    new_tokens: int = option(24, "tokens decoded in the decoding demo", check=at_least(1))
    output_dir: str = option("runs/demo", "where the final model is saved (<output-dir>/final)", check=output_folder)

    def check(self) -> None:
        if self.prompt_tokens + self.new_tokens > self.block_size:
            raise UsageError("--prompt-tokens", f"--prompt-tokens ({self.prompt_tokens}) + --new-tokens "
                                                f"({self.new_tokens}) must fit in --block-size ({self.block_size}), "
                                                "the model's context")
        if self.hidden_size % self.heads:
            raise UsageError("--heads", f"must divide --hidden-size ({self.hidden_size}), got {self.heads}")
        final = Path(self.output_dir) / "final"
        if final.exists() and not final.is_dir():
            raise UsageError("--output-dir", f"{str(final)!r} is a file; the model is saved in that folder")
        if data.missing_path(self.data):
            raise UsageError("--data", f"no such file or folder: {self.data!r}")


def build_corpus(cfg: DemoConfig):
    """Tokenizer (a BPE trained on the first 1M characters of training text), training blocks (a ``Dataset``) and
    held-out blocks ([N, block_size]) from ``cfg.data`` (default: the stdlib, split by file)."""
    from .relufy import as_usage_error

    try:
        corpus = data.load_corpus(cfg.data or None, text_column_name=cfg.text_column or None, seed=cfg.seed)
        tokenizer = data.train_tokenizer(data.text_of(corpus.train, corpus.column, 1_000_000),
                                         vocab_size=cfg.vocab_size)
        train = data.token_blocks(corpus.train, tokenizer, cfg.block_size, column=corpus.column,
                                  max_chars=cfg.train_chars, desc="training text")
        held = data.token_blocks(corpus.held_out, tokenizer, cfg.block_size, column=corpus.column,
                                 max_chars=cfg.eval_blocks * cfg.block_size * 6, desc="held-out text")
    except ValueError as error:
        raise as_usage_error(error) from error
    return tokenizer, train, held["input_ids"][: cfg.eval_blocks]


def build_model(cfg: DemoConfig, vocab_size: int, activation: str = "stochastic"):
    """The demo's small Llama with FFN ``activation`` (``"stochastic"`` gets ``p = cfg.p``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.block_size, hidden_act=activation, tie_word_embeddings=True,
    )
    if activation == "stochastic":
        setattr(config, CONFIG_KEY, {"p": cfg.p})
    return LlamaForCausalLM(config)


def training_arguments(cfg: DemoConfig, **overrides):
    """The demo's TrainingArguments (cosine LR with 5% warm-up, CPU, no checkpoints, no reporting)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=cfg.output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=max(1, cfg.steps // 20), weight_decay=0.01,
        logging_steps=max(1, cfg.steps // 10), save_strategy="no", report_to=[], seed=cfg.seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over ``blocks`` in the model's current mode."""
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - len(batch)
        total += float(loss) * n
        count += n
    return total / count


def evaluate(model, blocks: torch.Tensor, modes: dict[str, bool], seed: int = 0) -> dict[str, dict[str, float]]:
    """Held-out loss and FFN sparsity per ``{label: train_mode}`` (train mode samples; dropout is 0 here)."""
    report = {}
    was_training = model.training
    for label, train_mode in modes.items():
        model.train(train_mode)
        torch.manual_seed(seed)
        loss = held_out_loss(model, blocks)
        sparsity = measure_sparsity(model, blocks).overall
        report[label] = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "sparsity": sparsity}
    model.train(was_training)
    return report


class _EvalBeforeSwitch(TrainerCallback):
    """Evaluates the model once, just before the schedule's switch to ReLU (end of the StochA phase)."""

    def __init__(self, schedule: StochActSchedule, blocks: torch.Tensor, seed: int):
        self.schedule, self.blocks, self.seed, self.report = schedule, blocks, seed, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        starts = self.schedule.resolve(state.max_steps)
        if len(starts) > 1 and state.global_step == starts[-1] - 1 and not self.report:
            self.report = evaluate(model, self.blocks, {"StochA, sampling (train mode)": True,
                                                        "StochA model, ReLU eval (eval mode)": False}, self.seed)


def run(cfg: DemoConfig) -> dict:
    from transformers import Trainer, set_seed

    validate(cfg)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    source = cfg.data or f"CPython {data.stdlib_root()} (split by file)"
    print(f"[1/5] corpus: {source}, training a {cfg.vocab_size}-token BPE ...")
    tokenizer, train, held = build_corpus(cfg)
    print(f"      {len(train)} training blocks of {cfg.block_size} tokens, {len(held)} held-out blocks")
    model = build_model(cfg, len(tokenizer))
    act = next(stochastic_modules(model))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[2/5] model: Llama {cfg.layers}x{cfg.hidden_size} (FFN {cfg.intermediate_size}), {n_params / 1e6:.1f}M "
          f"params, FFN activation: {act}")
    args = training_arguments(cfg)
    schedule = StochActSchedule(p=cfg.p, relu_fraction=cfg.relu_fraction)
    before = _EvalBeforeSwitch(schedule, held, cfg.seed)
    print(f"[3/5] training {cfg.steps} steps (batch {cfg.batch_size}x{cfg.block_size}), StochA+FT: StochA(p={cfg.p}) "
          f"then ReLU for the last {cfg.relu_fraction:.0%} of steps ...")
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[schedule, before])
    result = trainer.train()
    print("[4/5] held-out evaluation")
    report = dict(before.report)
    report.update(evaluate(model, held, {"after ReLU fine-tune (final)": False}, cfg.seed))
    final = report["after ReLU fine-tune (final)"]["loss"]
    if not math.isfinite(final):  # never replace a saved model with a broken one
        raise UsageError("--lr", f"training diverged: held-out loss {final} after training; nothing was saved: "
                                 f"lower --lr (now {cfg.lr})")
    final_dir = f"{cfg.output_dir}/final"
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    print(f"\n  train loss (last logging window): {_last_loss(trainer):.3f}   "
          f"(mean over run {result.training_loss:.3f})")
    print(f"  {'model / mode':<38}{'held-out loss':>14}{'ppl':>10}{'FFN zeros':>12}")
    for label, r in report.items():
        print(f"  {label:<38}{r['loss']:>14.3f}{r['ppl']:>10.2f}{r['sparsity']:>11.1%}")
    kinds = sorted({type(m).__name__ for *_, m in ffn_activations(model)})
    print(f"\n  final FFN activation: {', '.join(kinds)}; config.hidden_act = {model.config.hidden_act!r}")
    print(f"  saved to {final_dir} (loads with stock transformers, no hf_stochact needed)")
    print("\n[5/5] decoding with the final model")
    decoding = decode_demo(model, tokenizer, held[0, : cfg.prompt_tokens], cfg)
    print(f"  done in {time.perf_counter() - t0:.0f} s")
    return {"report": report, "train_loss": result.training_loss, "model": model, "tokenizer": tokenizer,
            "decoding": decoding}


@torch.no_grad()
def decode_demo(model, tokenizer, prompt: torch.Tensor, cfg: DemoConfig) -> dict:
    """Greedy decode dense vs sparsified (identical tokens expected) and with stochastic activations."""
    model.eval()
    ids = prompt[None]
    kw = dict(max_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    dense = model.generate(ids, **kw)
    sparsify(model)
    sparse = model.generate(ids, **kw)
    stats = sparse_stats(model)
    unsparsify(model)
    same = torch.equal(dense, sparse)
    show = lambda t: repr(tokenizer.decode(t[0, ids.shape[1]:]))[:90]  # noqa: E731
    print(f"  prompt: {tokenizer.decode(prompt)[-70:]!r}")
    print(f"  greedy, dense:      {show(dense)}")
    print(f"  greedy, sparsify(): {show(sparse)}")
    print(f"  sparse FFN path: {stats['sparse']} calls, dense fallback (prefill): {stats['dense']}; "
          f"tokens identical: {same}")
    # a ReLU model decodes with StochA (x < 0 -> SiLU with probability p), activations redrawn at every step
    torch.manual_seed(cfg.seed)
    stochastic = [model.generate(ids, **kw, stochastic_activation=True, stochastic_p=cfg.p) for _ in range(3)]
    for i, out in enumerate(stochastic):
        print(f"  greedy, stochastic_activation=True (StochA p={cfg.p}) #{i + 1}: {show(out)}")
    distinct = len({tuple(o[0].tolist()) for o in stochastic})
    print(f"  {distinct} distinct continuations out of 3 with greedy token choice")
    return {"identical": same, "sparse_calls": stats["sparse"], "dense_calls": stats["dense"],
            "distinct_stochastic": distinct}


def _last_loss(trainer) -> float:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else float("nan")
