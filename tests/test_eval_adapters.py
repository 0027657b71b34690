"""MTEB and sentence-transformers adapters, on fakes shaped like what those libraries pass (no network)."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.evaluation.mteb_adapter import MTEBEncoder, llm2vec_instruction

TEXTS = ["the cat sat on the mat", "a dog ran", "music and song", "the red car"]


@pytest.fixture(scope="module")
def encoder(llama_dir):
    return LLM2Vec.from_pretrained(llama_dir)


def fake_task(name="FakeRetrieval", type="Retrieval", prompt=None):
    """The attributes of mteb's TaskMetadata that an encoder reads."""
    return SimpleNamespace(name=name, type=type, prompt=prompt)


def loader(texts, batch_size=3):
    """What mteb passes: a torch DataLoader whose batches are {"text": [...]} dicts."""
    return torch.utils.data.DataLoader([{"text": t} for t in texts], batch_size=batch_size)


def reference(encoder, texts, instruction=""):
    inputs = [[instruction, t] for t in texts] if instruction else texts
    return encoder.encode(inputs, show_progress_bar=False).numpy()


def test_llm2vec_instruction():
    assert llm2vec_instruction("Retrieve relevant passages.") == "Retrieve relevant passages:"
    assert llm2vec_instruction(" Classify: ") == "Classify:" and llm2vec_instruction("") == ""


def test_mteb_instructions_on_queries_not_documents(encoder):
    task = fake_task(prompt={"query": "Given a question, retrieve passages that answer it"})
    model = MTEBEncoder(encoder, max_batch_tokens=32)
    queries = model.encode(loader(TEXTS), task_metadata=task, hf_split="test", hf_subset="default",
                           prompt_type=SimpleNamespace(value="query"))
    documents = model.encode(loader(TEXTS), task_metadata=task, hf_split="test", hf_subset="default",
                             prompt_type="document")
    assert isinstance(queries, np.ndarray) and queries.shape == (4, encoder.config.hidden_size)
    np.testing.assert_allclose(queries, reference(encoder, TEXTS, "Given a question, retrieve passages that answer it:"),
                               atol=1e-5)
    np.testing.assert_allclose(documents, reference(encoder, TEXTS), atol=1e-5)
    assert np.abs(queries - documents).max() > 1e-3


def test_mteb_instruction_priority(encoder):
    model = MTEBEncoder(encoder, instructions={"FakeSTS": "Retrieve semantically similar text.",
                                               "Classification": "Classify the topic"})
    sts = fake_task("FakeSTS", "STS", prompt="ignored: the user's instruction wins")
    assert model.instruction_for(sts, None) == "Retrieve semantically similar text:"
    assert model.instruction_for(fake_task("X", "Classification"), None) == "Classify the topic:"
    assert model.instruction_for(fake_task("Y", "Clustering", prompt="Identify the topic"), None) == "Identify the topic:"
    assert model.instruction_for(fake_task("Y", "Clustering", prompt="Identify the topic"), "document") == ""
    assert MTEBEncoder(encoder, use_task_prompts=False).instruction_for(fake_task(prompt="p"), "query") == ""
    # Symmetric tasks (prompt_type None) put the instruction on every text.
    out = model.encode(loader(TEXTS[:2]), task_metadata=sts, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(out, reference(encoder, TEXTS[:2], "Retrieve semantically similar text:"), atol=1e-5)


def test_mteb_honours_batch_size_and_progress_bar(encoder, monkeypatch):
    seen = []
    monkeypatch.setattr(encoder, "encode", lambda sentences, **kw: seen.append(kw) or
                        np.zeros((len(sentences), encoder.config.hidden_size), dtype=np.float32))
    task = fake_task()
    MTEBEncoder(encoder, batch_size=8).encode(loader(TEXTS), task_metadata=task, hf_split="t", hf_subset="d",
                                              batch_size=2, show_progress_bar=True)
    MTEBEncoder(encoder, batch_size=8).encode(loader(TEXTS), task_metadata=task, hf_split="t", hf_subset="d")
    assert (seen[0]["batch_size"], seen[0]["show_progress_bar"]) == (2, True)
    assert (seen[1]["batch_size"], seen[1]["show_progress_bar"]) == (8, False)


def test_mteb_similarity_and_bad_inputs(encoder):
    model = MTEBEncoder(encoder)
    a, b = np.random.default_rng(0).normal(size=(3, 8)), np.random.default_rng(1).normal(size=(2, 8))
    matrix = model.similarity(a, b)
    assert matrix.shape == (3, 2)
    torch.testing.assert_close(model.similarity_pairwise(a[:2], b), matrix[[0, 1], [0, 1]])
    empty = model.encode([], task_metadata=fake_task(), hf_split="test", hf_subset="default")
    assert empty.shape == (0, encoder.config.hidden_size)
    with pytest.raises(TypeError, match="text tasks only"):
        model.encode([{"image": [0]}], task_metadata=fake_task(), hf_split="test", hf_subset="default")


def test_mteb_model_meta(encoder):
    model = MTEBEncoder(encoder, name="me/my-encoder")
    if importlib.util.find_spec("mteb") is None:
        assert model.mteb_model_meta is None
        pytest.skip("mteb is not installed (optional `eval` extra): checked only the mteb-free path")
    from mteb.models.models_protocols import EncoderProtocol

    meta = model.mteb_model_meta
    assert meta.name == "me/my-encoder" and meta.embed_dim == encoder.config.hidden_size
    assert isinstance(model, EncoderProtocol)


needs_st = pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                              reason="sentence-transformers is not installed (optional `eval` extra)")


