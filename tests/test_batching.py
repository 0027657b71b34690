"""batching.py: rows packed into one sequence or right-padded, pooling ranges, token-budget batches, and the
reference's feature dicts, on hand-made rows (no model)."""

import pytest
import torch

from llm2vec_fast.batching import (check_positive_int, pack, pad, pooling_range, reference_features,
                                   rows_of_features, token_budget_batches)
from llm2vec_fast.tokenization import TokenizedRow

# Three rows: an instruction of 2 tokens then a text of 3; a bare text of 1 token; an empty text after 2 tokens.
ROWS = [TokenizedRow([1, 11, 12, 21, 22, 23], 3, 6), TokenizedRow([7], 0, 1), TokenizedRow([1, 11], 2, 2)]


def test_pack_concatenates_rows_with_restarting_positions():
    batch = pack(ROWS, [(r.text_start, r.text_end) for r in ROWS])
    assert batch.input_ids.tolist() == [1, 11, 12, 21, 22, 23, 7, 1, 11]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 6, 7, 9] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 6 and batch.num_tokens == 9
    assert batch.pool_starts.tolist() == [3, 6, 9] and batch.pool_ends.tolist() == [6, 7, 9]


def test_pad_right_pads_and_offsets_pooling_into_the_flattened_rows():
    batch = pad(ROWS, [(0, len(r)) for r in ROWS], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 11, 12, 21, 22, 23], [7, 0, 0, 0, 0, 0], [1, 11, 0, 0, 0, 0]]
    assert batch.attention_mask.sum(-1).tolist() == [6, 1, 2] and batch.num_tokens == 9
    assert batch.pool_starts.tolist() == [0, 6, 12] and batch.pool_ends.tolist() == [6, 7, 14]


@pytest.mark.parametrize("mode, skip, expected", [
    ("mean", True, [(3, 6), (0, 1), (0, 2)]),  # an empty text pools what the model saw, never nothing
    ("mean", False, [(0, 6), (0, 1), (0, 2)]),
    ("weighted_mean", True, [(3, 6), (0, 1), (0, 2)]),
    ("last_token", True, [(0, 6), (0, 1), (0, 2)]),
    ("eos_token", True, [(0, 6), (0, 1), (0, 2)]),
])
def test_pooling_ranges(mode, skip, expected):
    assert [pooling_range(r, mode, skip) for r in ROWS] == expected


def test_bos_pooling_needs_the_bos_at_the_start_of_every_row():
    assert pooling_range(ROWS[0], "bos_token", True, bos_token_id=1) == (0, 6)
    with pytest.raises(ValueError, match="bos_token pooling needs every row to start with the BOS"):
        pooling_range(ROWS[1], "bos_token", True, bos_token_id=1)
    with pytest.raises(ValueError, match="does not add one"):
        pooling_range(ROWS[0], "bos_token", True, bos_token_id=None)


@pytest.mark.parametrize("budget, size, expected", [
    (6, None, [[0], [2, 1]]),  # longest first; a row at the budget fills a batch
    (8, None, [[0, 2], [1]]),
    (100, None, [[0, 2, 1]]),
    (100, 2, [[0, 2], [1]]),
    (3, None, [[0], [2, 1]]),  # a row over the budget gets a batch of its own
])
def test_token_budget_batches_cover_every_row_once(budget, size, expected):
    batches = token_budget_batches([len(r) for r in ROWS], budget, size)
    assert batches == expected
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2]


def test_equal_lengths_keep_their_input_order():
    assert token_budget_batches([2, 3, 2, 3, 2], 100) == [[1, 3, 0, 2, 4]]


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_budgets_must_be_positive_ints(value, error):
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        token_budget_batches([1], value)
    with pytest.raises(error, match="pass e.g. batch_size=64"):
        check_positive_int("batch_size", value)


def test_reference_features_are_left_padded_and_read_back_to_the_same_rows():
    features = reference_features(ROWS, pad_token_id=0)
    assert features["input_ids"].tolist() == [[1, 11, 12, 21, 22, 23], [0, 0, 0, 0, 0, 7], [0, 0, 0, 0, 1, 11]]
    assert features["attention_mask"].sum(-1).tolist() == [6, 1, 2]
    assert features["embed_mask"].tolist()[0] == [0, 0, 0, 1, 1, 1]
    assert rows_of_features(features) == [ROWS[0], ROWS[1], TokenizedRow([1, 11], 0, 0)]  # an empty span: (0, 0)
    no_text = rows_of_features({k: v for k, v in features.items() if k != "embed_mask"})
    assert [(r.input_ids, r.text_start, r.text_end) for r in no_text] == [(r.input_ids, 0, 0) for r in ROWS]


def test_round_up_tokens_adds_a_filler_sequence_that_nothing_pools():
    from llm2vec_fast.batching import pack, round_up_tokens
    from llm2vec_fast.tokenization import TokenizedRow

    rows = [TokenizedRow(list(range(5, 5 + n)), 0, n) for n in (7, 3, 50)]
    batch = pack(rows, [(0, len(r)) for r in rows])
    rounded = round_up_tokens(batch, 64, pad_id=0)
    assert rounded.num_tokens == 64 and batch.num_tokens == 60
    assert rounded.cu_seqlens.tolist() == batch.cu_seqlens.tolist() + [64]
    assert rounded.input_ids[:60].tolist() == batch.input_ids.tolist() and rounded.input_ids[60:].tolist() == [0] * 4
    assert rounded.position_ids[60:].tolist() == [0, 1, 2, 3] and rounded.max_seqlen == 50
    assert torch.equal(rounded.pool_starts, batch.pool_starts) and torch.equal(rounded.pool_ends, batch.pool_ends)
    assert round_up_tokens(rounded, 64, pad_id=0) is rounded  # already a multiple: unchanged
