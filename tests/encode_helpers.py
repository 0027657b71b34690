"""What the encode CLI test files share: the corpus, the uninterrupted reference run, argument lists and the
bitwise output comparison. Test modules import the fixtures by name, which makes pytest use them there."""

import os

import numpy as np
import pytest

from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from tiny_models import corpus

N_LINES, SHARD = 45, 10  # five shards, the last one partial
FAST = ["--no-progress", "--shard-size", str(SHARD)]


@pytest.fixture(scope="module", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Content hashes are cached under LLM2VEC_FAST_CACHE: keep them out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path_factory.mktemp("hash_cache")))
        yield


@pytest.fixture(scope="module")
def texts():
    return corpus(N_LINES, seed=7)


@pytest.fixture(scope="module")
def txt_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("inputs") / "corpus.txt"
    path.write_text("\n".join(texts) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(llama_dir, txt_file, tmp_path_factory):
    """An uninterrupted single-process run over txt_file: the output every other run must reproduce."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    return load_embeddings(out)


def encode_args(model_dir, input_path, out, *extra):
    return ["encode", "--model", str(model_dir), "--input", str(input_path), "--output", str(out), *FAST, *extra]


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def assert_same_output(out, reference):
    embeddings, lines = load_embeddings(str(out))
    ref_embeddings, ref_lines = reference
    np.testing.assert_array_equal(lines, ref_lines)
    assert len(np.unique(lines)) == len(lines)
    np.testing.assert_array_equal(embeddings, ref_embeddings)  # bitwise: same shards, same batches


def error_of(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "llm2vec-fast: error: " in err and "Traceback" not in err, err
    return err[err.index("llm2vec-fast: error: "):]  # after any progress bar of the model loading


def temp_files(out) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if ".tmp-" in n or "probe" in n]
