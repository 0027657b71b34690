"""Matryoshka truncation and storage precisions (llm2vec_fast/quantization.py) against sentence-transformers'
quantize_embeddings, and LLM2Vec.encode(truncate_dim=..., precision=..., ranges=...) on the tiny random Llama."""

import numpy as np
import pytest
import torch
from sentence_transformers.util import quantize_embeddings

from llm2vec_fast import quantization as q
from llm2vec_fast.choices import PRECISIONS
from tiny_models import corpus

ST_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def sample(rows, dim=70, seed=0):
    # Odd width (70: not a multiple of 8) so binary packing pads its last byte; some exact zeros (0 > 0 is False).
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    values[::7, ::5] = 0.0
    return values


@pytest.mark.parametrize("precision", ST_PRECISIONS)
def test_quantize_equals_sentence_transformers_with_the_same_ranges(precision):
    embeddings, ranges = sample(60, seed=1), q.calibration_ranges(sample(40, seed=2))  # some values out of range
    ours = q.quantize(embeddings, precision, ranges if precision in q.SCALAR else None)
    theirs = quantize_embeddings(embeddings, precision, ranges=ranges)
    assert ours.dtype == theirs.dtype == q.stored_dtype(precision)
    assert ours.shape == theirs.shape == (60, q.stored_width(70, precision))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("precision", q.SCALAR)
def test_calibration_equals_sentence_transformers(precision):
    embeddings, calibration = sample(60, seed=3), sample(200, seed=4)
    np.testing.assert_array_equal(q.quantize(embeddings, precision, q.calibration_ranges(calibration)),
                                  quantize_embeddings(embeddings, precision, calibration_embeddings=calibration))
    # Without ranges, as sentence-transformers: the embeddings calibrate themselves.
    np.testing.assert_array_equal(q.quantize(embeddings, precision), quantize_embeddings(embeddings, precision))


def test_float16_and_tensors():
    embeddings = sample(10)
    assert q.quantize(embeddings, "float16").dtype == np.float16
    np.testing.assert_array_equal(q.quantize(embeddings, "float16"), embeddings.astype(np.float16))
    ranges = q.calibration_ranges(embeddings)
    for precision in PRECISIONS:
        out = q.quantize(torch.from_numpy(embeddings), precision, ranges if precision in q.SCALAR else None)
        assert isinstance(out, torch.Tensor)
        np.testing.assert_array_equal(out.numpy(), q.quantize(embeddings, precision,
                                                              ranges if precision in q.SCALAR else None))


def test_a_constant_dimension_gets_step_one_as_in_sentence_transformers():
    embeddings = sample(20)
    embeddings[:, 3] = 0.25
    np.testing.assert_array_equal(q.quantize(embeddings, "uint8"), quantize_embeddings(embeddings, "uint8"))


def test_truncate_then_normalize_then_quantize():
    embeddings = torch.from_numpy(sample(30, dim=64))
    ranges = q.calibration_ranges(torch.nn.functional.normalize(embeddings[:, :16], dim=-1))
    out = q.finish(embeddings, truncate_dim=16, normalize=True, precision="int8", ranges=ranges)
    expected = quantize_embeddings(torch.nn.functional.normalize(embeddings[:, :16], dim=-1).numpy(), "int8",
                                   ranges=ranges)
    np.testing.assert_array_equal(out.numpy(), expected)
    floats = q.finish(embeddings, truncate_dim=16, normalize=True)
    torch.testing.assert_close(floats.norm(dim=-1), torch.ones(30), rtol=0, atol=1e-6)  # normalized after the cut
    assert q.normalize_where(True, None) == (True, False) and q.normalize_where(True, 16) == (False, True)
    assert torch.equal(q.finish(embeddings), embeddings)


def test_an_empty_shard_keeps_its_stored_width():
    ranges = q.calibration_ranges(sample(5))
    for precision in PRECISIONS:
        out = q.quantize(np.zeros((0, 70), np.float32), precision, ranges if precision in q.SCALAR else None)
        assert out.shape == (0, q.stored_width(70, precision)) and out.dtype == q.stored_dtype(precision)


