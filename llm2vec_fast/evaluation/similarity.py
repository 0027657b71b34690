"""Semantic similarity evaluation: Pearson and Spearman correlation of embedding cosine similarity with human scores.

Pair sources:
- a user file of scored text pairs: an STS-B style TSV (a header naming `sentence1`, `sentence2` and `score`
  columns, any other columns ignored), a plain 3-column TSV (`sentence1<TAB>sentence2<TAB>score`, or the score
  first), or JSONL objects with `sentence1`, `sentence2` and `score`;
- the Lee et al. (2005) corpus from gensim's test data: 50 news documents and the mean human similarity of every
  pair (the upper triangle of a 50x50 matrix: 1,225 pairs);
- the word-pair sets in gensim's test data: SimLex-999 (999 pairs rated for similarity, not relatedness: "old" /
  "new" is low) and WordSim-353 (353 pairs rated for relatedness), each word embedded alone.

Every distinct text is embedded once (the Lee pairs need 50 embeddings, not 2,450).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..lines import LineError, parse_json_object, record_lines

LEE_DOCUMENTS = "lee.cor"
LEE_SIMILARITIES = "similarities0-1.txt"


class PairsDataError(ValueError):
    """A pair file that cannot be read; the message names the file and line."""


@dataclass
class ScoredPairs:
    """Text pairs with a human similarity score each: sentences1[i], sentences2[i], scores[i]."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def texts(self) -> list[str]:
        """The distinct texts of the pairs, in first-seen order."""
        return list(dict.fromkeys(self.sentences1 + self.sentences2))


# ------------------------------------------------------------------------------------------------------- metrics

def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences; nan when either is constant."""
    x, y = _pair_arrays(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else float("nan")


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default)."""
    values = np.asarray(values, dtype=np.float64)
    # Runs of equal values span ranks start+1 .. start+count; each member gets their mean.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse.ravel()]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); nan when either is constant."""
    x, y = _pair_arrays(x, y)
    return pearson(rankdata(x), rankdata(y))


