"""Finding the text's tokens in one tokenizer call, and truncation that keeps the text poolable."""

import random

import pytest
from transformers import AutoTokenizer

from llm2vec_fast.prompts import SEPARATOR, apply_template, join_instruction, split_separator
from llm2vec_fast.tokenization import RowTokenizer
from tiny_models import WORDS


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def row_tokenizer(tokenizer, **kw):
    args = dict(max_length=512, doc_max_length=400, pooling_mode="mean")
    args.update(kw)
    return RowTokenizer(tokenizer, **args)


def reference_text_token_count(tokenizer, prepared: str) -> int:
    """The llm2vec reference's count: the text part tokenized alone, without special tokens."""
    parts = prepared.split(SEPARATOR)
    text = parts[1] if len(parts) > 1 else ""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_join_and_separator():
    assert join_instruction("  Retrieve: ", "the text") == f"Retrieve: {SEPARATOR}the text"
    assert join_instruction("", "the text") == f"{SEPARATOR}the text"
    assert split_separator(f"Retrieve: {SEPARATOR}the text") == ("Retrieve: the text", 10)


def test_templates_follow_the_reference():
    joined = join_instruction("q:", "text ")
    assert apply_template(joined, "mistralai/Mistral-7B-Instruct-v0.2", "mistral", "mean") == \
        f"[INST] q: {SEPARATOR}text [/INST]"
    assert apply_template(joined, "mistralai/Mistral-7B-Instruct-v0.2", "mistral", "eos_token") == \
        f"[INST] q: {SEPARATOR}text [/INST] </s>"
    assert apply_template(joined, "meta-llama/Meta-Llama-3-8B-Instruct", "llama", "eos_token") == \
        f"<|start_header_id|>user<|end_header_id|>\n\nq: {SEPARATOR}text<|eot_id|>"
    assert apply_template(joined, "some/local-model", "llama", "eos_token") == f"q: {SEPARATOR}text </s>"
    assert apply_template(joined, "some/local-model", "qwen2", "eos_token") == joined
    assert apply_template(joined, "some/local-model", "llama", "mean") == joined


def test_text_span_matches_the_reference_count(tokenizer):
    rng = random.Random(1)
    rt = row_tokenizer(tokenizer)
    pairs = []
    for _ in range(200):
        instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        pairs.append((instruction, text))
    rows, _ = rt.tokenize_pairs(pairs)
    for (instruction, text), row in zip(pairs, rows):
        prepared = rt.prepare(instruction, text)
        whole = tokenizer(split_separator(prepared)[0])["input_ids"]
        assert row.input_ids == whole
        assert row.text_end == len(whole)
        assert row.text_end - row.text_start == reference_text_token_count(tokenizer, prepared)
        assert row.text_start >= 1  # the BOS is never pooled


def test_instruction_tokens_precede_text(tokenizer):
    rows, _ = row_tokenizer(tokenizer).tokenize_pairs([("find the animal:", "the cat sat"), ("", "the cat sat")])
    with_instruction, plain = rows
    n_text = plain.text_end - plain.text_start
    assert with_instruction.text_end - with_instruction.text_start == n_text
    assert with_instruction.text_start > plain.text_start
    # Byte-level BPE merges the separating space into the first word (" the" vs "the"); the rest is identical.
    assert with_instruction.input_ids[with_instruction.text_start + 1:] == plain.input_ids[plain.text_start + 1:]


def test_empty_text_has_empty_range_and_is_reported(tokenizer):
    rows, report = row_tokenizer(tokenizer).tokenize_pairs([("an instruction", ""), ("", "")])
    assert rows[0].text_start == rows[0].text_end == len(rows[0])
    assert rows[1].input_ids == [tokenizer.bos_token_id] and rows[1].text_start == rows[1].text_end
    assert report.empty_text == 2
    with pytest.warns(UserWarning, match="empty text"):
        report.warn(512, 400)


def test_truncation_keeps_the_text_and_warns(tokenizer):
    instruction = " ".join(["mountain"] * 30)
    text = " ".join(["river"] * 30)
    rt = row_tokenizer(tokenizer, max_length=20)
    rows, report = rt.tokenize_pairs([(instruction, text), ("", text)])
    row, plain = rows
    assert len(row) == 20 and len(plain) == 20
    assert report.truncated == 2 and report.instruction_cut == 1
    # The text keeps at least half of the room and sits at the end of the row; the BOS stays first.
    assert row.input_ids[0] == tokenizer.bos_token_id
    assert row.text_end - row.text_start >= 9
    river = tokenizer(" river", add_special_tokens=False)["input_ids"]
    assert all(t in river for t in row.input_ids[row.text_start + 1: row.text_end])
    with pytest.warns(UserWarning, match="truncated"):
        report.warn(20, 400)


def test_short_instruction_is_kept_whole_when_text_is_cut(tokenizer):
    rows, report = row_tokenizer(tokenizer, max_length=16).tokenize_pairs([("q:", " ".join(["river"] * 40))])
    row = rows[0]
    assert report.instruction_cut == 0
    assert row.input_ids[: row.text_start] == tokenizer("q:")["input_ids"]


def test_doc_max_length_shortens_by_words(tokenizer):
    text = " ".join(["banana"] * 50)
    rows, report = row_tokenizer(tokenizer, doc_max_length=10, max_length=20).tokenize_pairs([("", text)])
    assert report.doc_shortened == 1
    assert report.truncated == 0  # shortened first, so never reported as truncated too
    assert rows[0].text_end - rows[0].text_start <= 10


def test_text_the_word_rule_would_empty_keeps_its_first_tokens(tokenizer):
    text = "\u4e2d\u6587" * 200  # no spaces: one "word" of far more than doc_max_length tokens
    rt = row_tokenizer(tokenizer, doc_max_length=10, max_length=64)
    rows, report = rt.tokenize_pairs([("q:", text)])
    assert report.doc_token_cut == 1 and report.doc_shortened == 0 and report.truncated == 0
    row = rows[0]
    assert row.text_end - row.text_start == 10
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert row.input_ids[row.text_start:] == alone[:10]  # the first tokens, the instruction kept before them
    assert row.input_ids[:3] == tokenizer("q:")["input_ids"]
    with pytest.warns(UserWarning, match="too few spaces"):
        report.warn(64, 10)


def test_character_limit_bounds_what_max_length_tokens_can_span(tokenizer):
    from llm2vec_fast.tokenization import character_limit

    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    assert character_limit(tokenizer, 100) >= 2 * 100 * longest