@pytest.mark.parametrize("value", [0, 65, -1, 2.0, True, "8"])
def test_truncate_dim_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="truncate_dim must be an integer from 1 to the model's embedding "
                                         "dimension 64"):
        q.check_truncate_dim(value, 64)


def test_bad_ranges_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"ranges must have shape \[2, 70\]"):
        q.quantize(sample(5), "int8", np.zeros((2, 64), np.float32))
    upside_down = q.calibration_ranges(sample(5))[::-1]
    with pytest.raises(ValueError, match="dimension 0 has minimum"):
        q.quantize(sample(5), "int8", upside_down)
    nan = sample(5)
    nan[2, 3] = np.nan
    for precision in ("int8", "binary"):
        with pytest.raises(ValueError, match=r"NaN or inf \(in 1 row\(s\), the first row 2\)"):
            q.quantize(nan, precision, q.calibration_ranges(sample(5)) if precision == "int8" else None)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        q.quantize(sample(1), "uint8")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        q.quantize(sample(2), "int4")
    with pytest.raises(ValueError, match="ranges apply to int8/uint8 only"):
        q.check_options(None, "binary", q.calibration_ranges(sample(5)), 70)


def test_the_older_dtype_option_and_precision_have_one_owner():
    names = ("--precision", "--shard-dtype")
    assert q.resolve_precision(None, None, names) == "float32"
    assert q.resolve_precision(None, "float16", names) == "float16"
    assert q.resolve_precision("binary", None, names) == "binary"
    assert q.resolve_precision("float16", "float16", names) == "float16"
    with pytest.raises(ValueError, match="--shard-dtype float16 and --precision int8 contradict each other"):
        q.resolve_precision("int8", "float16", names)


def test_bytes_per_vector():
    assert [q.bytes_per_vector(576, p) for p in PRECISIONS] == [2304, 1152, 576, 576, 72, 72]
    assert q.bytes_per_vector(70, "binary") == 9


# ------------------------------------------------------------------------------------------ LLM2Vec.encode

@pytest.fixture(scope="module")
def encoder(llama_dir):
    from llm2vec_fast import LLM2Vec

    return LLM2Vec.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def texts():
    return corpus(12, seed=3)


def test_encode_options_equal_sentence_transformers_order(encoder, texts):
    full = encoder.encode(texts, show_progress_bar=False)
    cut = torch.nn.functional.normalize(full[:, :16], dim=-1)
    truncated = encoder.encode(texts, show_progress_bar=False, truncate_dim=16, normalize_embeddings=True)
    torch.testing.assert_close(truncated, cut, rtol=0, atol=0)
    ranges = q.calibration_ranges(cut[:6])
    for precision in ST_PRECISIONS:
        kwargs = {"ranges": ranges} if precision in q.SCALAR else {}
        out = encoder.encode(texts, show_progress_bar=False, truncate_dim=16, normalize_embeddings=True,
                             precision=precision, convert_to_numpy=True, **kwargs)
        np.testing.assert_array_equal(out, quantize_embeddings(cut.numpy(), precision, **kwargs))
    tensor = encoder.encode(texts, show_progress_bar=False, precision="binary")
    assert tensor.dtype == torch.int8 and tensor.shape == (12, encoder.embedding_dim // 8)
    # int8 without ranges: this call's own embeddings calibrate, as sentence-transformers does.
    np.testing.assert_array_equal(encoder.encode(texts, show_progress_bar=False, precision="uint8").numpy(),
                                  quantize_embeddings(full.numpy(), "uint8"))
    single = encoder.encode(texts[0], show_progress_bar=False, precision="float16", truncate_dim=8)
    assert single.dtype == torch.float16 and single.shape == (8,)


def test_encode_refuses_bad_storage_options_before_encoding(encoder, texts):
    with pytest.raises(ValueError, match="truncate_dim must be an integer from 1"):
        encoder.encode(texts, truncate_dim=encoder.embedding_dim + 1)
    with pytest.raises(ValueError, match=r"ranges must have shape \[2, 16\]"):
        encoder.encode(texts, truncate_dim=16, precision="int8", ranges=np.zeros((2, 64)))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        encoder.encode(texts[0], precision="int8", show_progress_bar=False)
