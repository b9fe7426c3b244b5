"""`hf-stochact generate`: k completions of one prompt with stochastic activations (greedy or sampled)."""

from __future__ import annotations

import dataclasses

import torch

from .. import integration  # noqa: F401  (generate accepts stochastic_activation once installed)
from .args import UsageError, at_least, non_negative, option, probability, seed_range, validate
from .loading import load_causal_lm, load_tokenizer, resolve_model


@dataclasses.dataclass
class GenerateConfig:
    model: str = option("", "model folder (config.json, weights, tokenizer) or Hugging Face Hub id; with --gguf, "
                            "the folder or hub repo of the file")
    gguf: str = option("", "GGUF file: a name inside --model, or a path (then --model may be omitted)")
    prompt: str = option("def fibonacci(n):", "the prompt to complete")
    k: int = option(4, "number of completions (one batch row each, each with its own activation draws)",
                    check=at_least(1))
    p: float = option(0.9, "stochastic_p: probability of the smooth branch (SiLU, or the model's own activation) "
                           "at each FFN element, 1 - p that of ReLU; for a ReLU model, P(SiLU) on negative inputs "
                           "(StochA)", check=probability)
    max_new_tokens: int = option(48, "tokens to generate per completion", check=at_least(1))
    temperature: float = option(0.0, "token sampling temperature; 0 = greedy tokens (the diversity then comes "
                                     "from the activations alone)", check=non_negative)
    chat: bool | None = option(None, "wrap the prompt in the tokenizer's chat template (default: yes when the "
                                     "tokenizer has one, as instruct models do; --no-chat for raw text)", flag=True)
    seed: int = option(0, "torch seed for the draws and the sampling", check=seed_range)

    def check(self) -> None:
        resolve_model(self.model, self.gguf)


def prompt_ids(tok, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's token ids [1, T] (through the chat template with ``chat``). Raises :class:`UsageError` for a
    prompt with no tokens: the model needs at least one to continue."""
    if chat:
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
        except Exception as error:  # noqa: BLE001 - a broken template (jinja) fails in many ways
            raise UsageError("--chat", f"the tokenizer's chat template failed: {type(error).__name__}: "
                                       f"{error}; pass --no-chat for the raw prompt") from error
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise UsageError("--prompt", f"{prompt!r} has no tokens{'' if chat else ' (and --no-chat adds none)'}: "
                                     "give the model some text to continue")
    return ids


def run(cfg: GenerateConfig) -> list[str]:
    validate(cfg)
    tok = load_tokenizer(cfg.model, cfg.gguf, command="generate")
    chat = cfg.chat if cfg.chat is not None else bool(getattr(tok, "chat_template", None))
    ids = prompt_ids(tok, cfg.prompt, chat)
    _, model = load_causal_lm(cfg.model, cfg.gguf, command="generate", tokenizer=tok)
    model.eval()
    ids = ids.repeat(cfg.k, 1)  # one row per completion: each row draws its own activation masks
    sampling = dict(do_sample=True, temperature=cfg.temperature) if cfg.temperature > 0 else dict(do_sample=False)
    torch.manual_seed(cfg.seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             stochastic_activation=True, stochastic_p=cfg.p, **sampling)
    texts = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]
    mode = f"temperature {cfg.temperature}" if cfg.temperature > 0 else "greedy"
    print(f"{cfg.k} completions, stochastic activations p={cfg.p}, {mode}, seed {cfg.seed}"
          f"{', chat template' if chat else ''}:")
    for i, t in enumerate(texts):
        print(f"--- [{i}] ---\n{cfg.prompt if not chat else ''}{t}")
    print(f"--- {len(set(texts))} distinct of {len(texts)} ---")
    return texts
