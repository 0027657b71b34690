"""Reliability of the Python API: saves that reload exactly, no silently wrong embeddings, checked weights,
thread-safe encoding and clear errors for bad values (issue 12)."""

import json
import os
import random
import shutil

import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.tokenization import RowTokenizer
from test_encoder import TEXTS, encode, load

CJK = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可自之年生会那后能对着事其里所去行过家十用发天如然作方成者多日都三小"


def tiny_lora(base_dir, out_dir, dropout=0.0, seed=0):
    """A LoRA adapter with non-zero weights (and optional dropout) on every projection of the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base_dir
    with open(config_path, "w") as f:
        json.dump(config, f)
    return out_dir


def copy_model(source, destination):
    shutil.copytree(source, destination)
    return str(destination)


# ------------------------------------------------------------------------------------------------------ save


# ---------------------------------------------------------------------------------------- doc_max_length


def chinese_document(seed, length=324):
    rng = random.Random(seed)
    return "".join(rng.choice(CJK) for _ in range(length))


@pytest.mark.parametrize("kind", ["chinese", "base64", "title-then-chinese"])
def test_texts_without_spaces_keep_their_first_tokens(llama_dir, kind):
    rng = random.Random(kind)
    if kind == "chinese":
        texts = [chinese_document(1), chinese_document(2)]
    elif kind == "base64":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        texts = ["".join(rng.choice(alphabet) for _ in range(400)) for _ in range(2)]
    else:  # the word rule would keep only "Title:", the same for both documents
        texts = ["Title: " + chinese_document(1), "Title: " + chinese_document(2)]
    model = load(llama_dir, doc_max_length=40)
    with pytest.warns(UserWarning, match="too few spaces"):
        first, second = encode(model, texts)
    assert (first - second).abs().max() > 1e-3
    rows, report = model.row_tokenizer.tokenize_pairs([("", t) for t in texts])
    assert report.doc_token_cut == 2 and report.doc_shortened == 0
    for text, row in zip(texts, rows):
        alone = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row.input_ids[row.text_start:row.text_end] == alone[:40]


def reference_shorten(tokenizer, text, max_length, doc_max_length):
    """The llm2vec reference's word rule, verbatim in substance."""
    def count(t):
        return len(tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])

    n = count(text)
    while n > doc_max_length:
        words = text.split()
        text = " ".join(words[: int(len(words) * doc_max_length / n)])
        n = count(text)
    return text


def test_word_shortening_still_follows_the_reference_for_spaced_text(llama_dir):
    model = load(llama_dir, doc_max_length=30, max_length=64)
    rng = random.Random(3)
    texts = [" ".join(rng.choice(["the", "cat", "river", "mountain", "happy"]) for _ in range(n)) + "\n end"
             for n in (40, 90, 300)]
    expected = [reference_shorten(model.tokenizer, t, 64, 30) for t in texts]
    assert torch.equal(encode(model, texts), encode(load(llama_dir, doc_max_length=10_000, max_length=64), expected))


# ---------------------------------------------------------------------------------------------- huge texts


def test_huge_text_is_cut_before_tokenizing_without_changing_tokens(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rt = RowTokenizer(tokenizer, max_length=512, doc_max_length=400, pooling_mode="mean")
    unbounded = RowTokenizer(tokenizer, max_length=512, doc_max_length=400, pooling_mode="mean")
    unbounded.character_limit = 10 ** 12
    limit = rt.character_limit
    words = " ".join(random.Random(0).choice(["the", "cat", "sat", "river"]) for _ in range(limit))
    for text in (words[: 3 * limit], chinese_document(0, 3 * limit)):
        pairs = [("find the animal:", text), (text, "the cat")]
        rows, report = rt.tokenize_pairs(pairs)
        assert report.characters_cut == 2
        assert rows == unbounded.tokenize_pairs(pairs)[0]


def test_a_30_mb_text_never_reaches_the_tokenizer_whole(llama_dir):
    model = load(llama_dir)
    seen = []
    original = type(model.tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(max(map(len, text)) if isinstance(text, list) else len(text))
        return original(self, text, *args, **kwargs)

    huge = chinese_document(5, 1000) * 30_000
    type(model.tokenizer).__call__ = spy
    try:
        with pytest.warns(UserWarning, match="only its first characters"):
            got = encode(model, [huge, "the cat"])
    finally:
        type(model.tokenizer).__call__ = original
    assert torch.isfinite(got).all()
    assert max(seen) <= model.row_tokenizer.character_limit + 64  # the text plus its template and instruction


# ------------------------------------------------------------------------------------------ missing weights


# -------------------------------------------------------------------------------------------- threads


# ------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("sentences, words", [
    (["ok", "bad \ud800 text"], "input 1: its text holds a lone surrogate (U+D800) at character 4"),
    ([["ok", "fine"], ["\udfff", "text"]], "input 1: its instruction holds a lone surrogate (U+DFFF)"),
])
def test_lone_surrogates_name_the_input(llama_dir, sentences, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        encode(load(llama_dir), sentences)


BAD_COUNTS = [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("64", TypeError), (True, TypeError)]


@pytest.mark.parametrize("value, error", BAD_COUNTS, ids=["zero", "negative", "float", "str", "bool"])
def test_bad_max_batch_tokens_everywhere(llama_dir, value, error):
    model = load(llama_dir)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        LLM2Vec(model.model, model.tokenizer, max_batch_tokens=value)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        load(llama_dir, max_batch_tokens=value)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        encode(model, TEXTS, max_batch_tokens=value)
    model.max_batch_tokens = value  # set after construction: still refused, not silently replaced
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        encode(model, TEXTS)


@pytest.mark.parametrize("value, error", BAD_COUNTS, ids=["zero", "negative", "float", "str", "bool"])
def test_bad_batch_size(llama_dir, value, error):
    with pytest.raises(error, match="batch_size must be a positive int"):
        encode(load(llama_dir), TEXTS, batch_size=value)


def test_non_boolean_skip_instruction_argument(llama_dir):
    model = load(llama_dir)
    with pytest.raises(TypeError, match="skip_instruction must be True or False"):
        LLM2Vec(model.model, model.tokenizer, skip_instruction="no")
