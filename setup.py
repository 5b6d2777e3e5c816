"""Builds anybit's native CPU kernels (one C++ file, OpenMP; no PyTorch headers, so one build
serves every torch version). Everything else is in pyproject.toml.

The kernels are optional at run time: if the compiler is missing or the build fails,
set ANYBIT_NO_NATIVE=1 to install without them; anybit then runs its PyTorch reference
kernels and says so once.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """build_ext that replaces an existing library file instead of rewriting it: a process
    that has the old library mapped (a long quantization run) keeps reading the old file,
    where writing into it in place (what copy_file does for --inplace) crashed such
    processes with SIGBUS/SIGSEGV."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        if os.path.isfile(outfile) and not os.path.samefile(infile, outfile):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)

ext_modules = []
if os.environ.get("ANYBIT_NO_NATIVE") != "1":
    ext_modules.append(Extension(
        "anybit.kernels._native",
        sources=["src/anybit/kernels/native/anybit_native.cpp"],
        depends=["src/anybit/kernels/native/kernels_impl.inc", "src/anybit/kernels/native/kernels_q8.inc",
                 "src/anybit/kernels/native/kernels_decode.inc", "src/anybit/kernels/native/kernels_bcq_vnni.inc",
                 "src/anybit/kernels/native/kernels_q8_rows16.inc",
                 "src/anybit/kernels/native/kernels_train.inc"],
        language="c++",
        # per-ISA code is selected with #pragma GCC target inside the file, not with -m flags;
        # -fno-trapping-math (no FP exception is ever read) lets float clamps become selects,
        # so that loops with one vectorize (exp_fast in kernels_decode.inc); values unchanged
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
