"""What SimCSE and supervised training share: the in-batch InfoNCE loss, gathering embeddings across ranks with
their gradients, and GradCache (contrastive batches larger than memory, with the dropout masks replayed).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist


def info_nce(queries: torch.Tensor, documents: torch.Tensor, scale: float, label_offset: int = 0) -> torch.Tensor:
    """Cross entropy of cos(query_i, every document) x scale against document i + label_offset.

    queries [B, H]; documents [N, H] with N >= B (positives first, then any hard negatives / other ranks' rows).
    The reference's loss (HardNegativeNLLLoss): one direction, in-batch negatives, scale = 1 / temperature.
    """
    scores = torch.nn.functional.normalize(queries.float(), dim=-1) @ \
        torch.nn.functional.normalize(documents.float(), dim=-1).T * scale  # [B, N]
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    return torch.nn.functional.cross_entropy(scores, labels)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of x concatenated (gradients flow back to each rank's own rows) and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, 0), dist.get_rank() * x.shape[0]


class RNGState:
    """Snapshot of torch's CPU and CUDA generators (the attention kernels and LoRA dropout draw from them)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        """Set the generators back to this snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def grad_cache_step(embed: Callable[[int], torch.Tensor], num_chunks: int,
                    loss_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor], device: torch.device) -> float:
    """Backward of loss_fn(all chunk embeddings) with one chunk's activations in memory at a time.

    embed(i) runs the model on chunk i and returns its embeddings. Pass 1 embeds every chunk without a graph,
    recording the RNG state before each; the loss and its gradient w.r.t. the embeddings are computed on the
    full batch; pass 2 re-embeds each chunk under its recorded RNG state -- the same dropout masks -- and
    back-propagates that chunk's slice of the gradient. The parameter gradients equal those of the unchunked
    loss under the same masks. Returns the loss.
    """
    states, cached = [], []
    with torch.no_grad():
        for i in range(num_chunks):
            states.append(RNGState(device))
            cached.append(embed(i))
    after = RNGState(device)
    leaves = [c.detach().requires_grad_() for c in cached]
    loss = loss_fn(leaves)
    loss.backward()
    for i, state in enumerate(states):
        state.restore()
        embed(i).backward(leaves[i].grad)
    after.restore()  # continue from where pass 1 left the generators
    return float(loss.detach())


class ContrastiveStage:
    """Shared by SimCSE and supervised training: an LLM2Vec encoder with a LoRA adapter, trained with InfoNCE.

    Subclasses provide `num_examples` and `example_rows(indices)`, which returns the tokenized rows of a batch as
    (queries, positives, negatives): query i's positive is positives[i]; negatives (any number) are shared.
    All rows of a batch (or of a GradCache chunk) go through ONE packed forward.
    """

    name = "contrastive"

    def __init__(self, config, encoder):
        from .model import add_lora

        self.config = config
        self.encoder = encoder
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder.model = add_lora(encoder.model, config)
        encoder.to(self.device)
        self.model = encoder.model
        self._tokens = 0  # tokens embedded during the current step

    num_examples: int

    def example_rows(self, indices):
        """The tokenized rows of examples `indices` as (queries, positives, negatives); subclasses implement it."""
        raise NotImplementedError

    def check_examples(self, what: str) -> None:
        """In-batch negatives need at least 2 examples in the data and in a batch; refuse fewer, and a batch
        larger than the data."""
        from .data import DataError
        from .loop import check_batch_fits, distributed_context

        if self.num_examples < 2:
            raise DataError(f"{self.config.data}: {self.name} needs at least 2 {what} (the other examples of a "
                            f"batch are each one's negatives), found {self.num_examples}; add data")
        if self.config.batch_size * distributed_context()[1] < 2:
            raise DataError(f"--batch-size 1: {self.name} needs at least 2 examples per batch (in-batch "
                            f"negatives); pass --batch-size 2 or more")
        check_batch_fits(self.num_examples, what, self.config)

    def batch_for_step(self, step: int) -> list[int]:
        """This rank's example indices for step `step` (`loop.batch_indices`)."""
        from .loop import batch_indices

        return batch_indices(self.num_examples, self.config.batch_size, step, self.config.seed)

    def _embed(self, indices):
        """Embeddings of one chunk of examples, split as (queries [n, H], positives [n, H], negatives [m, H])."""
        queries, positives, negatives = self.example_rows(indices)
        batch = self.encoder.make_batch(queries + positives + negatives).to(self.device)
        embeddings = self.encoder.embed_batch(batch)
        n = len(queries)
        self._tokens += batch.num_tokens
        return embeddings[:n], embeddings[n:2 * n], embeddings[2 * n:]

    def _loss(self, parts) -> torch.Tensor:
        queries = torch.cat([q for q, _, _ in parts])
        documents = torch.cat([p for _, p, _ in parts] + [neg for _, _, neg in parts])
        documents, offset = gather_with_grad(documents)
        return info_nce(queries, documents, self.config.scale, offset)

    def step(self, step: int) -> tuple[float, int]:
        """Forward and backward of step `step`'s InfoNCE loss; returns (loss, tokens embedded).

        With config.gradcache_chunk set, the batch goes through GradCache in chunks of that many examples.
        """
        indices = self.batch_for_step(step)
        self._tokens = 0
        chunk = self.config.gradcache_chunk
        if not chunk or chunk >= len(indices):
            loss = self._loss([self._embed(indices)])
            loss.backward()
            return float(loss.detach()), self._tokens
        chunks = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]

        def embed(i):
            # One tensor per chunk for grad_cache_step: queries, positives and negatives stacked.
            return torch.cat(self._embed(chunks[i]))

        def loss_fn(stacked):
            parts = []
            for tensor, members in zip(stacked, chunks):
                n = len(members)
                parts.append((tensor[:n], tensor[n:2 * n], tensor[2 * n:]))
            return self._loss(parts)

        loss = grad_cache_step(embed, len(chunks), loss_fn, self.device)
        return loss, self._tokens

    def save(self, directory: str) -> None:
        """Write the adapter, the tokenizer and llm2vec_config.json into `directory`, loadable by llm2vec 0.2.3 too."""
        import json
        import os

        from ..reference_files import make_reference_loadable

        self.model.save_pretrained(directory)
        self.encoder.tokenizer.save_pretrained(directory)
        _point_adapter_at(directory, self.encoder.config._name_or_path)
        # The encoder defaults the trained model is loaded with. max_length is left out: it limited the training
        # texts (train_config.json records it), and as an inference default it would cut every later encode
        # (`llm2vec-fast train --save-max-length` adds it on purpose: train.output.save_max_length).
        with open(os.path.join(directory, "llm2vec_config.json"), "w") as f:
            json.dump({"pooling_mode": self.encoder.pooling_mode, "doc_max_length": self.encoder.doc_max_length,
                       "skip_instruction": self.encoder.skip_instruction}, f, indent=4)
        make_reference_loadable(directory, self.encoder.tokenizer)  # llm2vec 0.2.3 loads the adapter too


def _point_adapter_at(directory: str, base: str) -> None:
    """Record the base the adapter was trained on as an absolute local path (offline loading follows it)."""
    import json
    import os

    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = os.path.abspath(base) if os.path.isdir(base) else base
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