def _pair_arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"correlation of sequences of different lengths ({len(x)} and {len(y)})")
    if len(x) < 2:
        raise ValueError("correlation needs at least 2 pairs")
    return x, y


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of a with row i of b: [N, H] x [N, H] -> [N] (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------------------------------------- readers

def read_pairs(path: str, score_field: str = "score") -> ScoredPairs:
    """Scored pairs of a .jsonl file or a tab-separated file (.tsv, .txt, .csv with tabs); see the module doc.

    Lines are read as every command reads them (`llm2vec_fast.lines.record_lines`: UTF-8, any line ending, BOM
    dropped, blank lines skipped); a line that cannot be read raises PairsDataError naming the file and line.
    """
    if not os.path.isfile(path):
        raise PairsDataError(f"{path}: no such file")
    read = _read_jsonl_pairs if path.endswith(".jsonl") else _read_tsv_pairs
    try:
        pairs = read(path, score_field)
    except LineError as error:
        raise PairsDataError(str(error)) from None
    if len(pairs) < 2:
        raise PairsDataError(f"{path}: {len(pairs)} scored pair(s); a correlation needs at least 2")
    return check_scores_vary(pairs, path)


def _read_jsonl_pairs(path: str, score_field: str) -> ScoredPairs:
    first, second, scores = [], [], []
    for number, line in record_lines(path):
        try:
            obj = parse_json_object(line, f"an object with sentence1, sentence2, {score_field}")
        except ValueError as error:
            raise PairsDataError(f"{path}:{number}: {error}") from None
        for key in ("sentence1", "sentence2"):
            if not isinstance(obj.get(key), str):
                raise PairsDataError(f"{path}:{number}: missing or non-string field {key!r}")
        first.append(obj["sentence1"])
        second.append(obj["sentence2"])
        scores.append(_score(obj.get(score_field), path, number, score_field))
    return ScoredPairs(os.path.basename(path), first, second, np.asarray(scores, dtype=np.float64))


def _read_tsv_pairs(path: str, score_field: str) -> ScoredPairs:
    first, second, scores = [], [], []
    columns = None  # (sentence1, sentence2, score) column indices, from the header or the first data line
    for number, line in record_lines(path):
        # STS-B lines hold quotes that are part of the text: split on tabs only, never csv-unquote.
        cells = line.split("\t")
        if columns is None:
            lowered = [c.strip().lower() for c in cells]
            if "sentence1" in lowered and "sentence2" in lowered:
                if score_field.lower() not in lowered:
                    raise PairsDataError(f"{path}:{number}: the header has no {score_field!r} column "
                                         f"(columns: {', '.join(cells)})")
                columns = (lowered.index("sentence1"), lowered.index("sentence2"),
                           lowered.index(score_field.lower()))
                continue
            columns = _plain_columns(cells, path, number)
        width = max(columns) + 1
        if len(cells) < width:
            raise PairsDataError(f"{path}:{number}: {len(cells)} tab-separated column(s), expected {width} "
                                 f"(sentence1, sentence2, score)")
        first.append(cells[columns[0]])
        second.append(cells[columns[1]])
        scores.append(_score(cells[columns[2]], path, number, "score"))
    return ScoredPairs(os.path.basename(path), first, second, np.asarray(scores, dtype=np.float64))


def _plain_columns(cells: list[str], path: str, number: int) -> tuple[int, int, int]:
    if len(cells) != 3:
        raise PairsDataError(f"{path}:{number}: expected a header with sentence1/sentence2/score columns or 3 "
                             f"tab-separated columns (sentence1, sentence2, score), got {len(cells)} column(s)")
    if _is_number(cells[2]):
        return 0, 1, 2
    if _is_number(cells[0]):
        return 1, 2, 0
    raise PairsDataError(f"{path}:{number}: no numeric score in the first or last column")


# A score as people write it: ASCII digits, an optional sign, point and exponent. Python's float() also takes
# "4_0" (40.0) and other scripts' digits ("٤" is 4.0), which in a data file are typos or foreign columns.
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text)) and math.isfinite(float(text))


def _score(value, path: str, number: int, field: str) -> float:
    if isinstance(value, bool) or value is None:
        raise PairsDataError(f"{path}:{number}: missing or invalid {field} {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise PairsDataError(f"{path}:{number}: {field} {value!r} is not a number") from None
    if not math.isfinite(score):
        raise PairsDataError(f"{path}:{number}: {field} {value!r} is not a finite number")
    if isinstance(value, str) and not _NUMBER.fullmatch(value):
        raise PairsDataError(f"{path}:{number}: {field} {value!r} is not a number (write it with ASCII digits, "
                             f"e.g. 4.0)")
    return score


def lee_pairs() -> ScoredPairs:
    """The Lee et al. (2005) pairs from gensim's test data: 50 documents, 1,225 scored pairs (i < j).

    Raises RuntimeError naming the fix when gensim is not installed.
    """
    from ..offline_data import gensim_test_data_dir

    directory = gensim_test_data_dir()
    with open(os.path.join(directory, LEE_DOCUMENTS), encoding="latin-1") as f:
        documents = [line.strip() for line in f if line.strip()]
    matrix = np.loadtxt(os.path.join(directory, LEE_SIMILARITIES))
    if matrix.shape != (len(documents), len(documents)):
        raise RuntimeError(f"gensim test data: {LEE_SIMILARITIES} is {matrix.shape}, expected a square matrix "
                           f"over the {len(documents)} documents of {LEE_DOCUMENTS}")
    rows, cols = np.triu_indices(len(documents), k=1)
    return ScoredPairs("lee", [documents[i] for i in rows], [documents[j] for j in cols], matrix[rows, cols])


def word_pairs(name: str) -> ScoredPairs:
    """SimLex-999 (`simlex999`) or WordSim-353 (`wordsim353`) from gensim's test data: word TAB word TAB score,
    with `#` comment lines. Raises RuntimeError naming the fix when gensim is not installed."""
    from ..offline_data import gensim_test_data_dir

    files = {"simlex999": "simlex999.txt", "wordsim353": "wordsim353.tsv"}
    if name not in files:
        raise ValueError(f"unknown word-pair set {name!r}: use one of {sorted(files)}")
    path = os.path.join(gensim_test_data_dir(), files[name])
    first, second, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) != 3:
                raise PairsDataError(f"{path}:{number}: expected word<TAB>word<TAB>score, got {len(cells)} fields")
            first.append(cells[0])
            second.append(cells[1])
            scores.append(_score(cells[2], path, number, "score"))
    return ScoredPairs(name, first, second, np.asarray(scores, dtype=np.float64))


