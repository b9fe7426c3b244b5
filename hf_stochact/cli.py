"""The ``hf-stochact`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")


def main(argv: list[str] | None = None) -> int:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="hf-stochact", description="Stochastic activations for transformers models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small stochastic Llama on CPython's stdlib and report sparsity")
    _add_dataclass_args(demo, DemoConfig)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run

        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
