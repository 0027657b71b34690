"""Every code block of README.md and docs/*.md runs, or says why it does not (tests/snippets.py has the rules).

What the documents run on here, instead of what a user has:
- The embedded default model (`smollm2-135m`) is a tiny random Llama (hidden 64, 2 layers, a tokenizer that adds
  no BOS, like SmolLM2's), put where the default model is converted to (`LLM2VEC_FAST_CACHE`, a folder of this
  module) with the marker of a finished conversion; the C++ ops' build folder is the one of the cache the suite
  runs with, so nothing is rebuilt.
- Each document runs in its own work folder, holding the input files the documents name (INPUTS below: small
  synthetic corpora in the formats the documents describe). Blocks of one document run in order and share that
  folder and one Python namespace.
- `llm2vec-fast train` runs 2 steps of small batches (snippets.TRAIN_SHRINK).
- A block that uses Ray finds a local Ray instance already started, with 4 logical CPUs (a bare `ray.init()` on
  a 2-core machine leaves no CPU for Ray Data's read and write tasks beside 2 one-CPU actors); it is shut down at
  the end of the module.
- A block that imports a package that is not installed (or runs `--engine ray` without Ray) is skipped, naming it.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import snippets
from repo_root import REPO
from tiny_models import build_model_dir, corpus

ALL = snippets.all_snippets()
RUN = [s for s in ALL if s.runs or s.marker == snippets.FILE_MARKER]
MARKED = [s for s in ALL if s.marker in snippets.SKIP_MARKERS]


def _tsv_pairs(n: int) -> str:
    texts = corpus(2 * n, seed=11)
    rows = [f"{texts[2 * i]}\t{texts[2 * i + 1]}\t{(i * 7) % 50 / 10:.1f}" for i in range(n)]
    return "sentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n"


def _conll(n_sentences: int, seed: int) -> str:
    tags = [("NN", "B-NP", "O"), ("VB", "B-VP", "O"), ("NNP", "B-NP", "B-PER"), ("NNP", "I-NP", "I-PER")]
    sentences = []
    for k, sentence in enumerate(corpus(n_sentences, seed=seed)):
        words = sentence.rstrip(".!?").split()
        sentences.append("\n".join(f"{w} {' '.join(tags[(k + j) % len(tags)])}" for j, w in enumerate(words)))
    return "\n\n".join(sentences) + "\n"


def _jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# The input files every document's work folder holds (name -> content, or a callable writing it).
INPUTS = {
    "corpus.txt": "\n".join(corpus(200, seed=1)) + "\n",
    "queries.jsonl": _jsonl({"text": t, **({"instruction": "Given a question, retrieve passages that answer it:"}
                                           if i % 2 else {})} for i, t in enumerate(corpus(20, seed=2))),
    "wiki.txt": "\n".join(corpus(300, seed=3, min_words=20, max_words=60)) + "\n",
    "sentences.txt": "\n".join(corpus(200, seed=4)) + "\n",
    "triples.jsonl": _jsonl({"query": q, "positive": p, "negative": n, "instruction": "Retrieve relevant text:",
                             "dataset": f"set{i % 2}"}
                            for i, (q, p, n) in enumerate(zip(corpus(64, seed=5), corpus(64, seed=6),
                                                              corpus(64, seed=7)))),
    "sts-b/dev.tsv": _tsv_pairs(40),
    "conll2003/train.txt": _conll(60, seed=8),
    "conll2003/testa.txt": _conll(20, seed=9),
}


def _write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus(200, seed=10)
    pq.write_table(pa.table({"doc_id": [f"doc-{i:04d}" for i in range(len(texts))], "text": texts}), path,
                   row_group_size=50)


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """LLM2VEC_FAST_CACHE for this module: the tiny stand-in for the embedded default model, the suite's C++
    build folder."""
    from llm2vec_fast import default_model, settings

    cache = tmp_path_factory.mktemp("docs_cache")
    real_build = os.path.join(settings.current().cache_dir, "build")
    os.makedirs(real_build, exist_ok=True)
    os.symlink(real_build, cache / "build")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM2VEC_FAST_CACHE", str(cache))
        target = default_model.default_model_target()
        build_model_dir(target, "llama", add_bos=False)
        with open(os.path.join(target, default_model._DONE_MARKER), "w") as f:
            json.dump({"source": "tests/test_docs.py: a tiny random stand-in"}, f)
        yield cache
    _stop_ray()


def _stop_ray():
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _start_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # Workers inherit this process's environment (the docs cache) as it is now. Four logical CPUs: the
        # documents' actor pools (2 actors of 1 CPU) leave room for Ray Data's read and write tasks.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


class Document:
    """The state one document's blocks share: a work folder with INPUTS and a Python namespace."""

    def __init__(self, workdir):
        self.workdir = workdir
        for name, content in INPUTS.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(content)
        if snippets.missing_modules(["pyarrow"]) == []:
            _write_parquet(workdir / "corpus.parquet")
        self.namespace = {"__name__": "__docs__"}
        self.bash = snippets.BashRunner(workdir, on_ray=_start_ray)


