"""The word-level probe: CoNLL reading, BIO spans and entity F1, token-to-word features, training, `eval probe`."""

import json
import random

import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.evaluation.probe import (ConllDataError, ProbeConfig, bio_spans, entity_scores, is_bio,
                                           read_conll, run_probe, token_states, word_features, word_token_map)

NOUNS, VERBS, ADJECTIVES = ["cat", "dog", "house", "car", "tree"], ["sat", "ran", "jumped"], ["big", "small", "red"]
PEOPLE, PLACES = [("John", "Smith"), ("Mary", "Jones")], ["Paris", "London"]


def toy_sentence(rng):
    """A toy grammar whose tags follow from the words: (words, POS, NER)."""
    rows = []
    if rng.random() < 0.5:
        first, last = rng.choice(PEOPLE)
        rows += [(first, "NNP", "B-PER"), (last, "NNP", "I-PER")]
    else:
        rows.append((rng.choice(["the", "a"]), "DT", "O"))
        if rng.random() < 0.5:
            rows.append((rng.choice(ADJECTIVES), "JJ", "O"))
        rows.append((rng.choice(NOUNS), "NN", "O"))
    rows += [(rng.choice(VERBS), "VBD", "O"), ("in", "IN", "O"), (rng.choice(PLACES), "NNP", "B-LOC"), (".", ".", "O")]
    return rows


def write_conll(path, sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(sentences):
        lines += [f"{word} {pos} I-NP {ner}" for word, pos, ner in toy_sentence(rng)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def conll(tmp_path_factory):
    root = tmp_path_factory.mktemp("conll")
    return write_conll(root / "train.txt", 200, seed=1), write_conll(root / "dev.txt", 60, seed=2)


@pytest.fixture(scope="module")
def encoder(llama_dir):
    return LLM2Vec.from_pretrained(llama_dir)


def test_read_conll(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
                    "-DOCSTART- -X- -X- O\nPeter NNP B-NP B-PER\n")
    sentences = read_conll(str(path), 3)
    assert [s.words for s in sentences] == [["EU", "rejects"], ["Peter"]]
    assert [s.labels for s in sentences] == [["B-ORG", "O"], ["B-PER"]]
    assert read_conll(str(path), 1)[0].labels == ["NNP", "VBZ"]
    path.write_text("EU NNP B-NP B-ORG\nrejects VBZ\n")
    with pytest.raises(ConllDataError, match=r"a.txt:2: 2 column\(s\), but the label column is 3"):
        read_conll(str(path), 3)
    path.write_text("\n-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(ConllDataError, match="no sentences"):
        read_conll(str(path), 3)


@pytest.mark.parametrize("tags, spans", [
    (["O", "O"], []),
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 2)]),                       # IOB1: I- after O starts an entity
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),   # B- right after an entity starts another
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),   # a type change starts another
    (["O", "B-MISC"], [("MISC", 1, 2)]),                              # an entity at the end is closed
])
def test_bio_spans(tags, spans):
    assert bio_spans(tags) == spans


def test_bio_spans_rejects_other_schemes():
    with pytest.raises(ValueError, match="not a BIO tag"):
        bio_spans(["S-PER"])
    assert is_bio(["O", "B-PER", "I-PER"]) and not is_bio(["NN", "VB"]) and not is_bio(["O"])


def test_entity_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]  # 2 of 3 gold found, 2 of 3 predicted right
    scores = entity_scores(gold, predicted)
    assert (scores["correct_entities"], scores["gold_entities"], scores["predicted_entities"]) == (2, 3, 3)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)
    assert entity_scores(gold, gold)["f1"] == 1.0
    partial = entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])  # a partial span is wrong
    assert partial["f1"] == 0.0 and partial["predicted_entities"] == 1
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="2 gold tags but 1"):
        entity_scores([["O", "O"]], [["O"]])


def test_tokens_map_to_words(encoder):
    sentences = [["the", "cat", "sat", "in", "London", "."], ["a", "big", "dog"]]
    ids, owners = word_token_map(encoder.tokenizer, sentences, max_length=64)
    for words, row, owner in zip(sentences, ids, owners):
        assert row[0] == encoder.tokenizer.bos_token_id and owner[0] == -1
        assert sorted(set(owner) - {-1}) == list(range(len(words)))  # every word has a token
        for w, word in enumerate(words):  # a word's tokens decode back to the word
            text = encoder.tokenizer.decode([t for t, o in zip(row, owner) if o == w]).strip()
            assert text == word
    ids, owners = word_token_map(encoder.tokenizer, [["the"] * 40], max_length=8)  # truncation drops words
    assert len(ids[0]) == 8 and max(owners[0]) < 40


def test_word_features_first_mean_and_next_token(encoder):
    sentences = [["the", "cat", "sat", "in", "London", "."], ["John", "Smith", "ran"]]
    ids, owners = word_token_map(encoder.tokenizer, sentences, encoder.max_length)
    states = token_states(encoder, ids, max_batch_tokens=16)  # several batches
    for word_repr in ("first", "mean"):
        for next_token in (False, True):
            features = word_features(encoder, sentences, word_repr, next_token, max_batch_tokens=16)
            assert features.kept == [list(range(6)), list(range(3))]
            row = 0
            for s, (owner, hidden) in enumerate(zip(owners, states)):
                for w in range(len(sentences[s])):
                    positions = [p - 1 if next_token else p for p, o in enumerate(owner) if o == w]
                    expected = hidden[positions[0]] if word_repr == "first" else hidden[positions].mean(0)
                    torch.testing.assert_close(features.features[row], expected, atol=1e-5, rtol=1e-5)
                    row += 1


def test_probe_beats_majority_baseline(encoder, conll):
    train, dev = (read_conll(path, 3) for path in conll)
    report = run_probe(encoder, train, {"dev": dev}, ProbeConfig(epochs=10, learning_rate=1e-2))
    result = report["results"]["dev"]
    assert report["labels"] == 4 and report["majority_label"] == "O"
    assert result["accuracy"] > result["majority_baseline"] + 0.15
    assert result["entity"]["f1"] > 0.8 and result["unscored_words"] == 0
    assert report["epochs"][-1]["loss"] < report["epochs"][0]["loss"]


def test_eval_probe_cli(llama_dir, conll, tmp_path, capsys):
    train, dev = conll
    output = tmp_path / "probe.json"
    status = cli_main(["eval", "probe", "--model", llama_dir, "--train", train, "--eval", dev, "--task", "pos",
                       "--word-repr", "mean", "--next-token", "--epochs", "10", "--learning-rate", "1e-2",
                       "--output", str(output), "--no-progress"])
    assert status == 0
    assert "accuracy" in capsys.readouterr().out
    saved = json.loads(output.read_text())
    assert saved["column"] == 1 and saved["next_token"] is True and saved["word_repr"] == "mean"
    result = saved["results"][dev]
    assert "entity" not in result and result["accuracy"] > result["majority_baseline"] + 0.3

    assert cli_main(["eval", "probe", "--model", llama_dir, "--train", train, "--eval", dev, "--column", "7"]) == 1
    assert "train.txt:3: 4 column(s), but the label column is 7" in capsys.readouterr().err
