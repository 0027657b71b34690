"""Supervised contrastive training on (query, positive, hard negatives) triples, the LLM2Vec supervised recipe.

JSONL lines: {"query": ..., "positive": ..., "negative": str or [str, ...], "instruction": optional,
"dataset": optional}, every field a string (data.read_supervised names the file and line of one that is not, before
the model loads). The instruction goes on the query side only; every batch is drawn from one dataset (so in-batch
negatives are of the same kind); loss: InfoNCE over in-batch positives and hard negatives, scale 50.
"""

from __future__ import annotations

import torch

from ..encoder import LLM2Vec
from .config import TrainConfig
from .contrastive import ContrastiveStage
from .data import read_supervised
from .loop import distributed_context, seed_everything
from .simcse import load_encoder


class SupervisedStage(ContrastiveStage):
    """Supervised contrastive training on the (query, positive, negatives) examples of config.data."""

    name = "supervised"

    def __init__(self, config: TrainConfig, encoder: LLM2Vec | None = None):
        examples = read_supervised(config.data)  # bad data is named (file:line) before the model loads
        seed_everything(config.seed)  # the LoRA initialisation draws from the global RNG
        super().__init__(config, encoder or load_encoder(config))
        self.examples = examples
        queries = [[e["instruction"], e["query"]] for e in examples]
        self.query_rows = self.encoder.tokenize_inputs(queries)
        self.positive_rows = self.encoder.tokenize_inputs([e["positive"] for e in examples])
        flat = [n for e in examples for n in e["negative"]]
        negative_rows = self.encoder.tokenize_inputs(flat) if flat else []
        self.negative_rows, k = [], 0
        for e in examples:
            self.negative_rows.append(negative_rows[k:k + len(e["negative"])])
            k += len(e["negative"])
        self.batches = self._dataset_batches()
        self.num_examples = len(examples)
        self.check_examples("examples")

    def _dataset_batches(self) -> list[list[int]]:
        """Batches that never mix datasets: each dataset's examples in seeded order, cut into batches (their order
        is shuffled per epoch in batch_for_step)."""
        by_dataset: dict[str, list[int]] = {}
        for i, e in enumerate(self.examples):
            by_dataset.setdefault(str(e.get("dataset", "")), []).append(i)
        generator = torch.Generator().manual_seed(self.config.seed)
        batches = []
        for name in sorted(by_dataset):
            members = by_dataset[name]
            order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            size = self.config.batch_size * distributed_context()[1]  # the global batch; ranks take slices
            batches.extend(order[i:i + size] for i in range(0, len(order), size))
        return batches

    def batch_for_step(self, step: int) -> list[int]:
        """This rank's slice of batch `step`: one dataset's batch, the batches shuffled anew (seeded) each epoch."""
        epoch, position = divmod(step, len(self.batches))
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        rank, _ = distributed_context()
        size = self.config.batch_size
        return self.batches[order[position]][rank * size:(rank + 1) * size]

    def example_rows(self, indices):
        """The query rows, positive rows and all hard-negative rows of examples `indices`."""
        queries = [self.query_rows[i] for i in indices]
        positives = [self.positive_rows[i] for i in indices]
        negatives = [row for i in indices for row in self.negative_rows[i]]
        return queries, positives, negatives
