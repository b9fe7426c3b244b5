"""Every ```python block of README.md runs as written, each in a fresh interpreter (a subprocess in an empty folder).

A block that cannot run here (it needs a large download) is preceded by ``<!-- not-run: reason -->``; the test
counts those and checks each gives a reason.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!--\s*not-run:(?P<reason>.*?)-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
NOT_RUN_EXPECTED = 1  # the GGUF example (SmolLM2 file); tests/test_serializable.py runs its calls on a small GGUF


def blocks():
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), (m.group("reason") or "").strip() or None)
            for m in BLOCK.finditer(text)]


def test_blocks_found_and_not_run_ones_say_why():
    found = blocks()
    assert len(found) >= 8
    skipped = [(line, reason) for line, _, reason in found if reason is not None]
    assert len(skipped) == NOT_RUN_EXPECTED, skipped
    assert all(len(reason) > 10 for _, reason in skipped)
    assert len(re.findall(r"^```python", README.read_text(), re.M)) == len(found)


@pytest.mark.parametrize("line,code,reason", blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip(f"README.md line {line}: not-run: {reason}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, f"README.md block at line {line} failed:\n{code}\n{result.stderr[-3000:]}"
