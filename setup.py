"""The optional ahead-of-time build of the C++ CPU ops; all other packaging metadata is in pyproject.toml.

With ``LLM2VEC_FAST_BUILD_CPP=1`` the sources in ``csrc/`` are compiled into ``llm2vec_fast._C``, which
``llm2vec_fast.native`` prefers over its JIT build. That build imports torch, so it runs without build isolation,
against the torch already installed (an isolated environment would pull a CUDA torch):

    LLM2VEC_FAST_BUILD_CPP=1 pip install --no-build-isolation .

Without the variable nothing is compiled: the package ships the sources and JIT-builds them on first use.
"""

import glob
import os

from setuptools import setup


def cpp_extension_kwargs():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("LLM2VEC_FAST_BUILD_CPP") != "1" or not sources:
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        raise RuntimeError("LLM2VEC_FAST_BUILD_CPP=1 compiles against the installed torch: install torch first, "
                           "then run `pip install --no-build-isolation .`") from error

    extension = CppExtension(
        name="llm2vec_fast._C",
        sources=sources,
        # Same flags as the JIT build in llm2vec_fast/native.py (-ffp-contract=off: PyTorch's rounding points).
        extra_compile_args=["-O3", "-fopenmp", "-march=native", "-ffp-contract=off"],
        define_macros=[("LLM2VEC_FAST_PYTHON_MODULE", None)],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cpp_extension_kwargs())
