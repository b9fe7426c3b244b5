"""Generated-code evaluation: the sandbox (scoring that needs the checks to finish, bubblewrap isolation and the
rlimits fallback, bounded reads, waits and cleanup), pass@k, bootstrap intervals and diversity measures.

The adversarial programs go through the public entry point, ``run_sandboxed``. Tests of the bubblewrap isolation
skip where bwrap is unusable, and fail instead when ``HF_STOCHACT_REQUIRE_SANDBOX=1`` (CI sets it)."""

import itertools
import math
import os
import resource
import socket
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

import hf_stochact
from hf_stochact.analysis import codegen

posix_only = pytest.mark.skipif(os.name != "posix", reason="resource limits and process groups are POSIX")


@pytest.fixture
def bwrap():
    """Use in tests of the bubblewrap isolation: skips (or fails, with HF_STOCHACT_REQUIRE_SANDBOX=1) without it."""
    problem = codegen.bubblewrap_problem()
    if problem is not None:
        if os.environ.get(codegen.REQUIRE_ENV) == "1":
            pytest.fail(f"{codegen.REQUIRE_ENV}=1 but bubblewrap is unusable: {problem}")
        pytest.skip(f"bubblewrap isolation unavailable: {problem}")
    return "bubblewrap"


@pytest.fixture(params=["bubblewrap", "rlimits"])
def mode(request):
    """Both isolations: what each guarantees (scoring, bounded reads and waits, cleanup, limits)."""
    return request.getfixturevalue("bwrap") if request.param == "bubblewrap" else "rlimits"


def run(program, mode, checks="", **limits):
    return codegen.run_sandboxed(program, codegen.Limits(**limits), checks=checks, isolation=mode)


