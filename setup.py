"""Builds the optional C loops (hf_stochact/kernels/csrc/kernels.c: CPython's limited API, no torch headers at build
time).

OpenMP is detected, not assumed: a small program is compiled and linked with each candidate flag set (GCC/Clang
``-fopenmp``, Apple clang ``-Xpreprocessor -fopenmp -lomp``, MSVC ``/openmp``); without one the loops build
single-threaded. If no C compiler works the package still installs and every operator runs its torch
implementation, unless ``HF_STOCHACT_REQUIRE_KERNELS=1`` is set (CI), which turns a failed build into an error.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("HF_STOCHACT_REQUIRE_KERNELS", "") not in ("", "0")
OMP_CHECK = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def openmp_flags(compiler) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that build and link an OpenMP program with ``compiler``; ([], []) if none."""
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"]), (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.c")
        with open(src, "w") as f:
            f.write(OMP_CHECK)
        for cflags, lflags in candidates:
            try:
                objects = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objects, os.path.join(tmp, "omp_check"), extra_postargs=lflags)
                return cflags, lflags
            except Exception:  # noqa: BLE001 - CompileError/LinkError/OSError: try the next candidate
                continue
    return [], []


class OptionalBuildExt(build_ext):
    def build_extensions(self):
        cflags, lflags = openmp_flags(self.compiler)
        print(f"hf_stochact: OpenMP flags {cflags or 'none (single-threaded loops)'}")
        optimise = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = optimise + cflags
            ext.extra_link_args = lflags
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: install without the fast path
            if REQUIRE:
                raise
            print(f"hf_stochact: C kernels not built ({exc}); operators use their torch implementations")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if REQUIRE:
                raise
            print(f"hf_stochact: C kernel {ext.name} not built ({exc}); operators use their torch implementations")


# Only the limited (stable) C API of CPython 3.10: the module builds as _C.abi3.so, and setup.cfg's
# [bdist_wheel] py_limited_api = cp310 tags the wheel cp310-abi3 (one wheel per platform for every Python >= 3.10).
LIMITED_API = ("Py_LIMITED_API", "0x030A0000")

setup(
    ext_modules=[Extension("hf_stochact.kernels._C", ["hf_stochact/kernels/csrc/kernels.c",
                                                       "hf_stochact/kernels/csrc/decode.c"], py_limited_api=True,
                           define_macros=[LIMITED_API])],
    cmdclass={"build_ext": OptionalBuildExt},
)
