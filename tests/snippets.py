"""The code blocks of README.md and docs/*.md, and how tests/test_docs.py runs them.

Every fenced block has a language. `python` and `bash` blocks are run unless the line right before the fence marks
them; `text` blocks are program output or listings and are shown, not run; a block in any other language (a
config file) must be written to a file by its marker, for the blocks after it to use. The markers:

    <!-- snippet: file NAME -->              write the block to NAME in the document's work folder
    <!-- snippet: needs-network: why -->     not run: it downloads packages, models or data sets
    <!-- snippet: needs-gpu: why -->         not run: it needs a CUDA GPU
    <!-- snippet: needs-cluster: why -->     not run: it needs several machines or a Ray cluster to join
    <!-- snippet: long-running: why -->      not run: it takes minutes or more (benchmarks, the whole test suite)

A marked block is still checked without running it (`check_marked`): its `llm2vec-fast` command lines must parse,
the scripts and modules it runs must exist and take the options it passes, `pip install` constraint files and
extras must exist.

How a bash block runs (`BashRunner`): one logical line (backslash continuations joined) at a time, in the
document's work folder. `llm2vec-fast ARGS` and `python -m llm2vec_fast ARGS` call the command line's `main` in
this process (a subprocess would pay the import of torch for every line); `python -m llm2vec_fast.demo` calls the
demo's `main`; `torchrun` and `python benchmarks/...` run for real, as subprocesses; the plain shell tools of
SHELL_TOOLS run through bash.
Anything else is an error: mark the block, or teach this module the command. The one change made to what a
document says is TRAIN_SHRINK: `llm2vec-fast train` runs 2 steps of small batches (the values are replaced, or
added where the command leaves them to their defaults), since the recipe's 1000 steps of 16k tokens are minutes on
a tiny model too. Python blocks run with `exec`, one namespace per document, so a block
sees what the blocks above it defined.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from repo_root import REPO

DOCUMENTS = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))

SKIP_MARKERS = {
    "needs-network": "downloads packages, models or data sets",
    "needs-gpu": "needs a CUDA GPU",
    "needs-cluster": "needs several machines or a Ray cluster to join",
    "long-running": "takes minutes or more",
}
FILE_MARKER = "file"
RUN_LANGUAGES = ("python", "bash")
TEXT_LANGUAGE = "text"

MARKER = re.compile(r"^<!--\s*snippet:\s*(?P<kind>[a-z][a-z-]*)(?:\s+(?P<arg>[^\s:]+))?"
                    r"\s*(?::\s*(?P<reason>.*?))?\s*-->$")
FENCE = re.compile(r"^```(?P<language>[A-Za-z0-9_+-]*)\s*$")

# `llm2vec-fast train STAGE` in a document runs with these values instead (2 steps of small batches).
TRAIN_SHRINK = {"--steps": "2", "--batch-size": "8"}
TRAIN_SHRINK_STAGE = {"mntp": {"--block-size": "64"}}
# Commands a bash block may use besides llm2vec-fast, python -m llm2vec_fast[.demo] and torchrun: run by bash.
SHELL_TOOLS = {"printf", "echo", "cat", "head", "tail", "ls", "mkdir", "cp", "wc", "sort", "du"}


@dataclasses.dataclass
class Snippet:
    doc: str
    line: int  # the line of the opening fence, 1-based
    language: str
    code: str
    marker: str | None = None
    arg: str | None = None
    reason: str | None = None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.marker is None


def parse(doc: str) -> tuple[list[Snippet], list[str]]:
    """The fenced blocks of `doc` (a path relative to the repository) and the problems found while reading them:
    an unclosed fence, a `snippet:` comment that does not parse, or one that no block follows."""
    lines = (REPO / doc).read_text().splitlines()
    snippets, problems = [], []
    pending = None  # (line number, match) of a marker waiting for its block
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        fence = FENCE.match(lines[i])
        if "<!-- snippet" in text or "<!--snippet" in text:
            match = MARKER.match(text)
            if match is None:
                problems.append(f"{doc}:{i + 1}: malformed snippet marker {text!r}")
            pending = (i + 1, match)
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"{doc}:{i + 1}: unclosed code fence")
                break
            snippet = Snippet(doc, i + 1, fence["language"], "\n".join(lines[i + 1:end]) + "\n")
            if pending and pending[1] is not None:
                match = pending[1]
                snippet.marker, snippet.arg, snippet.reason = match["kind"], match["arg"], match["reason"]
            pending = None
            snippets.append(snippet)
            i = end
        elif text.startswith("```"):
            problems.append(f"{doc}:{i + 1}: an indented code fence (start code blocks at the first column)")
        elif text and pending:
            problems.append(f"{doc}:{pending[0]}: a snippet marker must be the line right before a code fence")
            pending = None
        i += 1
    return snippets, problems


def all_snippets() -> list[Snippet]:
    return [s for doc in DOCUMENTS for s in parse(doc)[0]]


def marker_problem(snippet: Snippet) -> str | None:
    """Why `snippet` is neither run nor properly marked (None when it is fine)."""
    where = f"{snippet.id} ({snippet.language or 'no language'})"
    if snippet.marker == FILE_MARKER:
        if not snippet.arg or snippet.reason:
            return f"{where}: write it as <!-- snippet: file NAME -->"
        return None
    if snippet.marker is not None:
        if snippet.marker not in SKIP_MARKERS:
            return f"{where}: unknown marker {snippet.marker!r}; known: file, {', '.join(SKIP_MARKERS)}"
        if snippet.arg or not snippet.reason:
            return f"{where}: write it as <!-- snippet: {snippet.marker}: the reason -->"
        if snippet.language not in RUN_LANGUAGES:
            return f"{where}: only python and bash blocks are marked as not run"
        return None
    if snippet.language in RUN_LANGUAGES or snippet.language == TEXT_LANGUAGE:
        return None
    if not snippet.language:
        return f"{where}: give the block a language (python, bash, or text for output)"
    return f"{where}: a {snippet.language} block must be written to a file (<!-- snippet: file NAME -->)"


def logical_lines(code: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comment and blank lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def split_command(line: str) -> tuple[dict, list[str]]:
    """(leading VAR=value assignments, argv) of one command line; comments are dropped."""
    argv = shlex.split(line, comments=True)
    assignments = {}
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        assignments[name] = value
    return assignments, argv


def cli_argv(argv: list[str]) -> list[str] | None:
    """The llm2vec-fast arguments of a command line that runs our command line, else None."""
    if argv[:1] == ["llm2vec-fast"]:
        return argv[1:]
    if argv[:3] == ["python", "-m", "llm2vec_fast"]:
        return argv[3:]
    if argv[:1] == ["torchrun"] and "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["llm2vec_fast"]:
        return argv[argv.index("-m") + 2:]
    return None


def shrink_train(args: list[str]) -> list[str]:
    """`args` of `llm2vec-fast train STAGE ...` with the values of TRAIN_SHRINK (and TRAIN_SHRINK_STAGE), replaced
    or added."""
    if args[:1] != ["train"] or "--help" in args or "-h" in args:
        return list(args)
    out = list(args)
    stage = next((a for a in out[1:] if not a.startswith("-")), "")
    for option, value in {**TRAIN_SHRINK, **TRAIN_SHRINK_STAGE.get(stage, {})}.items():
        if option in out[:-1]:
            out[out.index(option) + 1] = value
        else:
            out += [option, value]
    return out


def python_imports(code: str) -> list[str]:
    """Top-level package names a Python block imports."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module.split(".")[0])
    return names


