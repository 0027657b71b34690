"""Sentence-transformers directories on our engine: each layout of today's decoder embedders, written locally as
sentence-transformers saves it (llm2vec_fast.testing.build_st_dir), encodes as `SentenceTransformer(path).encode`
does (float32, 1e-5), with and without prompts, on texts from one token to 2,000 tokens; what we do not run is
refused with a message naming it."""

import functools
import json
import os
import warnings

import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.modeling import is_bidirectional
from llm2vec_fast.testing import build_st_dir, long_text

sentence_transformers = pytest.importorskip("sentence_transformers")

SHORT = ["sun", "the cat sat on the mat.", "Big red boat? Coffee, tea and bread!", long_text(60, seed=1)]
TEXTS = SHORT + [long_text(1990, seed=2)]  # one token to 2,000 tokens
TOL = 1e-5


@functools.lru_cache(maxsize=4)
def _st_model(path):
    return sentence_transformers.SentenceTransformer(path, device="cpu")


def _st_encode(path, texts, **kwargs) -> torch.Tensor:
    return _st_model(path).encode(texts, convert_to_tensor=True, **kwargs).float()


def _ours(path, **kwargs) -> LLM2Vec:
    return LLM2Vec.from_pretrained(path, **kwargs)


def _encode(model, texts, **kwargs) -> torch.Tensor:
    return model.encode(texts, show_progress_bar=False, **kwargs)


def _assert_matches(path, model, prompt_names, texts=SHORT):
    for prompt_name in prompt_names:
        expected = _st_encode(path, texts, prompt_name=prompt_name)
        got = _encode(model, texts, prompt_name=prompt_name)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < TOL, prompt_name


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """EmbeddingGemma's layout: bidirectional Gemma 3, mean, Dense(GELU), Dense, Normalize, named prompts."""
    return build_st_dir(str(tmp_path_factory.mktemp("st") / "gemma"), "gemma3_text", pooling="mean",
                        dense=((48, "gelu"), (32, "identity")), normalize=True,
                        prompts={"query": "task: search result | query: ", "document": "title: none | text: "},
                        use_bidirectional_attention=True)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Qwen3-Embedding's layout: causal Qwen3, last token, a tokenizer appending EOS, Normalize, an instruction
    prompt."""
    return build_st_dir(str(tmp_path_factory.mktemp("st") / "qwen"), "qwen3", pooling="lasttoken", normalize=True,
                        append_eos=True, prompts={"query": "Instruct: find the city\nQuery:", "document": ""})


def test_embeddinggemma_layout_matches_sentence_transformers(gemma_dir):
    model = _ours(gemma_dir)
    assert is_bidirectional(model.model) and model.pooling_mode == "mean" and model.embedding_dim == 32
    _assert_matches(gemma_dir, model, [None, "query"], TEXTS)
    _assert_matches(gemma_dir, model, ["document"])


def test_qwen3_embedding_layout_matches_sentence_transformers(qwen_dir):
    model = _ours(qwen_dir)
    assert not is_bidirectional(model.model) and model.pooling_mode == "last_token"
    assert model.tokenize_inputs(["sun"])[0].input_ids[-1] == model.tokenizer.eos_token_id
    _assert_matches(qwen_dir, model, [None, "query"], TEXTS)


@pytest.mark.parametrize("spelling", ["old", "new"])
def test_llm2vec_mistral_mean_matches_in_both_spellings(tmp_path, spelling):
    """An LLM2Vec-style Mistral (is_causal: false, mean) with a Dense(Tanh) head; the old spelling also has the
    legacy Pooling config, sentence_bert_config's max_seq_length and pytorch_model.bin weights."""
    path = build_st_dir(str(tmp_path / spelling), "mistral", spelling=spelling, pooling="mean",
                        dense=((16, "tanh"),), prompts={"query": "query: "}, is_causal=False, sliding_window=None)
    types = [m["type"] for m in json.load(open(os.path.join(path, "modules.json")))]
    assert types[0].startswith("sentence_transformers.models." if spelling == "old" else
                               "sentence_transformers.base.")
    model = _ours(path)
    assert is_bidirectional(model.model) and model.embedding_dim == 16
    _assert_matches(path, model, [None, "query"], TEXTS if spelling == "old" else SHORT)


