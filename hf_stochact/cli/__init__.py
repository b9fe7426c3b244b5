"""The ``hf-stochact`` command line: ``demo`` (the main job), ``relufy``, ``recover``, ``bench``, ``sparsity``,
``generate``, ...

Each command's options are the fields of its config dataclass (:mod:`hf_stochact.cli.args`): every flag has help
text, every value is checked before a model is loaded, and a bad value ends the command with
``hf-stochact <command>: error: --flag: ...`` and exit status 2 (no traceback). ``--config FILE`` (YAML or JSON)
sets any of a command's options; flags on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import warnings
from pathlib import Path

from .. import __version__
from .args import CONFIG_HELP, UsageError, UsageWarning, add_arguments, read_config_file, validate

# command: (module with a <Name>Config dataclass and run(cfg), config class name, help)
COMMANDS = {
    "demo": ("hf_stochact.cli.demo", "DemoConfig",
             "train a small Llama on CPython's stdlib with StochA+FT and report perplexity and FFN sparsity"),
    "relufy": ("hf_stochact.cli.relufy", "RelufyConfig",
               "fine-tune a pretrained SiLU model into a sparse ReLU model (e.g. SmolLM2-135M from a GGUF file)"),
    "recover": ("hf_stochact.cli.recover", "RecoverConfig",
                "fine-tune a model with its input thresholds active (sparsity-aware recovery, distilled from dense)"),
    "bench": ("hf_stochact.cli.bench", "BenchConfig",
              "dense vs sparse FFN speed on this CPU: MLP microbenchmarks, or decode tokens/s of --model"),
    "sparsity": ("hf_stochact.cli.sparsity", "SparsityConfig",
                 "per-layer FFN sparsity of a model on real text: exact zeros, magnitude, CETT, reuse across tokens"),
    "frontier": ("hf_stochact.cli.frontier", "FrontierConfig",
                 "perplexity vs end-to-end decode speed of sparse points (input thresholds, ReLU) on a real model"),
    "generate": ("hf_stochact.cli.generate", "GenerateConfig",
                 "print k completions of a prompt with stochastic activations (diverse even when greedy)"),
    "uncertainty": ("hf_stochact.cli.uncertainty", "UncertaintyConfig",
                    "per-token uncertainty (mutual information of stochastic-activation samples) of a text or reply"),
}


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-stochact`` with ``argv`` (default: ``sys.argv[1:]``); returns 0.

    Errors end the command through ``SystemExit``: a bad value, ``hf-stochact <command>: error: --flag: ...`` on
    one line with status 2 (argparse's convention); Ctrl-C, ``hf-stochact <command>: interrupted`` with status
    130; a failure of the machine rather than of an argument (a full disk, out of memory), one line with status 1
    (``HF_STOCHACT_TRACEBACK=1`` shows the traceback instead).
    """
    prog = "hf-stochact"
    try:
        parser = argparse.ArgumentParser(prog=prog, description="Stochastic activations for transformers models")
        parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        sub = parser.add_subparsers(dest="command", required=True)
        parsers = {}
        for name, (module, cls_name, help_text) in COMMANDS.items():
            cls = getattr(importlib.import_module(module), cls_name)
            parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
            add_arguments(parsers[name], cls)
            parsers[name].add_argument("--config", metavar="FILE", default="", help=CONFIG_HELP)
        args = parser.parse_args(argv)
        prog = parsers[args.command].prog
        module_name, cls_name, _ = COMMANDS[args.command]
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        from_file: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("always", UsageWarning)  # shown once each by _show_warning
            warnings.showwarning = _show_warning(prog, warnings.showwarning)
            try:
                if args.config:  # the file's values become the defaults; the command line overrides them
                    from_file = read_config_file(args.config, cls)
                    parsers[args.command].set_defaults(**from_file)
                    args = parser.parse_args(argv)
                cfg = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
                validate(cfg)  # every value, before any model is loaded
                module.run(cfg)
            except UsageError as error:  # also raised while loading a model the checks could not vet
                parsers[args.command].error(_one_line(str(error)) + _from_file(error, args, from_file))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)  # a new line: a progress bar may hold the current one
        raise SystemExit(130) from None
    except BrokenPipeError:  # `hf-stochact generate ... | head`: the reader left; no message, no flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except _machine_errors() as error:
        if os.environ.get("HF_STOCHACT_TRACEBACK"):
            raise
        print(f"{prog}: error: {_failure(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One process of `accelerate launch` / torchrun, done (the Trainer destroyed the process group). Leave
        # without interpreter finalization: gloo's process-group destructor, run there while DDP's reducer still
        # holds the group, can deadlock joining its worker threads (tests/dist_schedule_worker.py has the stacks).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _machine_errors() -> tuple[type[BaseException], ...]:
    """Failures of the machine, not of an argument: a full disk, a missing permission, memory."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError
    return OSError, MemoryError, oom


def _from_file(error: UsageError, args, from_file: dict) -> str:
    """`` (set in FILE)`` where the bad value came from the --config file."""
    name = error.flag.lstrip("-").replace("-", "_")
    if name in from_file and getattr(args, name, object()) == from_file[name]:
        return f" (set in {args.config})"
    return ""


def _show_warning(prog: str, show):
    """Warnings of hf_stochact (a :class:`UsageWarning`, a busy machine, ...) as one line
    ``hf-stochact <command>: warning: ...``, each once (the checks run in ``main`` and again in ``run``); any other
    warning as Python shows it."""
    package = Path(__file__).resolve().parent.parent
    shown: set[str] = set()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UsageWarning) or Path(filename).resolve().is_relative_to(package):
            text = _one_line(str(message))
            if text not in shown:
                shown.add(text)
                print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _failure(error: BaseException) -> str:
    if not isinstance(error, OSError):
        return "out of memory: lower the batch, block or model size (HF_STOCHACT_TRACEBACK=1 for the traceback)"
    return _one_line(f"{type(error).__name__}: {error}") + " (HF_STOCHACT_TRACEBACK=1 for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
