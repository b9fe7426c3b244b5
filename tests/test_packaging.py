"""Packaging: one version everywhere, the entry points, the lazy public API, install()/uninstall()."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import hf_stochact

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_value(key):  # tomllib is 3.11+; the package supports 3.10
    return re.search(rf'^{key} = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_one_version():
    declared = _pyproject_value("version")
    assert hf_stochact.__version__ == importlib.metadata.version("hf_stochact") == declared
    assert f"## {declared}" in (ROOT / "CHANGELOG.md").read_text()


def test_version_flag_and_python_dash_m():
    version = _run("-m", "hf_stochact", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hf-stochact {hf_stochact.__version__}"
    for module in ("hf_stochact", "hf_stochact.cli"):
        result = _run("-m", module, "--help")
        assert result.returncode == 0, result.stderr
        assert "relufy" in result.stdout and "demo" in result.stdout


def test_import_is_light_and_registers_the_activation():
    code = ("import sys, hf_stochact\n"
            "from transformers.activations import ACT2FN\n"
            "assert type(ACT2FN['stochastic']).__name__ == 'StochasticActivation'\n"
            "heavy = ['datasets', 'trl', 'matplotlib', 'peft', 'gguf', 'hf_stochact.cli', 'hf_stochact.analysis',\n"
            "         'hf_stochact.data', 'hf_stochact.training', 'transformers.modeling_utils',\n"
            "         'transformers.generation.utils', 'transformers.trainer']\n"
            "print([m for m in heavy if m in sys.modules])\n")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_names_resolve_and_match_the_type_checking_imports():
    tree = ast.parse((ROOT / "hf_stochact" / "__init__.py").read_text())
    checked = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                checked.update({alias.name: "." * imp.level + imp.module for alias in imp.names})
    assert checked == hf_stochact._LAZY
    for name in hf_stochact.__all__:
        assert getattr(hf_stochact, name) is not None, name
    assert set(hf_stochact.__all__) <= set(dir(hf_stochact))


def test_patches_are_applied_when_their_module_is_imported_and_uninstall_restores_them():
    code = """
import sys
import hf_stochact
assert "transformers.modeling_utils" not in sys.modules
import peft  # noqa: F401 - imports transformers' modeling, generation and Trainer code, and peft.peft_model
from peft import PeftModel
from transformers import GenerationMixin, PreTrainedModel, activations
from transformers.trainer_callback import CallbackHandler
from transformers.models.musicgen.modeling_musicgen import MusicgenForConditionalGeneration

targets = [(PreTrainedModel, "post_init"), (GenerationMixin, "generate"), (CallbackHandler, "add_callback"),
           (PeftModel, "save_pretrained"), (MusicgenForConditionalGeneration, "generate"),
           (PreTrainedModel, "resize_token_embeddings"), (PreTrainedModel, "save_pretrained")]
original_musicgen = MusicgenForConditionalGeneration.__dict__["generate"]
from hf_stochact.integration.generation import wrap_class_generate
assert wrap_class_generate(MusicgenForConditionalGeneration)  # as post_init does for the first model built
patched = {t: owner.__dict__[t] for owner, t in targets}
assert all(getattr(f, "_hf_stochact", False) for f in patched.values()), patched
assert isinstance(PeftModel.__dict__["from_pretrained"], classmethod)
assert "stochastic" in activations.ACT2FN and "stochastic" in activations.ACT2CLS

assert hf_stochact.uninstall() > 0
for (owner, t) in targets:
    assert not getattr(owner.__dict__[t], "_hf_stochact", False), (owner, t)
assert MusicgenForConditionalGeneration.__dict__["generate"] is original_musicgen
assert PeftModel.__dict__["from_pretrained"].__func__.__qualname__ == "PeftModel.from_pretrained"
for name in ("stochastic", "learnable_stoch", "gumbel_stoch"):
    assert name not in activations.ACT2FN and name not in activations.ACT2CLS, name

hf_stochact.install()
assert all(getattr(owner.__dict__[t], "_hf_stochact", False) for owner, t in targets[:4])
assert "stochastic" in activations.ACT2FN
print("ok")
"""
    result = _run("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_package_data_and_metadata():
    assert (ROOT / "hf_stochact" / "py.typed").is_file()
    meta = importlib.metadata.metadata("hf_stochact")
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(c == "Typing :: Typed" for c in meta.get_all("Classifier"))
    assert _pyproject_value("license") == "Apache-2.0"
    assert re.search(r'^hf_stochact = \[.*"py.typed"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert re.search(r'^test = \[.*"peft', (ROOT / "pyproject.toml").read_text(), re.M)
