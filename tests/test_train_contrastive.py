"""SimCSE and supervised training: the loss formula, one packed forward for both views, GradCache, batching."""

import json

import pytest
import torch

from llm2vec_fast.train.config import TrainConfig
from llm2vec_fast.train.contrastive import RNGState, grad_cache_step, info_nce
from llm2vec_fast.train.simcse import SimCSEStage
from llm2vec_fast.train.supervised import SupervisedStage
from tiny_models import corpus


def test_info_nce_is_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(9, 8, generator=g, dtype=torch.float64)
    cos = torch.stack([torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for b in d]) for a in q])
    expected = -torch.log_softmax(cos * 20, dim=1)[torch.arange(5), torch.arange(5)].mean()
    torch.testing.assert_close(info_nce(q, d, 20.0).double(), expected, atol=1e-5, rtol=1e-5)
    expected_offset = -torch.log_softmax(cos * 20, dim=1)[torch.arange(5), torch.arange(5) + 2].mean()
    torch.testing.assert_close(info_nce(q, d, 20.0, label_offset=2).double(), expected_offset, atol=1e-5, rtol=1e-5)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(corpus(64, seed=3)) + "\n")
    return str(path)


def make_config(model, data, tmp_path, **kw):
    stage = kw.pop("stage", "simcse")
    values = dict(model=model, data=data, output=str(tmp_path / "out"), dtype="float32", batch_size=8,
                  gradient_checkpointing=False, learning_rate=1e-3, steps=20, save_steps=10)
    values.update(kw)
    return TrainConfig.for_stage(stage, **values)


def simcse_stage(llama_dir, text_file, tmp_path, **kw):
    return SimCSEStage(make_config(llama_dir, text_file, tmp_path, **kw))


def trainable_grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_one_packed_forward_equals_two_forwards_without_dropout(llama_dir, text_file, tmp_path):
    stage = simcse_stage(llama_dir, text_file, tmp_path, attention_dropout=0.0, lora_dropout=0.0)
    stage.model.train()
    indices = stage.batch_for_step(0)
    q, p, n = stage._embed(indices)
    assert n.shape[0] == 0
    rows = [stage.rows[i] for i in indices]
    separate = stage.encoder.embed_batch(stage.encoder.make_batch(rows))
    torch.testing.assert_close(q, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, separate, atol=1e-5, rtol=1e-5)


def test_dropout_makes_the_two_views_differ(llama_dir, text_file, tmp_path):
    stage = simcse_stage(llama_dir, text_file, tmp_path)
    stage.model.train()
    q, p, _ = stage._embed(stage.batch_for_step(0))
    assert (q - p).abs().max() > 1e-4


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout-0.3"])
def test_grad_cache_equals_unchunked_loss(llama_dir, text_file, tmp_path, dropout):
    stage = simcse_stage(llama_dir, text_file, tmp_path, attention_dropout=dropout, lora_dropout=dropout / 3)
    stage.model.train()
    indices = stage.batch_for_step(0)
    chunks = [indices[:3], indices[3:6], indices[6:]]
    torch.manual_seed(7)
    start = RNGState(torch.device("cpu"))
    # Reference: the same chunk forwards (same RNG stream, so the same masks), all kept in one graph.
    parts = [stage._embed(c) for c in chunks]
    reference_loss = stage._loss(parts)
    reference_loss.backward()
    expected = trainable_grads(stage.model)
    stage.model.zero_grad()
    start.restore()
    loss = grad_cache_step(lambda i: torch.cat(stage._embed(chunks[i])), 3,
                           lambda stacked: stage._loss([(t[:len(c)], t[len(c):2 * len(c)], t[2 * len(c):])
                                                        for t, c in zip(stacked, chunks)]), torch.device("cpu"))
    assert abs(loss - float(reference_loss)) < 1e-5
    for a, b in zip(trainable_grads(stage.model), expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    if dropout == 0.0:
        # Without dropout GradCache also equals the single packed forward of the whole batch.
        stage.model.zero_grad()
        whole = stage._loss([stage._embed(indices)])
        whole.backward()
        for a, b in zip(trainable_grads(stage.model), expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def fixed_batch_loss(stage, step=0, seed=123):
    """The training objective on one batch under a fixed RNG state (the same dropout masks every call)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(stage._loss([stage._embed(stage.batch_for_step(step))]))


def test_twenty_simcse_steps_lower_the_loss(llama_dir, text_file, tmp_path):
    from llm2vec_fast.train.loop import train

    stage = simcse_stage(llama_dir, text_file, tmp_path, scale=5.0)
    stage.model.train()
    before = fixed_batch_loss(stage)
    train(stage, stage.config, show_progress=False)
    stage.model.train()
    assert fixed_batch_loss(stage) < before


@pytest.fixture
def triples(tmp_path):
    rows = []
    words = corpus(120, seed=5)
    for i in range(40):
        rows.append(dict(query=words[3 * i], positive=words[3 * i + 1], negative=[words[3 * i + 2]],
                         instruction="find the match:", dataset="a" if i % 2 else "b"))
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_supervised_batches_never_mix_datasets(llama_dir, triples, tmp_path):
    stage = SupervisedStage(make_config(llama_dir, triples, tmp_path, stage="supervised", batch_size=6))
    for step in range(8):
        datasets = {stage.examples[i]["dataset"] for i in stage.batch_for_step(step)}
        assert len(datasets) == 1
    queries, positives, negatives = stage.example_rows(stage.batch_for_step(0))
    assert len(negatives) == len(queries)
    # The instruction is on the query side only.
    instruction_ids = stage.encoder.tokenizer("find the match:", add_special_tokens=False)["input_ids"]
    assert queries[0].input_ids[1:1 + len(instruction_ids)] == instruction_ids
    assert queries[0].text_start > 1 and positives[0].text_start == 1


def test_twenty_supervised_steps_lower_the_loss(llama_dir, triples, tmp_path):
    from llm2vec_fast.train.loop import train

    stage = SupervisedStage(make_config(llama_dir, triples, tmp_path, stage="supervised", batch_size=8, scale=5.0))
    before = fixed_batch_loss(stage)
    train(stage, stage.config, show_progress=False)
    assert fixed_batch_loss(stage) < before


def test_bad_training_data_names_the_line(llama_dir, tmp_path):
    from llm2vec_fast.train.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": \n')
    with pytest.raises(DataError, match="bad.jsonl:2: invalid JSON"):
        SupervisedStage(make_config(llama_dir, str(bad), tmp_path, stage="supervised"))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"query": "a"}\n')
    with pytest.raises(DataError, match="missing.jsonl:1: missing or empty field"):
        SupervisedStage(make_config(llama_dir, str(missing), tmp_path, stage="supervised"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        simcse_stage(llama_dir, str(empty), tmp_path)