@needs_st
def test_sentence_transformer_matches_encode(encoder, tmp_path):
    from llm2vec_fast.evaluation.st_adapter import load_sentence_transformer, to_sentence_transformer

    model = to_sentence_transformer(encoder, device="cpu")
    assert model.get_embedding_dimension() == encoder.config.hidden_size
    assert model.max_seq_length == encoder.max_length
    out = model.encode(TEXTS, batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(out, reference(encoder, TEXTS), atol=1e-5)
    prompted = model.encode(TEXTS, prompt="find the animal", convert_to_numpy=True)
    np.testing.assert_allclose(prompted, reference(encoder, TEXTS, "find the animal"), atol=1e-5)

    model.save(str(tmp_path / "st"))
    reloaded = load_sentence_transformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    np.testing.assert_allclose(reloaded.encode(TEXTS, convert_to_numpy=True), out, atol=1e-5)


@needs_st
def test_sentence_transformer_reload_needs_no_trust_remote_code(encoder, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import misc

    from llm2vec_fast.evaluation.st_adapter import load_sentence_transformer, to_sentence_transformer

    path = str(tmp_path / "st")
    to_sentence_transformer(encoder, device="cpu").save(path)
    expected = reference(encoder, TEXTS)
    # load_sentence_transformer resolves the module without sentence-transformers importing anything by name.
    imported = []
    original = misc.import_module_class
    monkeypatch.setattr(misc, "import_module_class", lambda ref, *a, **k: imported.append(ref) or original(ref, *a, **k))
    reloaded = load_sentence_transformer(path, device="cpu")
    assert not [ref for ref in imported if not ref.startswith("sentence_transformers.")]
    np.testing.assert_allclose(reloaded.encode(TEXTS, convert_to_numpy=True), expected, atol=1e-5)
    # Plain SentenceTransformer(path) follows sentence-transformers' own rule for classes outside its package.
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(path, device="cpu")
    trusted = SentenceTransformer(path, device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(trusted.encode(TEXTS, convert_to_numpy=True), expected, atol=1e-5)


@needs_st
def test_sentence_transformer_refuses_foreign_modules(tmp_path):
    from llm2vec_fast.evaluation.st_adapter import load_sentence_transformer

    with pytest.raises(FileNotFoundError, match="modules.json"):
        load_sentence_transformer(str(tmp_path))
    (tmp_path / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "evil.Module"}]')
    with pytest.raises(ValueError, match="evil.Module"):
        load_sentence_transformer(str(tmp_path))


@needs_st
def test_sentence_transformer_token_embeddings(encoder):
    from llm2vec_fast.evaluation.st_adapter import to_sentence_transformer

    model = to_sentence_transformer(encoder, device="cpu")
    texts = TEXTS + [""]
    tokens = model.encode(texts, output_value="token_embeddings", prompt="find the animal")
    sentences = model.encode(texts, convert_to_numpy=True, prompt="find the animal")
    rows = encoder.tokenize_inputs([["find the animal", t] for t in texts])
    for t, (states, row) in enumerate(zip(tokens, rows)):
        # The pooled tokens: the text's own (no instruction, no BOS), or for the empty text what the model saw.
        # Their mean is the sentence embedding.
        if texts[t]:
            assert states.shape == (row.text_end - row.text_start, encoder.config.hidden_size)
        np.testing.assert_allclose(states.mean(0).numpy(), sentences[t], atol=1e-5)


@needs_st
def test_sentence_transformer_forward_is_differentiable(encoder):
    from llm2vec_fast.evaluation.st_adapter import LLM2VecModule

    module = LLM2VecModule(encoder)
    features = module.preprocess(TEXTS[:2])
    embedding = module(features)["sentence_embedding"]
    embedding.sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    encoder.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match="texts or \\[instruction, text\\] pairs"):
        module.preprocess([3])
