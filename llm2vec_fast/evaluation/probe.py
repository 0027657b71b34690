"""The word-level probe of the LLM2Vec paper: a FROZEN encoder, dropout + one linear layer per word.

Data: CoNLL-format files the user provides -- one word per line with whitespace-separated columns (CoNLL-2003:
word POS chunk NER), blank lines between sentences, ``-DOCSTART-`` lines skipped. The label column is chosen by
task (pos=1, chunk=2, ner=3) or by index.

Features are computed once: each sentence's words are joined with spaces and tokenized as ordinary text (the
tokenization the model was trained on), the encoder's last hidden states are taken token by token (the packed
engine for bidirectional models, padded for causal ones) and each word gets the state of its first sub-word
token or the mean over its sub-word tokens. Tokens are mapped to words through the fast tokenizer's character
offsets: `is_split_into_words=True` would tokenize every word without its leading space on byte-level BPE
vocabularies (Llama 3, SmolLM2, Qwen2), i.e. tokens the model rarely saw mid-sentence.

`next_token=True` is the alignment for MNTP-trained models, whose token i was trained to predict token i+1: a
word is represented by the states one position to the left of its tokens (a first token at position 0, with no
BOS before it, keeps its own state).

Reported: accuracy, the majority-class baseline and, for BIO/IOB tags, entity-level precision / recall / F1 with
CoNLL's conlleval rules (an I- tag after O or after another type starts an entity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..lines import LineError, text_lines

TASK_COLUMNS = {"pos": 1, "chunk": 2, "ner": 3}
WORD_REPRS = ("first", "mean")


class ConllDataError(ValueError):
    """A CoNLL file that cannot be read; the message names the file and line."""


@dataclass
class Sentence:
    """One CoNLL sentence: its words and one label per word."""

    words: list[str]
    labels: list[str]


# -------------------------------------------------------------------------------------------------------- reading

def read_conll(path: str, column: int) -> list[Sentence]:
    """Sentences of a CoNLL file with the labels of `column` (0 is the word itself).

    Lines are read as every command reads them (`llm2vec_fast.lines.text_lines`: UTF-8, any line ending, BOM
    dropped); blank lines end a sentence. A line that cannot be read raises ConllDataError naming the file and line.
    """
    if not os.path.isfile(path):
        raise ConllDataError(f"{path}: no such file")
    if column < 1:
        raise ConllDataError(f"label column must be >= 1 (column 0 holds the words), got {column}")
    sentences, words, labels = [], [], []
    try:
        for number, line in text_lines(path):
            cells = line.split()
            if not cells or cells[0] == "-DOCSTART-":
                if words:
                    sentences.append(Sentence(words, labels))
                    words, labels = [], []
                continue
            if len(cells) <= column:
                raise ConllDataError(f"{path}:{number}: {len(cells)} column(s), but the label column is {column} "
                                     f"(0-based; words are column 0); pick another --column or --task")
            words.append(cells[0])
            labels.append(cells[column])
    except LineError as error:
        raise ConllDataError(str(error)) from None
    if words:
        sentences.append(Sentence(words, labels))
    if not sentences:
        raise ConllDataError(f"{path}: no sentences found")
    return sentences


# ------------------------------------------------------------------------------------------------ entity metrics

def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities (type, start, end) of a BIO / IOB1 tag sequence, end exclusive (conlleval's chunking rules)."""
    spans, kind, start = [], None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, entity = tag.partition("-") if tag != "O" else ("O", "", "")
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"tag {tag!r} is not a BIO tag (O, B-TYPE, I-TYPE)")
        begins = prefix == "B" or (prefix == "I" and entity != kind)
        if kind is not None and (prefix == "O" or begins):
            spans.append((kind, start, i))
            kind = None
        if begins:
            kind, start = entity, i
    return spans


def is_bio(labels) -> bool:
    """Whether every label is O / B-X / I-X and at least one is not O."""
    labels = set(labels)
    return labels != {"O"} and all(l == "O" or (l[:2] in ("B-", "I-") and len(l) > 2) for l in labels)


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Micro precision / recall / F1 over exact entity matches (type and span) across sentences."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    gold_set, predicted_set = set(), set()
    for k, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sentence {k}: {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((k,) + span for span in bio_spans(g))
        predicted_set.update((k,) + span for span in bio_spans(p))
    correct = len(gold_set & predicted_set)
    precision = correct / len(predicted_set) if predicted_set else 0.0
    recall = correct / len(gold_set) if gold_set else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold_entities": len(gold_set),
            "predicted_entities": len(predicted_set), "correct_entities": correct}