# The sets `eval similarity --builtin` knows: all read from gensim's test data, nothing downloaded.
BUILTIN_PAIRS = {"lee": lee_pairs, "simlex999": lambda: word_pairs("simlex999"),
                 "wordsim353": lambda: word_pairs("wordsim353")}


# ---------------------------------------------------------------------------------------------------- evaluation

def evaluate_pairs(embed: Callable[[list[str]], np.ndarray], pairs: ScoredPairs, keep_cosines: bool = False) -> dict:
    """Correlations of cos(embed(sentence1), embed(sentence2)) with the human scores.

    embed: texts -> embeddings [len(texts), H] (any encoder; see `encoder_embed` for an LLM2Vec).
    Returns {name, pairs, pearson, spearman, mean_cosine}, plus `cosines` [N] when keep_cosines (for
    `bootstrap_correlations`).
    """
    texts = pairs.texts()
    embeddings = np.asarray(embed(texts), dtype=np.float32)
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"embed returned {embeddings.shape[0]} rows for {len(texts)} texts")
    index = {text: i for i, text in enumerate(texts)}
    a = embeddings[[index[t] for t in pairs.sentences1]]
    b = embeddings[[index[t] for t in pairs.sentences2]]
    cosines = cosine_rows(a, b)
    result = {"name": pairs.name, "pairs": len(pairs), "pearson": _defined(pearson(cosines, pairs.scores)),
              "spearman": _defined(spearman(cosines, pairs.scores)), "mean_cosine": float(cosines.mean())}
    if result["pearson"] is None:
        # The gold scores are checked when read (`check_scores_vary`): constant cosines are the model's.
        result["undefined"] = "the model gives every pair the same cosine, so no correlation is defined"
    if keep_cosines:
        result["cosines"] = cosines
    return result


# ------------------------------------------------------------------------------------------- confidence intervals

def text_bootstrap_indices(pairs: ScoredPairs, resamples: int, seed: int = 0):
    """Bootstrap resamples of `pairs` drawn over their texts, as index arrays into the pairs (with repeats).

    The Lee pairs share texts (each document is in 49 pairs), so resampling pairs as if they were independent
    understates the spread. Here each resample draws the texts with replacement and keeps every pair between
    drawn texts, once per combination of copies: a cluster bootstrap whose unit is the text.
    """
    index = {text: i for i, text in enumerate(pairs.texts())}
    first = np.array([index[t] for t in pairs.sentences1])
    second = np.array([index[t] for t in pairs.sentences2])
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        copies = np.bincount(rng.integers(0, len(index), len(index)), minlength=len(index))  # [T]
        yield np.repeat(np.arange(len(pairs)), copies[first] * copies[second])


