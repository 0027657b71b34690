"""Semantic similarity evaluation: Pearson and Spearman correlation of embedding cosine similarity with human scores.

Pair sources:
- a user file of scored text pairs: an STS-B style TSV (a header naming `sentence1`, `sentence2` and `score`
  columns, any other columns ignored), a plain 3-column TSV (`sentence1<TAB>sentence2<TAB>score`, or the score
  first), or JSONL objects with `sentence1`, `sentence2` and `score`;
- the Lee et al. (2005) corpus from gensim's test data: 50 news documents and the mean human similarity of every
  pair (the upper triangle of a 50x50 matrix: 1,225 pairs).

Every distinct text is embedded once (the Lee pairs need 50 embeddings, not 2,450).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

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
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values; each run gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


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
    """Scored pairs of a .jsonl file or a tab-separated file (.tsv, .txt, .csv with tabs); see the module doc."""
    if not os.path.isfile(path):
        raise PairsDataError(f"{path}: no such file")
    pairs = _read_jsonl_pairs(path, score_field) if path.endswith(".jsonl") else _read_tsv_pairs(path, score_field)
    if len(pairs) < 2:
        raise PairsDataError(f"{path}: {len(pairs)} scored pair(s); a correlation needs at least 2")
    return pairs


def _read_jsonl_pairs(path: str, score_field: str) -> ScoredPairs:
    first, second, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise PairsDataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise PairsDataError(f"{path}:{number}: expected a JSON object with sentence1, sentence2, "
                                     f"{score_field}")
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
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
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


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _score(value, path: str, number: int, field: str) -> float:
    if isinstance(value, bool) or value is None:
        raise PairsDataError(f"{path}:{number}: missing or invalid {field} {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise PairsDataError(f"{path}:{number}: {field} {value!r} is not a number") from None
    if not math.isfinite(score):
        raise PairsDataError(f"{path}:{number}: {field} {value!r} is not a finite number")
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


# ---------------------------------------------------------------------------------------------------- evaluation

def evaluate_pairs(embed: Callable[[list[str]], np.ndarray], pairs: ScoredPairs) -> dict:
    """Correlations of cos(embed(sentence1), embed(sentence2)) with the human scores.

    embed: texts -> embeddings [len(texts), H] (any encoder; see `encoder_embed` for an LLM2Vec).
    Returns {name, pairs, pearson, spearman, mean_cosine}.
    """
    texts = pairs.texts()
    embeddings = np.asarray(embed(texts), dtype=np.float32)
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"embed returned {embeddings.shape[0]} rows for {len(texts)} texts")
    index = {text: i for i, text in enumerate(texts)}
    a = embeddings[[index[t] for t in pairs.sentences1]]
    b = embeddings[[index[t] for t in pairs.sentences2]]
    cosines = cosine_rows(a, b)
    return {"name": pairs.name, "pairs": len(pairs), "pearson": pearson(cosines, pairs.scores),
            "spearman": spearman(cosines, pairs.scores), "mean_cosine": float(cosines.mean())}


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
        lines.append(f"{r['name']:<{width}}  {r['pairs']:>6}  {100 * r['pearson']:>8.2f}  {100 * r['spearman']:>8.2f}")
    return "\n".join(lines)
