"""MNTP: the masking collator, the i-1 shift, and the fused loss against full-vocabulary logits."""

import torch
from transformers import AutoTokenizer

from llm2vec_fast.train.mntp import MaskingCollator, make_blocks, mntp_loss, reference_mntp_loss
from tiny_models import corpus


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def test_blocks_cover_the_token_stream(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    texts = corpus(50)
    blocks = make_blocks(tokenizer, texts, 37)
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids]
    assert [t for b in blocks for t in b] == stream[: sum(len(b) for b in blocks)]
    assert all(len(b) == 37 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 37
    assert len(stream) - sum(len(b) for b in blocks) <= 1  # only a lone trailing token can be left out


def test_masking_rates_and_special_tokens(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    blocks = make_blocks(tokenizer, corpus(400), 64)
    collator = MaskingCollator(tokenizer, mlm_probability=0.2, mask_replace_prob=0.8, random_replace_prob=0.1)
    batch = collator(blocks, generators(len(blocks)))
    original = torch.tensor([t for b in blocks for t in b])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert special.any()
    changed = batch.input_ids != original
    assert not changed[special].any(), "special tokens must never be masked"
    scored = torch.zeros_like(original, dtype=torch.bool)
    scored[batch.score_rows + 1] = True
    rate = scored.sum() / (~special).sum()
    assert 0.17 < rate < 0.23
    masked = batch.input_ids[scored] == collator.mask_id
    assert 0.75 < masked.float().mean() < 0.85
    kept = batch.input_ids[scored] == original[scored]
    assert 0.06 < kept.float().mean() < 0.16  # the 10% kept, plus random draws that hit the same id
    assert torch.equal(batch.targets, original[batch.score_rows + 1])


def test_i_minus_one_shift_and_first_positions(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    blocks = make_blocks(tokenizer, corpus(100), 16)
    collator = MaskingCollator(tokenizer, mlm_probability=0.5, mask_replace_prob=1.0, random_replace_prob=0.0)
    batch = collator(blocks, generators(len(blocks)))
    starts = batch.cu_seqlens[:-1].long()
    # A scored token is never the first of a block, and its row is the previous position of the same block.
    assert not torch.isin(batch.score_rows + 1, starts).any()
    assert torch.equal(batch.position_ids[batch.score_rows + 1], batch.position_ids[batch.score_rows] + 1)
    # All-mask variant: every selected (scored or not) token is the mask token.
    assert (batch.input_ids[batch.score_rows + 1] == collator.mask_id).all()


def test_block_masks_do_not_depend_on_batch_mates(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    blocks = make_blocks(tokenizer, corpus(100), 32)[:6]
    collator = MaskingCollator(tokenizer)
    together = collator(blocks, generators(6))
    alone = collator(blocks[3:4], generators(6)[3:4])
    lo, hi = together.cu_seqlens[3], together.cu_seqlens[4]
    assert torch.equal(together.input_ids[lo:hi], alone.input_ids)


def test_fused_loss_equals_full_logits(llama_dir):
    from transformers import AutoModelForCausalLM

    from llm2vec_fast import patch

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = patch(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))
    blocks = make_blocks(tokenizer, corpus(60), 45)[:5]
    batch = MaskingCollator(tokenizer)(blocks, generators(5))
    decoder, weight = model.get_decoder(), model.get_output_embeddings().weight
    losses, grads = [], []
    for fn in (mntp_loss, reference_mntp_loss):
        model.zero_grad()
        loss = fn(decoder, weight, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in decoder.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