def processes_with(marker: str) -> list[str]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def escapee(marker: str, seconds: int = 30, setsid: bool = False, close_fds: bool = False) -> str:
    """Source that starts a grandchild (``marker`` in its command line; optionally in its own session, with every
    file descriptor closed) sleeping ``seconds``, and waits until it runs: then writes ESCAPEE RUNNING to stderr."""
    child = (("os.setsid()\n    " if setsid else "") + ("os.closerange(0, 1024)\n    " if close_fds else "")
             + f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep({seconds})', {marker!r}])")
    return (f"import os, sys, time\nif os.fork() == 0:\n    {child}\n"
            "def _running():\n    for pid in os.listdir('/proc'):\n        try:\n"
            f"            if pid.isdigit() and {marker!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read():\n"
            "                return True\n        except OSError:\n            pass\n"
            "for _ in range(500):\n    if _running():\n        sys.stderr.write('ESCAPEE RUNNING\\n')\n"
            "        sys.stderr.flush()\n        break\n    time.sleep(0.01)\n")


# --- scoring ------------------------------------------------------------------------------------------------------


def test_passing_and_failing_programs(mode):
    ok = run("def add(a, b):\n    return a + b\n", mode, checks="assert add(1, 2) == 3")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and ok.isolation == mode
    failed = run("def add(a, b):\n    return a - b\n", mode, checks="assert add(1, 2) == 3")
    assert failed.status == "failed" and "AssertionError" in failed.stderr_tail and "checks.py" in failed.stderr_tail
    assert run("assert 1 + 1 == 2", mode).passed, "without checks: the program itself must run to its end"
    assert run("assert 1 + 1 == 3", mode).status == "failed"


FORGERIES = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "raise SystemExit": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "posix._exit(0)": "import posix\nposix._exit(0)",
    "unittest.main": "import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
                     "if __name__ == '__main__':\n    unittest.main()",
    "SIGKILL itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "closed stdio": "import os\nfor fd in range(1024):\n    try:\n        os.close(fd)\n    except OSError:\n"
                    "        pass\nimport posix\nposix._exit(0)",
    "prints PASSED": "print('passed'); import sys; sys.stderr.write('PASSED\\n'); sys.exit(0)",
    "swallows the checks": 'x = """',  # concatenated, an unclosed string would have made the tests a string
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(1)",
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_ending_before_the_checks_is_not_a_pass(mode, forgery):
    program = "def solve():\n    return False\n\n" + FORGERIES[forgery]
    result = run(program, mode, checks="assert solve(), 'the checks ran and failed'")
    assert not result.passed and result.status == "failed", (forgery, result)


def test_checks_after_a_program_that_leaves_threads_and_atexit_handlers(mode):
    program = ("import atexit, os, threading, time\natexit.register(lambda: os._exit(3))\n"
               "threading.Thread(target=time.sleep, args=(60,)).start()\ndef solve():\n    return True\n")
    start = time.perf_counter()
    result = run(program, mode, checks="assert solve()", timeout_s=10)
    assert result.passed and time.perf_counter() - start < 5, "after the checks the harness exits at once"


def test_isolation_argument_is_validated():
    with pytest.raises(ValueError, match=r"isolation must be one of \['auto', 'bubblewrap', 'rlimits'\]"):
        codegen.run_sandboxed("pass", isolation="none")


def test_without_bubblewrap_auto_fails_closed_and_rlimits_runs_only_by_name(monkeypatch):
    problem = f"bwrap pretended missing {uuid.uuid4().hex}"
    monkeypatch.setattr(codegen, "_bubblewrap_self_test", lambda: problem)
    monkeypatch.delenv(codegen.REQUIRE_ENV, raising=False)
    for isolation in ("auto", "bubblewrap"):
        with pytest.raises(RuntimeError, match=f"no isolation for untrusted programs.*{problem}.*apt-get install "
                                               "bubblewrap.*isolation='rlimits'"):
            codegen.run_sandboxed("pass", isolation=isolation)
    result = codegen.run_sandboxed("pass", isolation="rlimits")
    assert result.passed and result.isolation == "rlimits"


def test_auto_uses_bubblewrap_where_it_works(bwrap, monkeypatch):
    monkeypatch.delenv(codegen.REQUIRE_ENV, raising=False)
    assert codegen.run_sandboxed("pass").isolation == "bubblewrap"


# --- bounded waits and reads, cleanup (both isolations) -------------------------------------------------------------


@posix_only
def test_timeout_kills_the_whole_process_group(mode, tmp_path):
    marker = f"hf-stochact-sleeper-{uuid.uuid4().hex}"
    code = escapee(marker).replace("os.fork()", "__import__('posix').fork()") + "while True:\n    pass\n"
    start = time.perf_counter()
    result = run(code, mode, timeout_s=2.0)
    assert result.status == "timeout" and time.perf_counter() - start < 2.0 + codegen.KILL_WAIT_S
    assert "ESCAPEE RUNNING" in result.stderr_tail, result
    assert not processes_with(marker), "the grandchild must have been killed with the group"


@posix_only
def test_a_grandchild_holding_stderr_does_not_hold_up_the_result(mode):
    marker = f"hf-stochact-holder-{uuid.uuid4().hex}"
    seconds = 30 if mode == "bubblewrap" else 3  # the fallback cannot kill a setsid'd grandchild: keep it short
    code = (escapee(marker, seconds, setsid=True).replace("os.fork()", "__import__('posix').fork()")
            .replace("os.setsid()", "__import__('posix').setsid()") + "def solve():\n    return True\n")
    start = time.perf_counter()
    result = run(code, mode, checks="assert solve()", timeout_s=5)
    assert result.passed and "ESCAPEE RUNNING" in result.stderr_tail, result
    assert time.perf_counter() - start < 2 + codegen.DRAIN_S + codegen.KILL_WAIT_S
    if mode == "bubblewrap":
        assert not processes_with(marker), "a setsid'd grandchild dies with the PID namespace"


def test_large_stderr_is_read_with_a_bounded_buffer(mode):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    program = ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(200):\n    sys.stderr.write(chunk)\n"
               "sys.stderr.write('END')")
    start = time.perf_counter()
    result = run(program, mode, timeout_s=20, output_bytes=1 << 16)
    assert result.passed and result.stderr_tail.endswith("END") and len(result.stderr_tail) <= 500
    assert time.perf_counter() - start < 20
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < 64 << 20, f"the parent grew by {grown >> 20} MiB reading 200 MiB of stderr"


