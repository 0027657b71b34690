"""Masked next token prediction (MNTP), step 2 of LLM2Vec.

Text is tokenized, concatenated and cut into blocks of `block_size` tokens; each batch of blocks is packed into
one row (no padding). A share of the non-special tokens is masked (80% mask token / 10% random / 10% kept by
default), and the label of masked token i is predicted from the hidden state at i-1 -- the causal LM's shifted
loss, so a mask at a block's first position is never scored. The LM head runs only on the gathered rows i-1,
through the chunked fused linear + cross-entropy, so no full-vocabulary logits tensor ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from ..modeling import run_packed


@dataclass
class MNTPBatch:
    """input_ids/position_ids [T] (masked, packed); cu_seqlens int32 [B+1]; score_rows [M] hidden rows i-1 whose
    next token is scored; targets [M] the original ids at i."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    score_rows: torch.Tensor
    targets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens in the batch."""
        return int(self.input_ids.numel())

    def to(self, device) -> "MNTPBatch":
        """The batch with every tensor moved to `device`."""
        return MNTPBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                         self.max_seqlen, self.score_rows.to(device), self.targets.to(device))


def make_blocks(tokenizer, texts: list[str], block_size: int, batch: int = 1000) -> list[list[int]]:
    """Concatenate the tokenized texts and cut them into blocks of block_size (the last one may be shorter)."""
    stream: list[int] = []
    for start in range(0, len(texts), batch):
        for ids in tokenizer(texts[start:start + batch], add_special_tokens=True)["input_ids"]:
            stream.extend(ids)
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    # A trailing block of one token has no next token to score.
    return [b for b in blocks if len(b) >= 2]


def resolve_mask_token_id(tokenizer, mask_token: str = "") -> int:
    """The configured mask token, the tokenizer's own, or "_" (the reference's choice for Llama-family)."""
    token = mask_token or tokenizer.mask_token or "_"
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"mask token {token!r} is not a single token of this tokenizer; pass mask_token=<a token "
                         f"of its vocabulary> in the config")
    return ids[0]


class MaskingCollator:
    """Packs blocks and masks them. Deterministic for a given torch.Generator."""

    def __init__(self, tokenizer, mlm_probability=0.2, mask_replace_prob=0.8, random_replace_prob=0.1,
                 mask_token=""):
        self.mask_id = resolve_mask_token_id(tokenizer, mask_token)
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob

    def __call__(self, blocks: list[list[int]], generators: list[torch.Generator]) -> MNTPBatch:
        """Pack `blocks` and mask each with its own generator (so a block's masks do not depend on its batch)."""
        lengths = torch.tensor([len(b) for b in blocks])
        original = torch.tensor([t for b in blocks for t in b], dtype=torch.long)
        cu_seqlens = torch.zeros(len(blocks) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])
        selected, roll, random_ids = (torch.cat(parts) for parts in
                                      zip(*(self._draw(len(b), g) for b, g in zip(blocks, generators))))

        selected &= ~torch.isin(original, self.special_ids)
        to_mask = selected & (roll < self.mask_replace_prob)
        to_random = selected & (roll >= self.mask_replace_prob) & \
            (roll < self.mask_replace_prob + self.random_replace_prob)
        masked = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, original))

        # Token i is scored from row i - 1 of the same block: never for the first token of a block.
        scored = selected & (position_ids > 0)
        score_rows = torch.nonzero(scored)[:, 0] - 1
        return MNTPBatch(masked, position_ids, cu_seqlens, int(lengths.max()), score_rows, original[score_rows + 1])

    def _draw(self, n: int, generator: torch.Generator):
        selected = torch.rand(n, generator=generator) < self.mlm_probability
        roll = torch.rand(n, generator=generator)
        random_ids = torch.randint(self.vocab_size, (n,), generator=generator)
        return selected, roll, random_ids


