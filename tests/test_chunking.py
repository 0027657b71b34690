"""long_input="chunk": a long text is embedded whole, as the token-weighted mean of max_length windows.

The windows are rebuilt here from the tokenizer's own output (not with chunking.py) and encoded one by one in
truncate mode: the chunked embedding must be their weighted mean, with and without an instruction and overlap, in
a call mixed with short texts. Then: a text that truncate mode leaves whole is embedded bit for bit alike, bad
options are clear errors, batches stay within the token budget on a long document, and `encode --long-input chunk`
end to end."""

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.batching import PackedBatch
from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.prompts import join_instruction, split_separator
from llm2vec_fast.tokenization import TokenizedRow
from encode_helpers import encode_args
from tiny_models import corpus

MAX_LENGTH = 64
SHORT = ["the cat sat on the mat", "a big red house by the river.", "music"]


@pytest.fixture(scope="module")
def model(llama_dir):
    return LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def native_ops():
    """The C++ ops loaded (from the user's build cache) before a CLI test points LLM2VEC_FAST_CACHE elsewhere:
    a process loads them once, so the CLI runs do not rebuild them in the test's empty cache."""
    from llm2vec_fast import native

    native.load()


@pytest.fixture
def private_cache(native_ops, set_env, tmp_path):
    """Content hashes of the CLI runs go to a cache of the test's own, not the user's."""
    set_env(LLM2VEC_FAST_CACHE=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def long_text(model):
    text = " ".join(corpus(60, seed=11))
    assert len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) > 5 * MAX_LENGTH
    return text


def reference_windows(model, instruction: str, text: str, overlap: int) -> list[TokenizedRow]:
    """The windows of a text, made from one plain tokenizer call: the tokens around the text in every window, the
    text's tokens cut into consecutive slices that fill max_length, each starting `overlap` tokens back."""
    string, text_char = split_separator(model.prepare_for_tokenization(join_instruction(instruction, text)))
    encoded = model.tokenizer(string, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if e > text_char and e > s]
    before, body, after = ids[:inside[0]], ids[inside[0]:inside[-1] + 1], ids[inside[-1] + 1:]
    room = MAX_LENGTH - len(before) - len(after)
    windows, start = [], 0
    while True:
        piece = body[start:start + room]
        windows.append(TokenizedRow(before + piece + after, len(before), len(before) + len(piece)))
        if start + room >= len(body):
            return windows
        start += room - overlap


def weighted_mean_of_windows(model, windows: list[TokenizedRow]) -> torch.Tensor:
    vectors = torch.stack([model.encode_rows([w], long_input="truncate")[0] for w in windows]).double()
    weights = torch.tensor([float(w.text_end - w.text_start) for w in windows], dtype=torch.float64)
    return ((vectors * weights[:, None]).sum(0) / weights.sum()).float()


@pytest.mark.parametrize("instruction, overlap", [("", 0), ("Represent the document for retrieval:", 7)])
def test_long_text_is_the_weighted_mean_of_its_windows(model, long_text, instruction, overlap):
    windows = reference_windows(model, instruction, long_text, overlap)
    assert len(windows) >= 5 and all(len(w) <= MAX_LENGTH for w in windows)
    inputs = [SHORT[0], [instruction, long_text], SHORT[1], [instruction, SHORT[2]]]
    chunked = model.encode(inputs, long_input="chunk", chunk_overlap=overlap, show_progress_bar=False)
    torch.testing.assert_close(chunked[1], weighted_mean_of_windows(model, windows), atol=1e-5, rtol=0)
    # The short texts of the same call keep their places and are embedded as truncate mode does (up to the float
    # rounding of other batch-mates).
    alone = model.encode([inputs[0], inputs[2], inputs[3]], show_progress_bar=False)
    torch.testing.assert_close(chunked[[0, 2, 3]], alone, atol=1e-6, rtol=0)


def test_weighted_mean_pooling_combines_windows_by_token_count(llama_dir, long_text):
    model = LLM2Vec.from_pretrained(llama_dir, pooling_mode="weighted_mean", max_length=MAX_LENGTH)
    windows = reference_windows(model, "", long_text, 0)
    chunked = model.encode([long_text, SHORT[0]], long_input="chunk", show_progress_bar=False)
    torch.testing.assert_close(chunked[0], weighted_mean_of_windows(model, windows), atol=1e-5, rtol=0)


def test_the_text_is_never_cut(model, long_text):
    row, = model.tokenize_inputs([["Represent it:", long_text * 3]], long_input="chunk")
    string, _ = split_separator(model.prepare_for_tokenization(join_instruction("Represent it:", long_text * 3)))
    assert row.input_ids == model.tokenizer(string)["input_ids"]  # no doc_max_length words, no max_length cut


def test_a_text_that_fits_is_embedded_as_in_truncate_mode(model):
    inputs = SHORT + [["Represent the sentence:", "the sun and the moon"]]
    with_attribute = LLM2Vec(model.model, model.tokenizer, max_length=MAX_LENGTH, long_input="chunk")
    truncated = model.encode(inputs, show_progress_bar=False)
    assert torch.equal(model.encode(inputs, long_input="chunk", show_progress_bar=False), truncated)
    assert torch.equal(with_attribute.encode(inputs, show_progress_bar=False), truncated)


