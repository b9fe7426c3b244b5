"""`hf-stochact generate`: k completions of one prompt with stochastic activations (greedy or sampled)."""

from __future__ import annotations

import dataclasses

import torch

from .. import integration  # noqa: F401  (generate accepts stochastic_activation once installed)
from .loading import load_causal_lm


@dataclasses.dataclass
class GenerateConfig:
    model: str = ""
    gguf: str = ""
    prompt: str = "def fibonacci(n):"
    k: int = 4
    p: float = 0.9
    max_new_tokens: int = 48
    temperature: float = 0.0
    chat: bool = False
    seed: int = 0


def run(cfg: GenerateConfig) -> list[str]:
    if cfg.k < 1:
        raise ValueError(f"k must be >= 1, got {cfg.k}")
    tok, model = load_causal_lm(cfg.model, cfg.gguf, command="generate")
    model.eval()
    if cfg.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(cfg.prompt, return_tensors="pt").input_ids
    ids = ids.repeat(cfg.k, 1)  # one row per completion: each row draws its own activation masks
    sampling = dict(do_sample=True, temperature=cfg.temperature) if cfg.temperature > 0 else dict(do_sample=False)
    torch.manual_seed(cfg.seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             stochastic_activation=True, stochastic_p=cfg.p, **sampling)
    texts = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]
    mode = f"temperature {cfg.temperature}" if cfg.temperature > 0 else "greedy"
    print(f"{cfg.k} completions, stochastic activations p={cfg.p}, {mode}, seed {cfg.seed}:")
    for i, t in enumerate(texts):
        print(f"--- [{i}] ---\n{cfg.prompt if not cfg.chat else ''}{t}")
    print(f"--- {len(set(texts))} distinct of {len(texts)} ---")
    return texts
