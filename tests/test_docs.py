"""README.md and docs/*.md: every path and command works for someone with only this repository and PyPI."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOCAL_ONLY = [
    (re.compile(r"\.\./shared"), "a folder outside the repository"),
    (re.compile(r"BASELINE\.md"), "a file outside the repository"),
    (re.compile(r"(?<![\w.])/(work|tmp|root|home)/"), "an absolute path of one machine"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "an issue number of a tracker readers cannot see"),
    (re.compile(r"\bissue\s*#?\d+|\bitem \d+\b", re.I), "an issue reference readers cannot follow"),
]
FILE_REF = re.compile(r"\b((?:hf_stochact|examples|tests)/[\w/]*\w\.(?:py|c)|docs/[\w.-]+\.(?:md|json|png|jsonl))\b")
LINK = re.compile(r"\]\(([^)#:]+)\)")  # relative markdown links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_reference_outside_the_repository(page):
    text = page.read_text()
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} ({why})"
             for pattern, why in LOCAL_ONLY for m in pattern.finditer(text)]
    assert not found, f"{page.name}:\n" + "\n".join(found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_files_and_links_exist(page):
    text = page.read_text()
    missing = sorted({m.group(1) for m in FILE_REF.finditer(text) if not (ROOT / m.group(1)).exists()})
    missing += sorted({m.group(1) for m in LINK.finditer(text) if not (page.parent / m.group(1)).exists()})
    assert not missing, f"{page.name} names files that are not in the repository: {missing}"
