"""Packaging (metadata lives in pyproject.toml).

``SEPCONV_BUILD_EXT=1 pip install --no-build-isolation .`` also compiles the C++ CPU
kernels ahead of time into ``kernels/_sepconv_cpp*.so`` (this imports torch, hence no
build isolation); ``kernels.cpp_backend.load()`` then uses that library instead of
compiling on first use. Without the switch nothing is compiled here.

The library is built for this machine's CPU (``-march=native``: its best vector path,
AVX-512, AVX2+FMA or NEON). ``SEPCONV_EXTRA_CFLAGS`` adds flags, as for the build on
first use: ``SEPCONV_EXTRA_CFLAGS=-march=x86-64-v3`` builds the AVX2 path for any x86-64
CPU with AVX2 and FMA. A library built for an ISA the CPU lacks is refused when loaded.
"""

import os

from setuptools import setup


def _extensions():
    if os.environ.get("SEPCONV_BUILD_EXT", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = ["-O3", "-march=native", "-fopenmp"] + os.environ.get("SEPCONV_EXTRA_CFLAGS", "").split()
    extension = CppExtension(
        "kernels._sepconv_cpp",
        ["kernels/csrc/sepconv_cpu.cpp"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "csrc")],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extensions())