@pytest.mark.filterwarnings("ignore:1 input\\(s\\) have no token after their prompt")
def test_include_prompt_false_excludes_what_sentence_transformers_excludes(tmp_path):
    """The prompt ends in a space that the joint tokenization merges into the text's first word: sentence-
    transformers still skips the prompt's own token count, and so do we (a one-word text then pools nothing: a zero
    vector, with a warning)."""
    path = build_st_dir(str(tmp_path / "st"), "llama", pooling="mean", include_prompt=False,
                        prompts={"query": "query: ", "passage": "passage:"}, is_causal=False)
    model = _ours(path)
    assert model.skip_instruction
    _assert_matches(path, model, [None, "query", "passage"])
    with pytest.warns(UserWarning, match="1 input\\(s\\) have no token after their prompt"):
        assert not _encode(model, ["sun"], prompt_name="query").any()


def test_weightedmean_and_cls_match(tmp_path):
    for pooling in ("weightedmean", "cls"):
        path = build_st_dir(str(tmp_path / pooling), "llama", pooling=pooling, prompts={"q": "q: "}, is_causal=False)
        _assert_matches(path, _ours(path), [None, "q"])


def test_text_over_max_seq_length_is_truncated_with_a_warning(tmp_path):
    path = build_st_dir(str(tmp_path / "st"), "qwen3", pooling="lasttoken", append_eos=True, max_seq_length=64,
                        prompts={"query": "Instruct: x\nQuery:"})
    model = _ours(path)
    assert model.max_length == 64
    texts = [long_text(200, seed=3), "short one"]
    with pytest.warns(UserWarning, match="max_length=64"):
        got = _encode(model, texts, prompt_name="query")
    assert (got - _st_encode(path, texts, prompt_name="query")).abs().max().item() < TOL


def test_prompt_arguments(gemma_dir):
    model = _ours(gemma_dir)
    texts = TEXTS[:3]
    by_name = _encode(model, texts, prompt_name="query")
    assert torch.equal(_encode(model, texts, prompt=model.prompts["query"]), by_name)
    # A pair's instruction is that text's prompt.
    assert torch.equal(_encode(model, [[model.prompts["query"], t] for t in texts]), by_name)
    model.default_prompt_name = "query"
    assert torch.equal(_encode(model, texts), by_name)
    assert (_encode(model, texts, prompt="") - by_name).abs().max() > 1e-3  # an explicit empty prompt wins
    with pytest.raises(ValueError, match="not both"):
        _encode(model, texts, prompt="x", prompt_name="query")
    with pytest.raises(ValueError, match="'nope' is not one of this model's prompts"):
        _encode(model, texts, prompt_name="nope")
    with pytest.raises(ValueError, match="input 0 is an \\[instruction, text\\] pair"):
        _encode(model, [["instr", "text"]], prompt_name="query")


def test_default_prompt_name_from_the_directory(tmp_path):
    path = build_st_dir(str(tmp_path / "st"), "llama", pooling="mean", prompts={"query": "query: "},
                        default_prompt_name="query", is_causal=False)
    model = _ours(path)
    assert model.default_prompt_name == "query"
    expected = _st_encode(path, TEXTS[:3])
    assert (_encode(model, TEXTS[:3]) - expected).abs().max().item() < TOL


def test_llm2vec_model_takes_a_prompt_as_its_instruction(tmp_path):
    from llm2vec_fast.testing import build_model_dir

    model = _ours(build_model_dir(str(tmp_path / "m"), "llama"))
    texts = ["the cat sat.", "red house"]
    assert torch.equal(_encode(model, texts, prompt="Retrieve"), _encode(model, [["Retrieve", t] for t in texts]))
    with pytest.raises(ValueError, match="prompt_name 'query' is not one of this model's prompts \\(none\\)"):
        _encode(model, texts, prompt_name="query")


def test_explicit_enable_bidirectional_overrides_the_directory(qwen_dir):
    assert is_bidirectional(_ours(qwen_dir, enable_bidirectional=True).model)