def pair_bootstrap_indices(pairs: ScoredPairs, resamples: int, seed: int = 0):
    """Plain bootstrap resamples of the pairs (index arrays): for sets whose pairs rarely share a text."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, len(pairs), len(pairs))


def bootstrap_correlations(cosines: dict[str, np.ndarray], pairs: ScoredPairs, reference: str | None = None,
                           resamples: int = 1000, level: float = 0.95, seed: int = 0,
                           unit: str = "text") -> dict[str, dict]:
    """Percentile intervals of each variant's Spearman and Pearson and, paired, of its difference from `reference`.

    cosines: variant name -> its cosine of every pair ([N], aligned with `pairs`; `evaluate_pairs(...,
    keep_cosines=True)` gives them). All variants are scored on the same resamples, so a difference interval
    that excludes 0 means the ordering holds beyond the choice of documents. unit: "text" resamples the texts
    (`text_bootstrap_indices`, for sets like Lee where every text is in many pairs), "pair" the pairs.
    Returns name -> {"spearman_ci": [lo, hi], "pearson_ci": [lo, hi]} plus "spearman_diff_ci" and
    "pearson_diff_ci" (variant minus reference) when a reference is given.
    """
    if unit not in ("text", "pair"):
        raise ValueError(f"unit must be 'text' or 'pair', got {unit!r}")
    if reference is not None and reference not in cosines:
        raise ValueError(f"reference {reference!r} is not one of the variants {sorted(cosines)}")
    for name, values in cosines.items():
        if len(values) != len(pairs):
            raise ValueError(f"{name}: {len(values)} cosines for {len(pairs)} pairs")
    metrics = {"spearman": spearman, "pearson": pearson}
    draws = {name: {metric: [] for metric in metrics} for name in cosines}
    resampler = text_bootstrap_indices if unit == "text" else pair_bootstrap_indices
    for rows in resampler(pairs, resamples, seed):
        scores = pairs.scores[rows]
        for name, values in cosines.items():
            for metric, function in metrics.items():
                draws[name][metric].append(function(np.asarray(values)[rows], scores))
    tail = 100 * (1 - level) / 2

    def interval(values) -> list[float]:
        return [float(v) for v in np.nanpercentile(values, [tail, 100 - tail])]

    out = {}
    for name in cosines:
        out[name] = {f"{metric}_ci": interval(draws[name][metric]) for metric in metrics}
        if reference is not None:
            for metric in metrics:
                difference = np.subtract(draws[name][metric], draws[reference][metric])
                out[name][f"{metric}_diff_ci"] = interval(difference)
    return out


def encoder_embed(encoder, instruction: str = "", batch_size: int | None = None,
                  max_batch_tokens: int | None = None, show_progress_bar: bool = False,
                  device: str | None = None) -> Callable[[list[str]], np.ndarray]:
    """An `embed` function for `evaluate_pairs` from an LLM2Vec encoder; `instruction` goes on every text."""

    def embed(texts: list[str]) -> np.ndarray:
        inputs = [[instruction, t] for t in texts] if instruction else list(texts)
        return encoder.encode(inputs, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                              show_progress_bar=show_progress_bar, device=device, convert_to_numpy=True)

    return embed


def format_table(results: list[dict], title: str = "") -> str:
    """A plain-text table of `evaluate_pairs` results (correlations x 100)."""
    lines = [title] if title else []
    width = max([len("data")] + [len(r["name"]) for r in results])
    lines.append(f"{'data':<{width}}  {'pairs':>6}  {'pearson':>8}  {'spearman':>8}")
    for r in results:
        lines.append(f"{r['name']:<{width}}  {r['pairs']:>6}  {_percent(r['pearson'])}  {_percent(r['spearman'])}"
                     + (f"  ({r['undefined']})" if r.get("undefined") else ""))
    return "\n".join(lines)


def _percent(value) -> str:
    return f"{'n/a':>8}" if value is None else f"{100 * value:>8.2f}"


def _defined(correlation: float):
    """A correlation, or None where it is undefined (nan: a constant side): JSON has no NaN."""
    return None if math.isnan(correlation) else correlation


def check_scores_vary(pairs: ScoredPairs, path: str) -> ScoredPairs:
    """Refuse a pair set whose gold scores are all equal: no correlation with them is defined, for any model."""
    if len(pairs) and np.ptp(pairs.scores) == 0:
        raise PairsDataError(f"{path}: all {len(pairs)} scores are {pairs.scores[0]:g}: a correlation with constant "
                             f"scores is undefined for any model. Use a pair file with graded scores.")
    return pairs
