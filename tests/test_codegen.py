"""Generated-code evaluation: the sandbox (limits, process-group kill, throw-away directory), pass@k, bootstrap
intervals and diversity measures."""

import itertools
import math
import os
import time

import pytest

from hf_stochact.analysis import codegen

posix_only = pytest.mark.skipif(os.name != "posix", reason="resource limits and process groups are POSIX")


def test_passing_and_failing_programs():
    assert codegen.run_sandboxed("assert 1 + 1 == 2").status == "passed"
    failed = codegen.run_sandboxed("assert 1 + 1 == 3")
    assert failed.status == "failed" and "AssertionError" in failed.stderr_tail


@posix_only
def test_timeout_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "alive"
    # the program's child (started before the guard could stop it: via the saved os.fork) outlives its parent
    code = (f"import time, posix\npid = posix.fork()\nif pid == 0:\n    time.sleep(3)\n"
            f"    open({str(marker)!r}, 'w').write('x')\nelse:\n    while True: pass\n")
    start = time.perf_counter()
    result = codegen.run_sandboxed(code, codegen.Limits(timeout_s=1.0))
    assert result.status == "timeout" and time.perf_counter() - start < 3
    time.sleep(3.5)
    assert not marker.exists(), "the grandchild must have been killed with the group"


@posix_only
def test_memory_file_size_and_cpu_limits():
    big = codegen.run_sandboxed("x = bytearray(2 << 30)", codegen.Limits(memory_bytes=512 << 20))
    assert big.status == "failed" and "MemoryError" in big.stderr_tail
    write = codegen.run_sandboxed("open('f', 'wb').write(b'x' * (4 << 20))", codegen.Limits(file_bytes=1 << 20))
    assert write.status == "failed"
    spin = codegen.run_sandboxed("while True: pass", codegen.Limits(timeout_s=20, cpu_s=1))
    assert spin.status == "failed" and spin.returncode != 0, "RLIMIT_CPU stops a busy loop before the wall clock"


def test_destructive_calls_are_disabled_and_the_directory_is_thrown_away(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    result = codegen.run_sandboxed(f"import os\nos.remove({str(victim)!r})")
    assert result.status == "failed" and victim.exists()
    assert codegen.run_sandboxed("import subprocess\nsubprocess.Popen(['true'])").status == "failed"
    report = tmp_path / "where.txt"
    result = codegen.run_sandboxed(f"open('scratch', 'w').write('x')\nopen({str(report)!r}, 'w').write(__file__)")
    assert result.passed
    work = os.path.dirname(report.read_text())
    assert work != str(tmp_path) and not os.path.exists(work), "the working directory is deleted afterwards"


def test_environment_is_empty():
    os.environ["HF_STOCHACT_SECRET"] = "token"
    try:
        assert codegen.run_sandboxed("import os\nassert 'HF_STOCHACT_SECRET' not in os.environ").passed
    finally:
        del os.environ["HF_STOCHACT_SECRET"]


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