@pytest.mark.parametrize("module_type, message", [
    ("sentence_transformers.models.LayerNorm", "does not run"),
    ("my_model.custom.Projection", "custom module 'my_model.custom.Projection'.*never runs a repository's code"),
])
def test_unsupported_modules_are_refused(tmp_path, module_type, message):
    path = build_st_dir(str(tmp_path / "st"), "llama", extra_modules=((module_type, "3_X"),))
    os.makedirs(os.path.join(path, "3_X"))
    with pytest.raises(ValueError, match=message):
        _ours(path)


def test_remote_code_transformer_is_refused(tmp_path):
    path = build_st_dir(str(tmp_path / "st"), "llama", spelling="old")
    config_path = os.path.join(path, "sentence_bert_config.json")
    config = json.load(open(config_path))
    config["model_args"] = {"trust_remote_code": True}
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ValueError, match="trust_remote_code.*never runs a repository's code"):
        _ours(path)


@pytest.mark.parametrize("pooling", ["max", "mean_sqrt_len_tokens"])
def test_unsupported_pooling_is_refused(tmp_path, pooling):
    path = build_st_dir(str(tmp_path / "st"), "llama", pooling=pooling)
    with pytest.raises(ValueError, match=f"pooling mode '{pooling}' is not run by llm2vec-fast"):
        _ours(path)


def test_untrusted_activation_is_refused(tmp_path):
    path = build_st_dir(str(tmp_path / "st"), "llama", dense=((8, "tanh"),))
    config_path = os.path.join(path, "2_Dense", "config.json")
    config = json.load(open(config_path))
    config["activation_function"] = "my_model.activations.Swish"
    json.dump(config, open(config_path, "w"))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="'my_model.activations.Swish' is not a torch.nn"):
        _ours(path)


def test_encode_command_applies_prompt_name_and_records_it(gemma_dir, tmp_path, capsys):
    import numpy as np

    from llm2vec_fast.cli import main
    from llm2vec_fast.encode_job import load_embeddings

    texts = SHORT[1:]
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in texts))
    model = _ours(gemma_dir)
    for extra, expected in ((("--prompt-name", "query"), _encode(model, texts, prompt_name="query")),
                            ((), _encode(model, texts))):
        out = tmp_path / f"out{len(extra)}"
        assert main(["encode", "--model", gemma_dir, "--input", str(source), "--output", str(out), "--no-progress",
                     "--threads", "1", *extra]) == 0
        embeddings, _ = load_embeddings(str(out))
        np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=0)
        manifest = json.load(open(out / "manifest.json"))
        assert manifest["prompt_name"] == (extra[1] if extra else None) and manifest["dim"] == 32
    assert main(["encode", "--model", gemma_dir, "--input", str(source), "--output", str(tmp_path / "bad"),
                 "--no-progress", "--prompt-name", "nope"]) == 1
    assert "--prompt-name 'nope': --model" in capsys.readouterr().err


def test_save_is_refused_rather_than_dropping_the_head(gemma_dir, tmp_path):
    with pytest.raises(ValueError, match="would drop its Dense/Normalize head and prompts"):
        _ours(gemma_dir).save(str(tmp_path / "saved"))


def test_encode_command_keeps_the_directory_pooling_and_limit(qwen_dir, tmp_path):
    """The job resolves pooling and max_length from the directory (last token, max_seq_length), not LLM2Vec's
    defaults; --prompt is prepended as prompt= is."""
    import numpy as np

    from llm2vec_fast.cli import main
    from llm2vec_fast.encode_job import load_embeddings

    texts = SHORT[1:] + [long_text(700, seed=4)]
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in texts))
    out = tmp_path / "out"
    assert main(["encode", "--model", qwen_dir, "--input", str(source), "--output", str(out), "--no-progress",
                 "--threads", "1", "--prompt", "Instruct: x\nQuery:"]) == 0
    embeddings, _ = load_embeddings(str(out))
    expected = _st_encode(qwen_dir, texts, prompt="Instruct: x\nQuery:")
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=0)
    manifest = json.load(open(out / "manifest.json"))
    assert (manifest["pooling"], manifest["max_length"], manifest["prompt"]) == ("last_token", 2048,
                                                                                 "Instruct: x\nQuery:")