def test_the_head_is_applied_to_the_mean_and_normalize_after_it(model, long_text):
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 5, dtype=torch.float32)
    windows = reference_windows(model, "", long_text, 0)
    pooled = weighted_mean_of_windows(model, windows)
    model.head = head
    try:
        chunked = model.encode([long_text], long_input="chunk", normalize_embeddings=True, show_progress_bar=False)
    finally:
        model.head = None
    with torch.no_grad():
        expected = torch.nn.functional.normalize(head(pooled), dim=-1)
    torch.testing.assert_close(chunked[0], expected, atol=1e-5, rtol=0)


def test_bad_options_are_clear_errors(llama_dir, model, long_text):
    with pytest.raises(ValueError, match="unknown long_input 'split'.*'truncate', 'chunk'"):
        model.encode(SHORT, long_input="split")
    with pytest.raises(ValueError, match="chunk_overlap must be >= 0"):
        model.encode(SHORT, long_input="chunk", chunk_overlap=-1)
    with pytest.raises(TypeError, match="chunk_overlap must be an int"):
        model.encode(SHORT, long_input="chunk", chunk_overlap=2.5)
    with pytest.raises(ValueError, match=r"input 1: .* more than chunk_overlap=100"):
        model.encode([SHORT[0], long_text], long_input="chunk", chunk_overlap=100)
    with pytest.raises(ValueError, match=r"input 0: its instruction.*shorten the instruction"):
        model.encode([[" ".join(["instruction"] * 80), long_text]], long_input="chunk")
    with pytest.raises(ValueError, match="long_input='chunk' needs mean or weighted_mean pooling"):
        LLM2Vec(model.model, model.tokenizer, pooling_mode="last_token", long_input="chunk")
    last = LLM2Vec(model.model, model.tokenizer, pooling_mode="eos_token", max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="eos_token pooling reads one token"):
        last.encode(SHORT, long_input="chunk")
    loaded = LLM2Vec.from_pretrained(llama_dir, long_input="chunk", chunk_overlap=3)
    assert (loaded.long_input, loaded.chunk_overlap) == ("chunk", 3)


def test_a_long_document_runs_in_budget_sized_batches(model, monkeypatch):
    # What keeps a 1M-token document's memory bounded (benchmarks/bench_long_input.py measures RSS): one batch
    # of hidden states at a time, each within the token budget, and one running sum per unfinished text.
    text = " ".join(corpus(300, seed=5))
    sizes = []
    hidden_states = LLM2Vec.hidden_states

    def spy(self, batch):
        sizes.append(batch.num_tokens if isinstance(batch, PackedBatch) else batch.input_ids.numel())
        return hidden_states(self, batch)

    monkeypatch.setattr(LLM2Vec, "hidden_states", spy)
    row, = model.tokenize_inputs([text], long_input="chunk")
    assert len(row) > 40 * MAX_LENGTH
    embedding = model.encode_rows([row], long_input="chunk", max_batch_tokens=4 * MAX_LENGTH)
    assert torch.isfinite(embedding).all() and len(sizes) >= 10 and max(sizes) <= 4 * MAX_LENGTH


def test_encode_command_long_input_chunk(llama_dir, model, long_text, private_cache, tmp_path, capsys):
    path = tmp_path / "in.txt"
    lines = [SHORT[0], long_text, SHORT[1]]
    expected = model.encode(lines, long_input="chunk", chunk_overlap=4, show_progress_bar=False).numpy()
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = encode_args(llama_dir, path, out, "--max-length", str(MAX_LENGTH), "--long-input", "chunk",
                       "--chunk-overlap", "4")
    assert main(args) == 0
    embeddings, line_numbers = load_embeddings(str(out))
    assert line_numbers.tolist() == [1, 2, 3]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    capsys.readouterr()
    # The mode is part of the run's identity: resuming it with another is refused.
    assert main(encode_args(llama_dir, path, out, "--max-length", str(MAX_LENGTH))) == 1
    assert "long_input" in capsys.readouterr().err


def test_encode_command_refuses_chunk_with_one_token_pooling(llama_dir, private_cache, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("the cat\n")
    capsys.readouterr()
    assert main(encode_args(llama_dir, path, tmp_path / "out", "--long-input", "chunk", "--pooling",
                            "last_token")) == 1
    assert "needs mean or weighted_mean pooling" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(encode_args(llama_dir, path, tmp_path / "out2", "--long-input", "chunk", "--chunk-overlap", "-1"))
    assert "expected an integer >= 0" in capsys.readouterr().err
    assert main(encode_args(llama_dir, path, tmp_path / "out3", "--chunk-overlap", "8")) == 1
    assert "--chunk-overlap 8 applies to --long-input chunk only" in capsys.readouterr().err


def test_ray_predictor_passes_long_input_through(llama_dir, model, long_text):
    pa = pytest.importorskip("pyarrow")
    from llm2vec_fast.integrations.ray import LLM2VecPredictor

    predictor = LLM2VecPredictor(llama_dir, max_length=MAX_LENGTH, long_input="chunk", chunk_overlap=4)
    table = predictor(pa.table({"text": [SHORT[0], long_text]}))
    embeddings = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    expected = model.encode([SHORT[0], long_text], long_input="chunk", chunk_overlap=4, show_progress_bar=False)
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=0)
    assert predictor.last_token_counts[1] > 5 * MAX_LENGTH  # the whole text was encoded, not its first window
