"""Similarity evaluation: correlations against scipy, the pair-file and Lee readers, and `eval similarity`."""

import json
import importlib.util

import numpy as np
import pytest

from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.evaluation.similarity import (PairsDataError, ScoredPairs, bootstrap_correlations, evaluate_pairs,
                                                format_table, lee_pairs, pearson, rankdata, read_pairs, spearman,
                                                text_bootstrap_indices, word_pairs)

HAS_GENSIM = importlib.util.find_spec("gensim") is not None


@pytest.mark.parametrize("n, ties", [(2, False), (17, False), (200, True), (1225, True)])
def test_correlations_match_scipy(n, ties):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.6 * x + rng.normal(size=n)
    if ties:  # human scores are coarse: many equal values on both sides
        x, y = np.round(x, 1), np.round(y * 2) / 2
    np.testing.assert_allclose(rankdata(y), stats.rankdata(y))
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_correlation_edge_cases():
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="different lengths"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1], [1])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_stsb_tsv_with_header(tmp_path):
    # The GLUE STS-B layout: extra columns, quotes that belong to the text.
    path = write(tmp_path / "dev.tsv",
                 "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                 "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
                 "A man wearing a hard hat is dancing.\t5.000\n"
                 "1\tmain-news\theadlines\t2013\t0001\tnone\tnone\t\"Quoted\" text here.\tSomething else.\t0.4\n")
    pairs = read_pairs(path)
    assert pairs.sentences1 == ["A man with a hard hat is dancing.", "\"Quoted\" text here."]
    assert pairs.sentences2[1] == "Something else."
    np.testing.assert_allclose(pairs.scores, [5.0, 0.4])


def test_read_plain_tsv_either_score_position(tmp_path):
    pairs = read_pairs(write(tmp_path / "a.tsv", "a cat\ta dog\t3.5\nsun\tmoon\t1\n\n"))
    assert (pairs.sentences1, pairs.sentences2, pairs.scores.tolist()) == (["a cat", "sun"], ["a dog", "moon"],
                                                                           [3.5, 1.0])
    pairs = read_pairs(write(tmp_path / "b.txt", "4\ta cat\ta dog\n2.5\tsun\tmoon\n"))
    assert pairs.sentences1 == ["a cat", "sun"] and pairs.scores.tolist() == [4.0, 2.5]


