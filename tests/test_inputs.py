"""Input normalisation: the reference's accepted forms, and a clear error for everything else."""

import pytest

from llm2vec_fast.inputs import normalize_inputs


@pytest.mark.parametrize("given, expected", [
    ("one text", [("", "one text")]),
    (["a", "b"], [("", "a"), ("", "b")]),
    ([["instr", "text"], ["", "t2"]], [("instr", "text"), ("", "t2")]),
    ([["instr", "text", 3]], [("instr", "text")]),
    (["instr", "text", 3], [("instr", "text")]),  # the reference's lone MEDI triple
    ((t for t in ["x", "y"]), [("", "x"), ("", "y")]),
    ([], []),
], ids=["bare-string", "list-of-strings", "pairs", "triples", "lone-triple", "generator", "empty-list"])
def test_accepted_forms(given, expected):
    assert normalize_inputs(given) == expected


@pytest.mark.parametrize("given, error, words", [
    (None, TypeError, "got None"),
    (42, TypeError, "int"),
    (b"bytes", TypeError, "decode"),
    (["ok", None], TypeError, "input 1 is None"),
    (["ok", 3.5], TypeError, "input 1 is float"),
    ([["only one"]], ValueError, "input 0 is a list of 1"),
    ([["a", "b", "c", "d"]], ValueError, "list of 4"),
    ([["a", 5]], ValueError, "expected [instruction, text]"),
    ([["a", "b", "c"]], ValueError, "third element is str"),
    ({"text": "a"}, TypeError, "dict"),
    (["ok", "x\ud800"], ValueError, "input 1: its text holds a lone surrogate (U+D800) at character 1"),
    ([["\udc80 q:", "t"]], ValueError, "input 0: its instruction holds a lone surrogate (U+DC80)"),
    ("\ud83d\ude00", ValueError, "input 0: its text holds a lone surrogate (U+D83D)"),
], ids=["none", "number", "bytes", "none-item", "float-item", "short-list", "long-list", "non-str-text",
        "bad-triple", "dict", "surrogate-text", "surrogate-instruction", "unjoined-surrogate-pair"])
def test_bad_inputs_name_the_problem(given, error, words):
    with pytest.raises(error, match=__import__("re").escape(words)):
        normalize_inputs(given)


def test_astral_characters_are_fine():
    assert normalize_inputs(["\U0001F600 and \u4e2d"]) == [("", "\U0001F600 and \u4e2d")]