def mntp_loss(decoder, lm_head_weight: torch.Tensor, batch: MNTPBatch) -> torch.Tensor:
    """Mean cross-entropy of the scored tokens; the LM head sees only the gathered rows."""
    hidden = run_packed(decoder, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)  # [T, H]
    return fused_linear_cross_entropy(hidden.index_select(0, batch.score_rows), lm_head_weight, batch.targets)


def reference_mntp_loss(decoder, lm_head_weight: torch.Tensor, batch: MNTPBatch) -> torch.Tensor:
    """The reference's way: full-vocabulary logits for every token, then the shifted cross entropy per block."""
    hidden = run_packed(decoder, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    logits = hidden @ lm_head_weight.T  # [T, V]
    labels = torch.full((batch.num_tokens,), -100, dtype=torch.long, device=logits.device)
    labels[batch.score_rows] = batch.targets
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)


class MNTPStage:
    """MNTP training of a LoRA adapter on the bidirectional decoder; the LM head stays frozen."""

    name = "mntp"

    def __init__(self, config):
        from .data import DataError, read_texts
        from .loop import check_batch_fits, seed_everything
        from .model import add_lora, load_causal_lm

        texts = read_texts(config.data, config.text_field)  # bad data is named (file:line) before the model loads
        seed_everything(config.seed)  # the LoRA initialisation draws from the global RNG
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        causal_lm, self.tokenizer, self.base_dir = load_causal_lm(config)
        causal_lm.to(self.device)
        self.lm_head_weight = causal_lm.get_output_embeddings().weight.detach()
        self.model = add_lora(causal_lm.get_decoder(), config)
        self.collator = MaskingCollator(self.tokenizer, config.mlm_probability, config.mask_replace_prob,
                                        config.random_replace_prob, config.mask_token)
        self.blocks = make_blocks(self.tokenizer, texts, config.block_size)
        if not self.blocks:
            raise DataError(f"{config.data}: too little text for one block of 2 tokens")
        check_batch_fits(len(self.blocks), f"blocks of up to {config.block_size} tokens", config)

    def batch(self, step: int) -> MNTPBatch:
        """The masked, packed batch of step `step` (on the CPU): this rank's blocks, each masked by its own seeded
        generator."""
        from .loop import batch_indices, example_generator

        indices = batch_indices(len(self.blocks), self.config.batch_size, step, self.config.seed)
        return self.collator([self.blocks[i] for i in indices],
                             [example_generator(self.config.seed, step, i) for i in indices])

    def step(self, step: int) -> tuple[float, int]:
        """Forward and backward of step `step`'s MNTP loss, weighted by this rank's share of the scored tokens;
        returns (weighted loss, tokens in the batch)."""
        batch = self.batch(step).to(self.device)
        loss = mntp_loss(self.model, self.lm_head_weight, batch)
        # Under torchrun the loop averages gradients over ranks; weighting each rank's mean by its share of the
        # scored tokens makes that average the mean over the global batch, as on one process.
        share = _scored_share(batch.targets.numel(), self.device)
        (loss * share).backward()
        return float(loss.detach() * share), batch.num_tokens

    def save(self, directory: str) -> None:
        """The released LLM2Vec MNTP layout: base config + adapter + tokenizer (+ llm2vec_config.json), in files
        that llm2vec 0.2.3 loads too."""
        import json
        import os

        from ..reference_files import make_reference_loadable
        from .contrastive import _point_adapter_at

        self.model.save_pretrained(directory)
        _point_adapter_at(directory, self.base_dir)
        config = self.model.get_base_model().config
        config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "llm2vec_config.json"), "w") as f:
            json.dump({"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True},
                      f, indent=4)
        make_reference_loadable(directory, self.tokenizer)


def _scored_share(local_count: int, device) -> float:
    """world x (this rank's scored tokens / all ranks' scored tokens); 1 on a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total = torch.tensor([float(local_count)], dtype=torch.float64)
    dist.all_reduce(total)
    return dist.get_world_size() * local_count / max(float(total), 1.0)
