"""The ``hf-stochact`` command line: ``demo`` (the main job) and ``relufy``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

# command: (module with a <Name>Config dataclass and run(cfg), config class name, help)
COMMANDS = {
    "demo": ("hf_stochact.cli.demo", "DemoConfig",
             "train a small Llama on CPython's stdlib with StochA+FT and report perplexity and FFN sparsity"),
    "relufy": ("hf_stochact.cli.relufy", "RelufyConfig",
               "fine-tune a pretrained SiLU model into a sparse ReLU model (e.g. SmolLM2-135M from a GGUF file)"),
    "bench": ("hf_stochact.cli.bench", "BenchConfig",
              "dense vs sparse FFN speed on this CPU: MLP microbenchmarks, or decode tokens/s of --model"),
    "sparsity": ("hf_stochact.cli.sparsity", "SparsityConfig",
                 "per-layer FFN sparsity of a model on real text: exact zeros, magnitude, CETT, reuse across tokens"),
    "generate": ("hf_stochact.cli.generate", "GenerateConfig",
                 "print k completions of a prompt with stochastic activations (diverse even when greedy)"),
}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-stochact", description="Stochastic activations for transformers models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cls_name, help_text) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        _add_dataclass_args(sub.add_parser(name, help=help_text, description=help_text), cls)
    args = parser.parse_args(argv)
    module_name, cls_name, _ = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    module.run(cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