def missing_modules(names) -> list[str]:
    return [name for name in dict.fromkeys(names) if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------------------------------ marked blocks


def _parse_cli(args: list[str]) -> str | None:
    from llm2vec_fast.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit as exit_:
        return f"does not parse (exit {exit_.code})"
    return None


def _options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _script_takes(path: Path, options: list[str]) -> list[str]:
    source = path.read_text()
    return [o for o in options if f'"{o}"' not in source and f"'{o}'" not in source]


def check_marked(snippet: Snippet) -> list[str]:
    """What is wrong with a block that is not run: a Python block must compile; in a bash block, llm2vec-fast
    lines must parse, our scripts and modules must exist and take the options given, pip's constraint files and
    extras and make's targets must exist."""
    if snippet.language == "python":
        try:
            compile(snippet.code, snippet.id, "exec")
        except SyntaxError as error:
            return [f"{snippet.id}: {error}"]
        return []
    problems = []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    makefile = (REPO / "Makefile").read_text()
    for line in logical_lines(snippet.code):
        _, argv = split_command(line)
        if not argv:
            continue
        where = f"{snippet.id}: `{line}`"
        args = cli_argv(argv)
        if args is not None:
            if (problem := _parse_cli(args)) is not None:
                problems.append(f"{where} {problem}")
        elif argv[0] in ("python", "bash") and len(argv) > 1 and argv[1].startswith("benchmarks/"):
            script = REPO / argv[1]
            if not script.is_file():
                problems.append(f"{where}: no file {argv[1]}")
            elif missing := _script_takes(script, _options(argv[2:])):
                problems.append(f"{where}: {argv[1]} takes no {missing}")
        elif argv[:2] == ["python", "-m"]:
            module = argv[2]
            spec = importlib.util.find_spec(module)
            if spec is None:
                problems.append(f"{where}: no module {module}")
            elif module.startswith("llm2vec_fast") and (missing := _script_takes(Path(spec.origin),
                                                                                 _options(argv[3:]))):
                problems.append(f"{where}: {module} takes no {missing}")
            elif module == "pytest":
                problems += [f"{where}: no path {a}" for a in argv[3:] if not a.startswith("-")
                             and not (REPO / a.split("::")[0]).exists()]
        elif argv[:2] == ["pip", "install"]:
            for i, arg in enumerate(argv):
                if arg == "-c" and not (REPO / argv[i + 1]).is_file():
                    problems.append(f"{where}: no constraint file {argv[i + 1]}")
                if match := re.fullmatch(r"\.\[([a-z,-]+)\]", arg):
                    unknown = set(match[1].split(",")) - set(project["optional-dependencies"])
                    if unknown:
                        problems.append(f"{where}: no extra {sorted(unknown)} in pyproject.toml")
        elif argv[0] == "make":
            problems += [f"{where}: no make target {t}" for t in argv[1:]
                         if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    return problems


# ------------------------------------------------------------------------------------------ running


class CommandFailed(AssertionError):
    pass


class BashRunner:
    """Runs the lines of bash blocks in `workdir`, with `env` (a dict of variables to set) for subprocesses."""

    def __init__(self, workdir: Path, on_ray=None):
        self.workdir = workdir
        self.on_ray = on_ray  # called before a command that uses Ray

    def run(self, snippet: Snippet) -> list[str]:
        """Run every line of `snippet`; returns the commands run, in order."""
        ran = []
        for line in logical_lines(snippet.code):
            assignments, argv = split_command(line)
            if not argv:
                continue
            ran.append(line)
            self.run_line(snippet, line, assignments, argv)
        return ran

    def run_line(self, snippet, line, assignments, argv):
        where = f"{snippet.id}: `{line}`"
        args = cli_argv(argv)
        if argv[0] == "torchrun":
            if args is None:
                raise CommandFailed(f"{where}: torchrun runs only -m llm2vec_fast here")
            launcher = argv[1:argv.index("-m")]
            self._subprocess(where, [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "llm2vec_fast",
                                     *shrink_train(args)], assignments)
        elif args is not None:
            if "--engine" in args and args[args.index("--engine") + 1] == "ray" and self.on_ray:
                self.on_ray()
            self._in_process(where, assignments, lambda: _cli_main(shrink_train(args)))
        elif argv[:3] == ["python", "-m", "llm2vec_fast.demo"]:
            from llm2vec_fast import demo

            self._in_process(where, assignments, lambda: demo.main(argv[3:]))
        elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("benchmarks/"):
            # A repository script, written relative to the repository root; what it writes lands in the work folder.
            self._subprocess(where, [sys.executable, str(REPO / argv[1]), *argv[2:]], assignments)
        elif argv[0] in SHELL_TOOLS:
            self._subprocess(where, ["bash", "-c", line], {})
        else:
            raise CommandFailed(f"{where}: tests/snippets.py does not run {argv[0]!r}; mark the block (see the "
                                f"module docstring) or teach BashRunner the command")

    def _in_process(self, where, assignments, call):
        saved = {name: os.environ.get(name) for name in assignments}
        os.environ.update(assignments)
        try:
            status = call()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if status != 0:
            raise CommandFailed(f"{where}: exit status {status}")

    def _subprocess(self, where, command, assignments):
        env = {**os.environ, **assignments}
        result = subprocess.run(command, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise CommandFailed(f"{where}: exit status {result.returncode}\n{result.stdout[-2000:]}"
                                f"\n{result.stderr[-4000:]}")


def _cli_main(args: list[str]) -> int:
    from llm2vec_fast.cli import main

    try:
        return main(args)
    except SystemExit as exit_:  # --help and --version end in argparse's exit, as on the command line
        return 0 if exit_.code in (0, None) else 2