# ------------------------------------------------------------------------------------------------------- features

@dataclass
class WordFeatures:
    """features [N, H] float32 of the N words that got at least one token; kept[s] lists sentence s's word indices
    that did (words cut off by max_length have none)."""

    features: torch.Tensor
    kept: list[list[int]]

    @property
    def num_kept(self) -> int:
        """N, the number of words that have a feature row."""
        return sum(len(k) for k in self.kept)


def word_token_map(tokenizer, sentences: list[list[str]], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and, per token, the index of its word (-1: special / whitespace token) of each sentence."""
    texts, word_at = [], []
    for words in sentences:
        text, owner = "", []
        for w, word in enumerate(words):
            if w:
                text += " "
                owner.append(-1)
            text += word
            owner.extend([w] * len(word))
        texts.append(text)
        word_at.append(owner)
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
    ids, owners = [], []
    for row, offsets, owner in zip(encoded["input_ids"], encoded["offset_mapping"], word_at):
        token_words = []
        for start, end in offsets:
            word = -1
            for c in range(end - 1, start - 1, -1):  # the token's last non-space character names its word
                if owner[c] >= 0:
                    word = owner[c]
                    break
            token_words.append(word)
        ids.append(list(row))
        owners.append(token_words)
    return ids, owners


def token_states(encoder, rows: list[list[int]], max_batch_tokens: int | None = None,
                 device: str | None = None) -> list[torch.Tensor]:
    """Last hidden states [len(row), H] (float32, CPU) of every token of every row, from the frozen encoder."""
    from ..batching import PackedBatch, token_budget_batches
    from ..modeling import is_bidirectional, run_packed, run_padded
    from ..tokenization import TokenizedRow

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = max_batch_tokens or encoder.max_batch_tokens or encoder.default_batch_tokens(device)
    output: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    was_training = encoder.training
    encoder.eval()
    encoder.to(device)
    try:
        with torch.inference_mode():
            for indices in token_budget_batches([len(r) for r in rows], budget):
                tokenized = [TokenizedRow(rows[i], 0, len(rows[i])) for i in indices]
                batch = encoder.make_batch(tokenized).to(device)
                if isinstance(batch, PackedBatch):
                    hidden = run_packed(encoder.model, batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                        batch.max_seqlen).float().cpu()
                    bounds = batch.cu_seqlens.tolist()
                    pieces = [hidden[bounds[k]:bounds[k + 1]] for k in range(len(indices))]
                else:
                    hidden = run_padded(encoder.model, batch.input_ids, batch.attention_mask,
                                        is_bidirectional(encoder.model)).float().cpu()
                    pieces = [hidden[k, :len(rows[i])] for k, i in enumerate(indices)]
                for i, piece in zip(indices, pieces):
                    output[i] = piece.clone()
    finally:
        encoder.train(was_training)
    return output


def word_features(encoder, sentences: list[list[str]], word_repr: str = "first", next_token: bool = False,
                  max_batch_tokens: int | None = None, device: str | None = None) -> WordFeatures:
    """One feature vector per word (see the module doc for `word_repr` and `next_token`)."""
    if word_repr not in WORD_REPRS:
        raise ValueError(f"word_repr must be one of {', '.join(WORD_REPRS)}, got {word_repr!r}")
    ids, owners = word_token_map(encoder.tokenizer, sentences, encoder.max_length)
    states = token_states(encoder, ids, max_batch_tokens=max_batch_tokens, device=device)
    features, kept = [], []
    for words, owner, hidden in zip(sentences, owners, states):
        owner = torch.tensor(owner, dtype=torch.long)
        positions = torch.nonzero(owner >= 0)[:, 0]
        word_of = owner[positions]
        if next_token:
            positions = (positions - 1).clamp(min=0)
        present = torch.unique(word_of)  # sorted word indices that got tokens
        if word_repr == "first":
            # positions ascend, so the first occurrence of each word is its first token.
            first = torch.full((len(words),), -1, dtype=torch.long)
            first.scatter_reduce_(0, word_of, positions, reduce="amin", include_self=False)
            vectors = hidden[first[present]]
        else:
            sums = torch.zeros(len(words), hidden.shape[1]).index_add_(0, word_of, hidden[positions])
            counts = torch.zeros(len(words)).index_add_(0, word_of, torch.ones(len(word_of)))
            vectors = sums[present] / counts[present, None]
        features.append(vectors)
        kept.append(present.tolist())
    width = states[0].shape[1] if states else encoder.config.hidden_size
    return WordFeatures(torch.cat(features) if features else torch.zeros(0, width), kept)


# ------------------------------------------------------------------------------------------------------- training

@dataclass
class ProbeConfig:
    """Probe hyper-parameters. The paper's probe: dropout 0.1 + a linear layer on frozen features."""

    word_repr: str = "first"
    next_token: bool = False
    epochs: int = 5
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    dropout: float = 0.1
    seed: int = 0
    max_batch_tokens: int | None = None
    device: str | None = None
    log: list = field(default_factory=list)


class Standardize(torch.nn.Module):
    """(x - mean) / std per feature, fitted on the training features. LLM hidden states have a few huge-magnitude
    dimensions; standardising is an affine map (the probe stays linear in the hidden state) that makes AdamW on a
    short schedule converge."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(features[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] standardised with the training features' per-feature mean and std."""
        return (x - self.mean) / self.std


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int, config: ProbeConfig) -> torch.nn.Module:
    """Standardisation + dropout + linear layer, the last trained with AdamW on (features [N, H], labels [N])."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    probe = torch.nn.Sequential(Standardize(features), torch.nn.Dropout(config.dropout),
                                torch.nn.Linear(features.shape[1], num_labels))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    probe.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = torch.nn.functional.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        config.log.append({"epoch": epoch + 1, "loss": total / max(1, len(order))})
    probe.eval()
    return probe


def run_probe(encoder, train: list[Sentence], evaluations: dict[str, list[Sentence]],
              config: ProbeConfig | None = None) -> dict:
    """Train a probe on `train` and score it on each of `evaluations` (name -> sentences).

    Returns {labels, train_words, epochs: [{epoch, loss}], results: {name: {...}}}; each result holds words,
    accuracy, majority_baseline, unscored_words (cut off by max_length: counted wrong) and, for BIO tags,
    entity precision / recall / f1.
    """
    config = config or ProbeConfig()
    label_names = sorted({label for s in train for label in s.labels})
    label_index = {name: i for i, name in enumerate(label_names)}
    train_features = word_features(encoder, [s.words for s in train], config.word_repr, config.next_token,
                                   config.max_batch_tokens, config.device)
    train_labels = torch.tensor([label_index[s.labels[w]] for s, kept in zip(train, train_features.kept)
                                 for w in kept], dtype=torch.long)
    if len(train_labels) == 0:
        raise ValueError("no training word got a token (max_length too small?)")
    probe = train_probe(train_features.features, train_labels, len(label_names), config)
    majority = label_names[int(torch.bincount(train_labels, minlength=len(label_names)).argmax())]
    bio = is_bio(label_names)

    results = {}
    for name, sentences in evaluations.items():
        features = word_features(encoder, [s.words for s in sentences], config.word_repr, config.next_token,
                                 config.max_batch_tokens, config.device)
        with torch.no_grad():
            predicted_ids = probe(features.features).argmax(-1).tolist() if features.num_kept else []
        predicted, cursor = [], 0
        for s, kept in zip(sentences, features.kept):
            tags = ["O" if bio else majority] * len(s.words)  # words without tokens get the fallback tag
            for w in kept:
                tags[w] = label_names[predicted_ids[cursor]]
                cursor += 1
            predicted.append(tags)
        gold = [s.labels for s in sentences]
        total = sum(len(g) for g in gold)
        correct = sum(p == g for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs))
        result = {"words": total, "accuracy": correct / total,
                  "majority_baseline": sum(g == majority for gs in gold for g in gs) / total,
                  "unscored_words": total - features.num_kept}
        if bio and all(g == "O" or g[:2] in ("B-", "I-") for gs in gold for g in gs):
            result["entity"] = entity_scores(gold, predicted)
        results[name] = result
    return {"labels": len(label_names), "train_words": int(len(train_labels)), "majority_label": majority,
            "word_repr": config.word_repr, "next_token": config.next_token, "epochs": list(config.log),
            "results": results}


def format_results(report: dict) -> str:
    """A plain-text table of `run_probe` results."""
    lines = [f"probe: {report['labels']} labels, {report['train_words']} training words, word_repr="
             f"{report['word_repr']}, next_token={report['next_token']}",
             f"{'data':<24}  {'words':>7}  {'accuracy':>8}  {'majority':>8}  {'entity F1':>9}"]
    for name, r in report["results"].items():
        f1 = f"{100 * r['entity']['f1']:>9.2f}" if "entity" in r else f"{'-':>9}"
        lines.append(f"{name[-24:]:<24}  {r['words']:>7}  {100 * r['accuracy']:>8.2f}  "
                     f"{100 * r['majority_baseline']:>8.2f}  {f1}")
    return "\n".join(lines)