def test_read_jsonl(tmp_path):
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(d) for d in [
        {"sentence1": "a", "sentence2": "b", "score": 1}, {"sentence1": "c", "sentence2": "d", "score": "2.5"}]))
    pairs = read_pairs(path)
    assert pairs.sentences1 == ["a", "c"] and pairs.scores.tolist() == [1.0, 2.5]
    assert read_pairs(write(tmp_path / "q.jsonl", "\n".join(json.dumps(d) for d in [
        {"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "sentence2": "d", "label": 0}])),
        score_field="label").scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name, text, message", [
    ("bad_score.tsv", "a\tb\t1\nc\td\t2\ne\tf\thigh\n", r"bad_score.tsv:3: score 'high' is not a number"),
    ("short.tsv", "a\tb\t1\nc\td\n", r"short.tsv:2: 2 tab-separated column\(s\), expected 3"),
    ("noscore.tsv", "a\tb\tc\n", r"noscore.tsv:1: no numeric score"),
    ("header.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\n", r"header.tsv:1: the header has no 'score' column"),
    ("nan.tsv", "a\tb\t1\nc\td\tnan\n", r"nan.tsv:2: score 'nan' is not a finite number"),
    ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"\n',
     r"bad.jsonl:2: invalid JSON"),
    ("missing.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n\n{"sentence1": "a", "score": 1}\n',
     r"missing.jsonl:3: missing or non-string field 'sentence2'"),
    ("noscore.jsonl", '{"sentence1": "a", "sentence2": "b"}\n', r"noscore.jsonl:1: missing or invalid score"),
    ("one.tsv", "a\tb\t1\n", r"one.tsv: 1 scored pair\(s\)"),
])
def test_bad_pair_files_name_the_line(tmp_path, name, text, message):
    with pytest.raises(PairsDataError, match=message):
        read_pairs(write(tmp_path / name, text))


def test_missing_pair_file(tmp_path):
    with pytest.raises(PairsDataError, match="no such file"):
        read_pairs(str(tmp_path / "nope.tsv"))


@pytest.mark.skipif(not HAS_GENSIM, reason="the Lee et al. (2005) data ships in gensim's test data; gensim is not "
                                           "installed (pip install gensim)")
def test_lee_pairs():
    pairs = lee_pairs()
    assert len(pairs) == 1225 and len(pairs.texts()) == 50
    assert pairs.scores.min() >= 0 and pairs.scores.max() <= 1
    assert all(a != b for a, b in zip(pairs.sentences1, pairs.sentences2))
    assert pairs.sentences1[0] == pairs.sentences1[48] and pairs.sentences2[0] != pairs.sentences2[48]


@pytest.mark.skipif(not HAS_GENSIM, reason="SimLex-999 and WordSim-353 ship in gensim's test data; gensim is not "
                                           "installed (pip install gensim)")
@pytest.mark.parametrize("name, count, first", [("simlex999", 999, ("old", "new", 1.58)),
                                                ("wordsim353", 353, ("love", "sex", 6.77))])
def test_word_pairs(name, count, first):
    pairs = word_pairs(name)
    assert len(pairs) == count and pairs.name == name
    assert (pairs.sentences1[0], pairs.sentences2[0], pairs.scores[0]) == first
    assert all(" " not in w and "\t" not in w for w in pairs.sentences1 + pairs.sentences2)
    assert 0 <= pairs.scores.min() and pairs.scores.max() <= 10
    with pytest.raises(ValueError, match="unknown word-pair set 'men'"):
        word_pairs("men")


def test_evaluate_pairs_embeds_each_text_once():
    calls = []
    angle = {"a": 0.0, "b": 0.3, "c": 1.0, "d": 1.5}

    def embed(texts):
        calls.append(list(texts))
        return np.array([[np.cos(angle[t]), np.sin(angle[t])] for t in texts])

    pairs = ScoredPairs("toy", ["a", "a", "a", "b"], ["b", "c", "d", "d"], np.array([0.9, 0.5, 0.1, 0.2]))
    result = evaluate_pairs(embed, pairs)
    assert calls == [["a", "b", "c", "d"]]
    assert result["spearman"] == pytest.approx(1.0) and result["pairs"] == 4 and result["name"] == "toy"
    assert 0.9 < result["pearson"] <= 1.0


def test_eval_similarity_cli(llama_dir, tmp_path, capsys):
    data = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tscore\nthe cat sat\ta cat sat\t4.5\n"
                                         "the dog ran\tmusic and song\t0.5\nred car\tblue car\t3\n")
    output = tmp_path / "out" / "sim.json"
    status = cli_main(["eval", "similarity", "--model", llama_dir, "--data", data, "--instruction", "compare",
                       "--max-batch-tokens", "64", "--output", str(output), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "pairs.tsv" in printed and "spearman" in printed
    saved = json.loads(output.read_text())
    assert saved["instruction"] == "compare" and saved["bidirectional"] is True
    assert [r["name"] for r in saved["results"]] == ["pairs.tsv"] and saved["results"][0]["pairs"] == 3
    assert -1 <= saved["results"][0]["spearman"] <= 1

    if HAS_GENSIM:  # built-in sets by name, each listed once even when asked for twice
        assert cli_main(["eval", "similarity", "--model", llama_dir, "--builtin", "wordsim353", "--lee",
                         "--builtin", "lee", "--output", str(output), "--no-progress"]) == 0
        saved = json.loads(output.read_text())
        assert [(r["name"], r["pairs"]) for r in saved["results"]] == [("lee", 1225), ("wordsim353", 353)]
        capsys.readouterr()

    bad = write(tmp_path / "bad.tsv", "a\tb\t1\nc\td\tx\n")
    assert cli_main(["eval", "similarity", "--model", llama_dir, "--data", bad]) == 1
    assert "bad.tsv:2: score 'x' is not a number" in capsys.readouterr().err


def all_pairs_of(n_texts: int, seed: int = 0) -> ScoredPairs:
    """Every pair of n synthetic texts with a score, laid out like the Lee pairs (upper triangle)."""
    rows, cols = np.triu_indices(n_texts, k=1)
    scores = np.random.default_rng(seed).uniform(1, 5, len(rows))
    return ScoredPairs("synthetic", [f"text {i}" for i in rows], [f"text {j}" for j in cols], scores)


def test_text_bootstrap_keeps_pairs_between_drawn_texts():
    pairs = all_pairs_of(6)
    first = np.array([int(t.split()[1]) for t in pairs.sentences1])
    second = np.array([int(t.split()[1]) for t in pairs.sentences2])
    rng = np.random.default_rng(1)  # the same draws as the function's: 6 texts drawn with replacement per resample
    for rows in text_bootstrap_indices(pairs, resamples=20, seed=1):
        copies = np.bincount(rng.integers(0, 6, 6), minlength=6)
        # Every pair between drawn texts, once per combination of copies; no pair with an undrawn text.
        np.testing.assert_array_equal(np.bincount(rows, minlength=len(pairs)), copies[first] * copies[second])


def test_bootstrap_intervals_bracket_the_estimate_and_separate_a_clear_ordering():
    pairs = all_pairs_of(30)
    rng = np.random.default_rng(3)
    cosines = {"good": pairs.scores + rng.normal(0, 0.5, len(pairs)),
               "poor": pairs.scores + rng.normal(0, 3.0, len(pairs))}
    cosines["good copy"] = cosines["good"].copy()
    for unit in ("text", "pair"):
        out = bootstrap_correlations(cosines, pairs, reference="good", resamples=200, unit=unit)
        for name, values in cosines.items():
            low, high = out[name]["spearman_ci"]
            assert low < spearman(values, pairs.scores) < high
            low, high = out[name]["pearson_ci"]
            assert low < pearson(values, pairs.scores) < high
        assert out["good copy"]["spearman_diff_ci"] == [0.0, 0.0]  # paired: the same resamples for every variant
        assert out["poor"]["spearman_diff_ci"][1] < 0 and out["poor"]["pearson_diff_ci"][1] < 0
    with pytest.raises(ValueError, match="unit must be"):
        bootstrap_correlations(cosines, pairs, unit="word")
    with pytest.raises(ValueError, match="reference 'best'"):
        bootstrap_correlations(cosines, pairs, reference="best", resamples=2)
    with pytest.raises(ValueError, match="3 cosines for 435 pairs"):
        bootstrap_correlations({"short": np.ones(3)}, pairs, resamples=2)


def test_evaluate_pairs_keeps_cosines_on_request():
    pairs = all_pairs_of(5)
    vectors = {f"text {i}": np.array([1.0, i]) for i in range(5)}
    result = evaluate_pairs(lambda texts: np.stack([vectors[t] for t in texts]), pairs, keep_cosines=True)
    assert result["cosines"].shape == (len(pairs),)
    assert spearman(result["cosines"], pairs.scores) == pytest.approx(result["spearman"])


# ------------------------------------------------------------------------------- reliability (issue 22)

PAIRS = "sentence1\tsentence2\tscore\nthe cat sat\ta cat sat\t4.5\nthe dog ran\tmusic and song\t0.5\nred car\tblue car\t3\n"


@pytest.mark.parametrize("score", ["4_0", "\u0664", "4.0\u0660", "1e", "0x10"])
def test_scores_are_ascii_numbers_only(tmp_path, score):
    path = write(tmp_path / "pairs.tsv", f"sentence1\tsentence2\tscore\na\tb\t1\nc\td\t{score}\n")
    with pytest.raises(PairsDataError, match=r"pairs.tsv:3: score .* is not a number"):
        read_pairs(path)


def test_constant_gold_scores_are_refused_naming_the_file(tmp_path):
    path = write(tmp_path / "flat.tsv", "a\tb\t3\nc\td\t3\ne\tf\t3\n")
    with pytest.raises(PairsDataError, match=r"flat.tsv: all 3 scores are 3: a correlation with constant scores is "
                                             r"undefined"):
        read_pairs(path)


def test_constant_cosines_are_null_in_json_and_na_in_the_table():
    pairs = ScoredPairs("toy", ["a", "b", "c"], ["d", "e", "f"], np.array([0.9, 0.5, 0.1]))
    result = evaluate_pairs(lambda texts: np.ones((len(texts), 4)), pairs)
    assert result["pearson"] is None and result["spearman"] is None and "same cosine" in result["undefined"]
    assert json.loads(json.dumps(result, allow_nan=False))["pearson"] is None
    assert "n/a" in format_table([result])


@pytest.mark.parametrize("where", ["link", "input", "model-dir", "directory"])
def test_eval_output_never_destroys_a_file_it_should_not_write(llama_dir, tmp_path, capsys, where):
    import shutil

    data = write(tmp_path / "pairs.tsv", PAIRS)
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    output = {"link": tmp_path / "link.json", "input": tmp_path / "pairs.tsv", "model-dir": model / "config.json",
              "directory": tmp_path}[where]
    if where == "link":
        output.symlink_to(victim)
    before = {p: p.read_bytes() for p in (victim, tmp_path / "pairs.tsv", model / "config.json")}
    assert cli_main(["eval", "similarity", "--model", str(model), "--data", data, "--output", str(output),
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    expected = {"link": "is a symbolic link", "input": "is the input file", "model-dir": "inside the model directory",
                "directory": "is a directory"}[where]
    assert expected in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before
