"""`llm2vec-fast env`: what this installation runs, for a bug report or a performance question.

It prints the versions of the stack, the settings in force (llm2vec_fast/settings.py), where the C++ CPU ops were
loaded from, and the implementation table of every op in dispatch order with whether each is available here
(llm2vec_fast/backends.py). Loading the C++ ops builds them the first time (~30 s), as encode would.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform

PACKAGES = ("llm2vec-fast", "torch", "transformers", "triton", "numpy", "peft", "tokenizers", "safetensors",
            "sentence-transformers", "kernels")


def register(subparsers) -> None:
    """Add the `env` subcommand's parser to `subparsers`."""
    parser = subparsers.add_parser("env", help="print versions, settings and which implementation runs each op",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.set_defaults(func=run)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    """{"python", "packages", "settings", "native", "backends"}: what `env` prints."""
    from .. import backends, native, settings

    return dict(python=platform.python_version(), packages={p: _version(p) for p in PACKAGES},
                settings=dataclasses.asdict(settings.current()),
                native=native.source() or "unavailable (PyTorch path)", backends=backends.describe())


def run(args) -> int:
    info = report()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"python {info['python']}")
    for package, version in info["packages"].items():
        print(f"{package:<22} {version}")
    print()
    for name, value in info["settings"].items():
        print(f"setting {name:<15} {value}")
    print(f"C++ CPU ops            {info['native']}")
    print()
    print(f"{'op':<10} {'implementation':<14} {'device':<7} {'available':<10} setting")
    for row in info["backends"]:
        print(f"{row['op']:<10} {row['implementation']:<14} {row['device']:<7} {'yes' if row['available'] else 'no':<10} "
              f"{row['setting']}")
    return 0
