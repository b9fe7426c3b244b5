"""`hf-stochact uncertainty`: per-token uncertainty of a text (or of a model's reply) from stochastic activations.

Prints one line per scored token (mutual information = BALD, predictive / expected entropy, sample disagreement,
and the deterministic softmax entropy and max-probability), then the text with each token marked by its mutual
information: ANSI colours by quantile on a terminal, brackets elsewhere (``[[tok]]`` top 10%, ``[tok]`` 50-90%).
``--png FILE`` plots the scores per token. See :mod:`hf_stochact.analysis.uncertainty` and docs/uncertainty.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ..analysis.uncertainty import Uncertainty, uncertainty
from .args import UsageError, at_least, option, output_file, probability, seed_range, validate
from .loading import load_causal_lm, resolve_model

_HIGH, _MID = 0.9, 0.5  # quantiles of mutual information marked in the text view


@dataclasses.dataclass
class UncertaintyConfig:
    model: str = option("", "model folder (config.json, weights, tokenizer); with --gguf, the folder of the file")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    text: str = option("", "score this text as it is (every token); give --text or --prompt")
    prompt: str = option("", "generate a greedy reply to this prompt, then score the reply's tokens")
    samples: int = option(8, "stochastic forwards (cost: samples + 1 forwards)", check=at_least(1))
    p: float = option(0.9, "stochastic_p: probability of the smooth branch (SiLU, or the model's own activation) at "
                           "each FFN element, 1 - p that of ReLU; for a ReLU model, P(SiLU) on negative inputs "
                           "(StochA)", check=probability)
    max_new_tokens: int = option(64, "with --prompt: tokens of the reply", check=at_least(1))
    chat: bool | None = option(None, "with --prompt: wrap it in the tokenizer's chat template (default: yes when the "
                                     "tokenizer has one)", flag=True)
    batch_size: int = option(0, "samples per forward (0 = automatic; results do not depend on it)",
                             check=at_least(0))
    seed: int = option(0, "base seed of the samples' draws", check=seed_range)
    png: str = option("", "write a plot of the per-token scores to this PNG file", check=output_file(False))

    def check(self) -> None:
        if self.text and self.prompt:
            raise UsageError("--prompt", "give --text (score a text) or --prompt (score a reply), not both")
        if not self.text and not self.prompt:
            raise UsageError("--text", "required: the text to score (or --prompt PROMPT to score a generated reply)")
        resolve_model(self.model, self.gguf)


def run(cfg: UncertaintyConfig) -> Uncertainty:
    validate(cfg)
    tok, model = load_causal_lm(cfg.model, cfg.gguf, command="uncertainty")
    model.eval()
    batch = cfg.batch_size or None
    if cfg.text:
        ids = tok(cfg.text, return_tensors="pt").input_ids[0]
        if ids.numel() < 1:
            raise UsageError("--text", "has no tokens")
        result = uncertainty(model, ids, cfg.samples, cfg.p, seed=cfg.seed, batch_size=batch)
        tokens = ids
        what = "text"
    else:
        prompt = _prompt_ids(tok, cfg.prompt, cfg.chat)
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        tokens = out[0]
        result = uncertainty(model, tokens, cfg.samples, cfg.p, prompt_length=prompt.shape[1], seed=cfg.seed,
                             batch_size=batch)
        what = f"greedy reply ({tokens.numel() - prompt.shape[1]} tokens)"
        print("reply:", tok.decode(tokens[prompt.shape[1]:], skip_special_tokens=True))
    print(f"uncertainty of the {what}: {cfg.samples} samples, stochastic_p={cfg.p}, seed {cfg.seed} (nats)")
    print(table(tok, result))
    s = result.summary()
    print("mean: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in s.items() if k.startswith("mean_")))
    print(marked_text(tok, tokens, result, colour=sys.stdout.isatty()))
    if cfg.png:
        plot(tok, result, Path(cfg.png))
    return result


def _prompt_ids(tok, prompt: str, chat: bool | None) -> torch.Tensor:
    if chat if chat is not None else bool(getattr(tok, "chat_template", None)):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


def _token_text(tok, token: int) -> str:
    return tok.decode([token]) if token >= 0 else ""


def table(tok, r: Uncertainty) -> str:
    """One line per scored position: the token it predicts and its scores."""
    lines = [f"{'pos':>5} {'next token':<16} {'MI':>8} {'PE':>7} {'EE':>7} {'disagr':>6} {'H(det)':>7} "
             f"{'p_max':>6}"]
    for i in range(r.positions.numel()):
        shown = repr(_token_text(tok, int(r.tokens[i])))[1:-1][:16]
        lines.append(f"{int(r.positions[i]):>5} {shown:<16} {float(r.mutual_information[i]):>8.4f} "
                     f"{float(r.predictive_entropy[i]):>7.3f} {float(r.expected_entropy[i]):>7.3f} "
                     f"{float(r.disagreement[i]):>6.2f} {float(r.entropy[i]):>7.3f} "
                     f"{float(r.max_probability[i]):>6.3f}")
    return "\n".join(lines)


def marked_text(tok, ids: torch.Tensor, r: Uncertainty, colour: bool) -> str:
    """The text with each scored token marked by the mutual information of its prediction: on a terminal red
    (top 10%) / yellow (50-90%) background; otherwise ``[[tok]]`` / ``[tok]``."""
    mi = r.mutual_information
    high, mid = (torch.quantile(mi, q).item() for q in (_HIGH, _MID)) if mi.numel() > 1 else (float("inf"),) * 2
    marks = {int(pos) + 1: float(v) for pos, v in zip(r.positions, mi)}  # token index -> MI of its prediction
    parts = []
    for j, token in enumerate(ids.tolist()):
        text = _token_text(tok, token)
        v = marks.get(j)
        if v is None or v < mid or not text.strip():
            parts.append(text)
        elif colour:
            parts.append(f"\x1b[{41 if v >= high else 43}m{text}\x1b[0m")
        else:
            parts.append(f"[[{text}]]" if v >= high else f"[{text}]")
    legend = ("(red: top 10% mutual information, yellow: 50-90%)" if colour
              else "([[token]]: top 10% mutual information, [token]: 50-90%)")
    return "".join(parts) + "\n" + legend


def plot(tok, r: Uncertainty, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(no plot: pip install 'hf_stochact[examples]' for matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = r.positions.numel()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, min(0.18 * n, 30.0)), 5.5), sharex=True)
    x = range(n)
    top.bar(x, r.mutual_information.tolist(), color="tab:red")
    top.set_ylabel("mutual information (nats)")
    top.set_title(f"{r.samples} samples, stochastic_p={r.p}")
    bottom.plot(x, r.predictive_entropy.tolist(), label="predictive entropy", lw=1)
    bottom.plot(x, r.expected_entropy.tolist(), label="expected entropy", lw=1)
    bottom.plot(x, r.entropy.tolist(), label="deterministic entropy", lw=1, ls="--")
    bottom.set_ylabel("nats")
    bottom.legend(fontsize=7)
    if n <= 120:
        bottom.set_xticks(list(x))
        bottom.set_xticklabels([repr(_token_text(tok, int(t)))[1:-1][:10] for t in r.tokens], rotation=90,
                               fontsize=6)
    bottom.set_xlabel("next token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