@pytest.fixture(scope="module")
def documents(docs_cache, tmp_path_factory):
    made = {}

    def get(doc: str) -> Document:
        if doc not in made:
            made[doc] = Document(tmp_path_factory.mktemp(re.sub(r"\W", "_", doc)))
        return made[doc]

    return get


def test_every_block_is_run_or_marked_with_a_known_reason():
    problems = [p for doc in snippets.DOCUMENTS for p in snippets.parse(doc)[1]]
    problems += [p for s in ALL if (p := snippets.marker_problem(s))]
    assert problems == []
    assert {s.doc for s in RUN} >= {"README.md"}


@pytest.mark.parametrize("snippet", RUN, ids=lambda s: s.id)
def test_snippet_runs(snippet, documents, monkeypatch):
    document = documents(snippet.doc)
    monkeypatch.chdir(document.workdir)
    if snippet.marker == snippets.FILE_MARKER:
        (document.workdir / snippet.arg).write_text(snippet.code)
        return
    if snippet.language == "python":
        missing = snippets.missing_modules(snippets.python_imports(snippet.code))
        if missing:
            pytest.skip(f"needs {', '.join(missing)}")
        if "ray" in snippets.python_imports(snippet.code):
            _start_ray()
        exec(compile(snippet.code, str(REPO / snippet.doc) + f":{snippet.line}", "exec"), document.namespace)
    else:
        needs = (["ray"] if "--engine ray" in snippet.code else []) + \
                (["pyarrow"] if ".parquet" in snippet.code or "parquet" in snippet.code.split() else [])
        if missing := snippets.missing_modules(needs):
            pytest.skip(f"needs {', '.join(missing)}")
        assert document.bash.run(snippet), f"{snippet.id}: a bash block without a command"


@pytest.mark.parametrize("snippet", MARKED, ids=lambda s: s.id)
def test_marked_snippet_is_still_well_formed(snippet):
    assert snippets.check_marked(snippet) == []


def test_settings_page_lists_every_variable():
    """docs/settings.md's table holds every LLM2VEC_FAST_* variable the package reads, and no other."""
    # Every variable name quoted in the package's code, and setup.py's build switch (setup.py's other
    # LLM2VEC_FAST_ name is a C macro).
    read = {"LLM2VEC_FAST_BUILD_CPP"}
    for path in (REPO / "llm2vec_fast").rglob("*.py"):
        read |= set(re.findall(r"[\"'](LLM2VEC_FAST_[A-Z0-9_]+)[\"']", path.read_text()))
    page = (REPO / "docs" / "settings.md").read_text()
    table = set(re.findall(r"^\| `(LLM2VEC_FAST_[A-Z0-9_]+)` \|", page, re.M))
    assert read - table == set(), "undocumented"
    assert table - read == set(), "documented but never read"
    assert "docs/settings.md" in (REPO / "README.md").read_text()


def test_links_between_documents_resolve():
    broken = []
    for doc in snippets.DOCUMENTS:
        text = (REPO / doc).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not ((REPO / doc).parent / target).exists():
                broken.append(f"{doc}: {target}")
    assert broken == []


def test_readme_is_a_guide():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 375
    # The two commands of the project, as the Makefile and .ci/run run them.
    assert "make demo" in readme and "make test" in readme
    for doc in snippets.DOCUMENTS:
        text = (REPO / doc).read_text()
        for phrase in ("lent", "local disk", "this session", "no GPU was"):
            assert not re.search(rf"\b{phrase}\b", text), f"{doc} speaks of the project's own machines: {phrase!r}"


def test_opt_in_dtypes_state_their_measured_fidelity():
    """The README gives each opt-in CPU dtype's mean and minimum cosine to float32 as benchmarks/results/
    cpu_peers.json measured them on the benchmark texts."""
    rows = {r["backend"]: r for r in json.loads((REPO / "benchmarks/results/cpu_peers.json").read_text())["rows"]}
    readme = (REPO / "README.md").read_text()
    for mode in ("bfloat16", "mixed"):
        row = rows[f"ours-{mode}"]
        stated = f"{row['mean_cosine']:.5f} / {row['min_cosine']:.3f}"
        assert stated in readme, f"{mode}: the README should state mean / min cosine {stated}"
