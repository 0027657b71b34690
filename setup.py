"""Packaging for llm2vec-fast.

The Triton sources live in the top-level ``kernels/`` folder of the repository and are installed as the
sub-package ``llm2vec_fast.kernels`` (a top-level ``kernels`` package would shadow Hugging Face's ``kernels``
hub package, which transformers imports when it is installed).

The optional C++ CPU extension in ``csrc/`` is built only when asked (``LLM2VEC_FAST_BUILD_CPP=1``) and when
there is something to build; without it the package installs and falls back to PyTorch.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpp_extension_kwargs():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("LLM2VEC_FAST_BUILD_CPP") != "1" or not sources:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        name="llm2vec_fast._C",
        sources=sources,
        # Same flags as the JIT build in llm2vec_fast/native.py (-ffp-contract=off: PyTorch's rounding points).
        extra_compile_args=["-O3", "-fopenmp", "-march=native", "-ffp-contract=off"],
        define_macros=[("LLM2VEC_FAST_PYTHON_MODULE", None)],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="llm2vec-fast",
    version="0.1.0",
    description="Kernel-accelerated LLM2Vec: decoder LLMs as bidirectional text encoders, encoded and trained fast",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["llm2vec_fast", "llm2vec_fast.kernels"],
    package_dir={"llm2vec_fast": "llm2vec_fast", "llm2vec_fast.kernels": "kernels"},
    package_data={"llm2vec_fast": ["data/*.txt", "data/*.jsonl"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17,<6",
        "peft>=0.15",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        # Reading the embedded default model (a GGUF file) needs these two.
        "default-model": ["gguf>=0.10", "accelerate>=1.0"],
        # Evaluation integrations (llm2vec_fast.evaluation, benchmarks/plots.py); the Lee pairs come from gensim.
        "eval": ["sentence-transformers>=6.0", "mteb>=2.26", "matplotlib>=3.8", "gensim>=4.3"],
        # sentence-transformers is here too so that CI exercises the integration; mteb stays optional (skipped).
        "test": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "gguf>=0.10", "accelerate>=1.0", "gensim>=4.3",
                 "ninja>=1.11", "sentence-transformers>=6.0"],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
    **cpp_extension_kwargs(),
)