def test_deep_directories_are_cleaned_up_without_raising(mode, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    program = ("import posix\nfor _ in range(1500):\n    posix.mkdir('d')\n    posix.chdir('d')\n"
               "open('leaf', 'w').write('x')\nposix.chmod('.', 0)")
    result = run(program, mode, timeout_s=20)
    assert result.passed, result
    assert list(tmp_path.iterdir()) == [], "nothing of the run may stay behind"


def test_destructive_calls_are_disabled_in_the_fallback_and_its_directory_is_thrown_away(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    result = run(f"import os\nos.remove({str(victim)!r})", "rlimits")
    assert result.status == "failed" and victim.exists()
    assert run("import subprocess\nsubprocess.Popen(['true'])", "rlimits").status == "failed"
    report = tmp_path / "where.txt"
    result = run(f"open('scratch', 'w').write('x')\nopen({str(report)!r}, 'w').write(__file__)", "rlimits")
    assert result.passed
    work = os.path.dirname(report.read_text())
    assert work != str(tmp_path) and not os.path.exists(work), "the working directory is deleted afterwards"


def test_environment_is_empty(mode, monkeypatch):
    monkeypatch.setenv("HF_STOCHACT_SECRET", "token")
    allowed = {"PATH", "PWD", "OMP_NUM_THREADS", "LC_CTYPE"}  # PWD: bwrap's --chdir; LC_CTYPE: Python's C locale
    assert run(f"import os\nassert set(os.environ) <= {allowed}, dict(os.environ)", mode).passed


@posix_only
def test_memory_file_size_and_cpu_limits(mode):
    big = run("x = bytearray(2 << 30)", mode, memory_bytes=512 << 20)
    assert big.status == "failed" and "MemoryError" in big.stderr_tail
    write = run("open('f', 'wb').write(b'x' * (4 << 20))", mode, file_bytes=1 << 20)
    assert write.status == "failed"
    spin = run("while True: pass", mode, timeout_s=20, cpu_s=1)
    assert spin.status == "failed" and spin.returncode != 0, "RLIMIT_CPU stops a busy loop before the wall clock"
    files = run("import os\nfds = [os.pipe() for _ in range(200)]", mode, open_files=64)
    assert files.status == "failed" and "Too many open files" in files.stderr_tail


# --- isolation (bubblewrap only) ----------------------------------------------------------------------------------


def test_host_files_cannot_be_removed_or_overwritten(bwrap, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    program = (f"import posix, os\nerrors = []\nfor attempt in (lambda: posix.unlink({str(victim)!r}),\n"
               f"                lambda: open({str(victim)!r}, 'w').write('gone'),\n"
               f"                lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x'),\n"
               "                lambda: posix.rename('/usr/bin/env', '/usr/bin/env2'),\n"
               "                lambda: open('/usr/lib/hf_stochact_sandbox_probe', 'w')):\n"
               "    try:\n        attempt()\n    except OSError as e:\n        errors.append(e.errno)\n")
    result = run(program, bwrap, checks="assert len(errors) == 5, errors")
    assert result.passed, result
    assert victim.read_text() == "data" and not (tmp_path / "new.txt").exists()
    assert os.path.exists("/usr/bin/env")


def test_package_source_and_site_packages_are_out_of_reach(bwrap):
    package = Path(hf_stochact.__file__).parent
    targets = [package / "__init__.py", package / "analysis" / "codegen.py",
               Path(sysconfig.get_paths()["purelib"]) / "hf_stochact_probe.pth"]
    before = {t: t.read_bytes() if t.exists() else None for t in targets}
    program = ("errors = []\nfor path in " + repr([str(t) for t in targets]) + ":\n    try:\n"
               "        open(path, 'a').write('import os; os.system(\"echo pwned\")\\n')\n"
               "    except OSError as e:\n        errors.append(e.errno)\n"
               "import sys\nassert not any('site-packages' in p for p in sys.path), sys.path\n")
    result = run(program, bwrap, checks=f"assert len(errors) == {len(targets)}, errors")
    assert result.passed, result
    assert {t: t.read_bytes() if t.exists() else None for t in targets} == before


def test_exec_of_a_shell_is_harmless(bwrap, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    program = f"import os\nos.execv('/bin/sh', ['sh', '-c', 'rm -f {victim}; echo x > {tmp_path}/made; exit 0'])"
    result = run(program, bwrap)
    assert not result.passed and victim.exists() and not (tmp_path / "made").exists()


def test_no_network_not_even_the_hosts_loopback(bwrap):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "    outcome = 'connected'\nexcept OSError as e:\n    outcome = type(e).__name__\n")
        result = run(program, bwrap, checks="assert outcome == 'ConnectionRefusedError', outcome")
        assert result.passed, result
        with pytest.raises(TimeoutError):
            listener.accept()


def test_the_caller_is_invisible_and_cannot_be_signalled(bwrap, monkeypatch):
    secret = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    program = (f"import os, signal\nleaks = []\nfor pid in os.listdir('/proc'):\n    try:\n"
               f"        if pid.isdigit() and {secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read():\n"
               "            leaks.append(pid)\n    except OSError:\n        pass\n"
               "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
               "try:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n    pass\n")
    result = run(program, bwrap, checks="assert not leaks, leaks\nassert max(pids) < 10, pids")
    assert result.passed, result
    assert run("pass", bwrap).passed, "the harness survives"


def test_not_root_and_no_nested_user_namespaces(bwrap):
    program = ("import os, subprocess\nuid = os.getuid()\ntry:\n    os.setuid(0)\n    became_root = True\n"
               "except PermissionError:\n    became_root = False\n"
               "nested = subprocess.run(['unshare', '--user', 'true'], capture_output=True).returncode\n")
    result = run(program, bwrap, checks="assert uid != 0 and not became_root and nested != 0, (uid, nested)")
    assert result.passed, result


def test_processes_are_limited_and_all_killed(bwrap):
    program = ("import os, time\nforked = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
               "    forked += 1\n")
    result = run(program, bwrap, checks="assert forked <= 4, forked", extra_processes=4)
    assert result.passed, result
    marker = f"hf-stochact-bomb-{uuid.uuid4().hex}"
    bomb = escapee(marker) + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.perf_counter()
    result = run(bomb, bwrap, timeout_s=2.0)
    assert result.status == "timeout" and "ESCAPEE RUNNING" in result.stderr_tail, result
    assert time.perf_counter() - start < 2.0 + codegen.KILL_WAIT_S and not processes_with(marker)


def test_closed_descriptors_and_setsid_do_not_escape(bwrap):
    marker = f"hf-stochact-escapee-{uuid.uuid4().hex}"
    result = run(escapee(marker, setsid=True, close_fds=True) + "os._exit(0)", bwrap, timeout_s=5)
    assert not result.passed and "ESCAPEE RUNNING" in result.stderr_tail, result
    assert not processes_with(marker), "a grandchild with its own session and no descriptors dies with the sandbox"


def test_many_small_files_stop_at_the_disk_limit(bwrap):
    program = ("import errno\nwritten, error = 0, None\ntry:\n    for i in range(4000):\n"
               "        with open(f'f{i}', 'wb') as f:\n            f.write(b'x' * 65536)\n        written += 65536\n"
               "except OSError as e:\n    error = e.errno\n")
    result = run(program, bwrap, checks="assert error == errno.ENOSPC and written <= 4 << 20, (error, written)",
                 disk_bytes=4 << 20)
    assert result.passed, result


# --- metrics ------------------------------------------------------------------------------------------------------


def brute_pass_at_k(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (5, 5, 5), (7, 3, 5), (10, 1, 10)])
def test_pass_at_k_equals_the_combinatorial_definition(n, c, k):
    assert math.isclose(codegen.pass_at_k(n, c, k), brute_pass_at_k(n, c, k), abs_tol=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        codegen.pass_at_k(n, c, k)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_problems():
    import numpy as np

    rng = np.random.default_rng(0)
    small, large = rng.random(20) < 0.3, rng.random(2000) < 0.3
    m, lo, hi = codegen.bootstrap_ci(small)
    assert lo <= m <= hi
    _, lo2, hi2 = codegen.bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 4 and lo2 < 0.3 < hi2
    diff = codegen.bootstrap_ci([1.0, 1.0, 0.0, 1.0], paired_with=[1.0, 1.0, 0.0, 1.0])
    assert diff == (0.0, 0.0, 0.0)
    better = rng.random(200) < 0.6
    worse = better & (rng.random(200) < 0.5)  # same problems: worse solves a subset of what better solves
    d, dlo, dhi = codegen.bootstrap_ci(better, paired_with=worse)
    assert d == pytest.approx(better.mean() - worse.mean()) and 0 < dlo < d < dhi, "values - paired_with"
    assert codegen.bootstrap_ci(worse, paired_with=better)[0] == pytest.approx(-d)
    _, ulo, uhi = codegen.bootstrap_ci(better.astype(float) - rng.permutation(worse))
    assert dhi - dlo < uhi - ulo, "pairing removes the shared per-problem variance"
    with pytest.raises(ValueError, match="paired_with"):
        codegen.bootstrap_ci([1.0], paired_with=[1.0, 0.0])


def test_diversity_measures():
    assert codegen.edit_distance("kitten", "sitting") == 3
    assert codegen.edit_distance([], ["a"]) == 1
    assert codegen.distinct_n(["a b c", "a b c"], 2) == 0.5
    assert codegen.unique_fraction(["x", " x ", "y"]) == pytest.approx(2 / 3)
    assert codegen.mean_pairwise_edit_distance(["a b", "a b"]) == 0.0
    assert codegen.mean_pairwise_edit_distance(["a b", "c d"]) == 1.0
