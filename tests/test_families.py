"""The families beyond the four of tiny_models.FAMILIES (Qwen3, Gemma 2, Gemma 3 text, Phi-3, and Llama with Llama 3's
rope scaling), each against its own Hugging Face eager forward: causal for all, bidirectional where the family's
embedders are (Qwen3, Gemma 2, Gemma 3), with texts longer than the sliding windows; the packed engine with the C++
ops on and off, float32 and bfloat16; packed against padded for causal pooling; training and the encode job."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from llm2vec_fast import LLM2Vec, native
from llm2vec_fast.cli import main
from llm2vec_fast.cpu_runtime import native_cpu_ops
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.modeling import FAMILIES, check_supported, kernel_window
from llm2vec_fast.testing import TEST_WINDOW
from tiny_models import NEW_FAMILIES, build_model_dir, corpus

BIDIRECTIONAL = ("qwen3", "gemma2", "gemma3_text", "phi3", "llama3")
# (Mistral: its sliding window (4 in the tiny model) now bounds its causal runs, as in Hugging Face's.)
CASES = [(family, "causal") for family in NEW_FAMILIES + ("mistral",)] + \
    [(family, "bidirectional") for family in BIDIRECTIONAL]
# Lengths from 2 to ~40 tokens: most texts are longer than the windows (8), a few shorter.
TEXTS = ["sun", "the cat sat on the mat", *corpus(4, seed=5, min_words=14, max_words=22),
         ["find the animal:", "the big dog ran quickly to the river and the small red boat on the sea"]]
POOLING = {"causal": "last_token", "bidirectional": "mean"}


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("new_families")
    return {**tiny_model_dirs, **{family: build_model_dir(str(root / family), family) for family in NEW_FAMILIES}}


def hf_eager(directory, mode, dtype=torch.float32):
    """The family's own Hugging Face model with eager attention, in `mode` the way the family does it: Gemma 3
    through use_bidirectional_attention (its own window overlay), the others through transformers' is_causal=False
    (transformers >= 5.2); causal as loaded."""
    model = AutoModel.from_pretrained(directory, attn_implementation="eager", dtype=dtype).eval()
    if mode == "bidirectional":
        if model.config.model_type == "gemma3_text":
            model.config.use_bidirectional_attention = True
        else:
            model.config.is_causal = False
            for module in model.modules():
                if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
                    module.is_causal = False
    return model


def hf_embeddings(model, encoder, texts):
    """Pooled hidden states of the eager `model` for `texts`, tokenized and pooled as `encoder` does: causal texts
    in one left-padded batch (as Qwen3-Embedding is run), bidirectional texts one at a time."""
    rows = encoder.tokenize_inputs(texts)
    ranges = encoder._ranges(rows)
    out = []
    with torch.no_grad():
        config = model.config
        if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
            hidden = [model(input_ids=torch.tensor([row.input_ids])).last_hidden_state[0] for row in rows]
        else:
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), encoder.tokenizer.pad_token_id)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for b, row in enumerate(rows):
                ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row.input_ids), 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            hidden = [batch[b, width - len(row):] for b, row in enumerate(rows)]
        last = encoder.pooling_mode in ("last_token", "eos_token")
        for h, (start, end) in zip(hidden, ranges):
            out.append(h[end - 1].float() if last else h[start:end].float().mean(0))
    return torch.stack(out)


def load(directory, mode, **kw):
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("pooling_mode", POOLING[mode])
    return LLM2Vec.from_pretrained(directory, enable_bidirectional=mode == "bidirectional", **kw)


_TRUTH: dict = {}


def eager_truth(directory, mode, dtype=torch.float32):
    """hf_embeddings of TEXTS by the eager model in `dtype` (computed once per module run)."""
    key = (directory, mode, dtype)
    if key not in _TRUTH:
        _TRUTH[key] = hf_embeddings(hf_eager(directory, mode, dtype), load(directory, mode), TEXTS)
    return _TRUTH[key]


def cosine_gap(a, b) -> float:
    return float((1 - torch.nn.functional.cosine_similarity(a.double(), b.double())).max())


@pytest.mark.parametrize("native_ops", [True, False], ids=["cpp", "pytorch"])
@pytest.mark.parametrize("family, mode", CASES)
def test_float32_matches_hugging_face_eager(family_dirs, set_env, family, mode, native_ops):
    if native_ops and native.load() is None:
        pytest.skip("the C++ ops cannot be built here")
    if not native_ops:
        set_env(LLM2VEC_FAST_NATIVE="0")
    encoder = load(family_dirs[family], mode)
    ours = encoder.encode(TEXTS, show_progress_bar=False)
    assert bool(native_cpu_ops(encoder.model)) == native_ops
    torch.testing.assert_close(ours, eager_truth(family_dirs[family], mode), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, mode", CASES)
def test_bfloat16_within_twice_hugging_face_bfloat16_error(family_dirs, family, mode):
    """bf16 (the C++ ops where they build, else the PyTorch path): our error to the float32 eager truth is at most
    twice that of the family's own bf16 eager forward."""
    encoder = load(family_dirs[family], mode, dtype=torch.bfloat16)
    ours = encoder.encode(TEXTS, show_progress_bar=False)
    truth = eager_truth(family_dirs[family], mode)
    plain = eager_truth(family_dirs[family], mode, torch.bfloat16)
    assert cosine_gap(ours, truth) <= 2 * cosine_gap(plain, truth) + 1e-4


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_mixed_mode_with_qk_norms(family_dirs, family):
    """dtype="mixed" (bf16 GEMMs of a float32 model): the attention block norms the bf16 q / k in float32 against
    the float32 weights; within twice the error of the family's own bf16 eager forward."""
    encoder = load(family_dirs[family], "bidirectional", dtype="mixed")
    ours = encoder.encode(TEXTS, show_progress_bar=False)
    truth = eager_truth(family_dirs[family], "bidirectional")
    plain = eager_truth(family_dirs[family], "bidirectional", torch.bfloat16)
    assert cosine_gap(ours, truth) <= 2 * cosine_gap(plain, truth) + 1e-4


@pytest.mark.parametrize("family, mode",
                         [(f, "bidirectional" if f in BIDIRECTIONAL else "causal") for f in NEW_FAMILIES])
def test_the_features_matter_at_these_lengths(family_dirs, family, mode):
    """The parity above means something: the window, softcap, q/k norms, llama3 rope scaling and partial rotary
    each change the eager embeddings of TEXTS (a feature that changed nothing would pass parity while broken)."""
    directory = family_dirs[family]
    encoder = load(directory, mode)
    reference = eager_truth(directory, mode)
    variants = []
    model = hf_eager(directory, mode)
    if family in ("qwen3", "gemma2", "gemma3_text"):
        window = hf_eager(directory, mode)
        for layer in window.layers:
            layer.self_attn.sliding_window = None
        window.config.sliding_window = 10_000
        variants.append(("sliding window", window))
    if family == "gemma2":
        model.config.attn_logit_softcapping = None
        for layer in model.layers:
            layer.self_attn.attn_logit_softcapping = None
        variants.append(("softcap", model))
    if family in ("qwen3", "gemma3_text"):
        for layer in model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
        variants.append(("q norm", model))
    if family == "llama3":
        variants.append(("llama3 rope scaling", AutoModel.from_pretrained(
            directory, attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    if family == "phi3":
        variants.append(("partial rotary", AutoModel.from_pretrained(
            directory, attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                      "partial_rotary_factor": 1.0})))
    for what, variant in variants:
        assert (hf_embeddings(variant, encoder, TEXTS) - reference).abs().max() > 1e-3, what
    # The attention windows the kernels get, in the family's meaning for the mode (see modeling.Family).
    family_entry = FAMILIES[encoder.config.model_type]
    if family in ("qwen3", "gemma2"):
        assert kernel_window(family_entry, TEST_WINDOW, causal=mode == "causal") == \
            TEST_WINDOW + (mode == "bidirectional")
    if family == "gemma3_text":
        assert kernel_window(family_entry, TEST_WINDOW, causal=mode == "causal") == TEST_WINDOW


@pytest.mark.parametrize("family, pooling_mode", [("qwen3", "last_token"), ("gemma2", "eos_token"),
                                                   ("phi3", "last_token")])
def test_causal_packed_equals_padded_either_padding_side(family_dirs, family, pooling_mode):
    """Last-token and EOS pooling of a causal model: packed == padded, and the reference's left-padded features
    give what right-padded ones give."""
    packed = load(family_dirs[family], "causal", pooling_mode=pooling_mode)
    padded = load(family_dirs[family], "causal", pooling_mode=pooling_mode, engine="padded")
    assert packed._resolved_engine() == "packed"
    expected = padded.encode(TEXTS, show_progress_bar=False)
    torch.testing.assert_close(packed.encode(TEXTS, show_progress_bar=False), expected, atol=1e-5, rtol=1e-5)
    prepared = [packed.prepare_for_tokenization(f"!@#$%^&*(){text}") for text in TEXTS if isinstance(text, str)]
    left = packed.tokenize(prepared)
    right = {name: _right_padded(value, left["attention_mask"]) for name, value in left.items()}
    with torch.no_grad():
        for encoder in (packed, padded):
            torch.testing.assert_close(encoder(left), encoder(right), atol=1e-5, rtol=1e-5)


def _right_padded(value, mask):
    """A left-padded [B, S] feature moved to right padding (pads where the mask is 0, filled with 0)."""
    out = torch.zeros_like(value)
    for b in range(value.shape[0]):
        kept = value[b][mask[b].bool()]
        out[b, : len(kept)] = kept
    return out


def test_gemma3_bidirectional_window_is_exclusive_and_symmetric(family_dirs):
    """Gemma 3's own bidirectional overlay: query i sees key j iff |i - j| < sliding_window (probed on the sliding
    layer alone, packed, through our attention)."""
    encoder = load(family_dirs["gemma3_text"], "bidirectional")
    decoder = encoder.model
    decoder.layers = decoder.layers[:1]  # the sliding layer: every key a query sees is within its window
    decoder.config.num_hidden_layers = 1
    ids = torch.tensor(encoder.tokenizer(" ".join(["the"] * 30))["input_ids"][:20])
    from llm2vec_fast.modeling import run_packed

    def hidden(x):
        cu = torch.tensor([0, len(x)], dtype=torch.int32)
        with torch.no_grad():
            return run_packed(decoder, x, torch.arange(len(x)), cu, len(x))
    base = hidden(ids)
    seen = []
    for j in range(len(ids)):
        changed = ids.clone()
        changed[j] = (changed[j] + 11) % len(encoder.tokenizer)
        if (hidden(changed)[10] - base[10]).abs().max() > 1e-6:
            seen.append(j - 10)
    assert seen == list(range(-(TEST_WINDOW - 1), TEST_WINDOW))


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("stage_name", ["mntp", "simcse"])
def test_one_training_step(family_dirs, tmp_path, family, stage_name):
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.loop import train
    from llm2vec_fast.train.mntp import MNTPStage
    from llm2vec_fast.train.simcse import SimCSEStage

    data = tmp_path / "text.txt"
    data.write_text("\n".join(corpus(40, seed=11, min_words=10, max_words=20)) + "\n")
    extra = dict(batch_size=4, block_size=32) if stage_name == "mntp" else dict(batch_size=4)
    config = TrainConfig.for_stage(stage_name, model=family_dirs[family], data=str(data), output=str(tmp_path / "out"),
                                   dtype="float32", steps=1, save_steps=1, learning_rate=1e-3,
                                   gradient_checkpointing=False, **extra)
    losses = train((MNTPStage if stage_name == "mntp" else SimCSEStage)(config), config, show_progress=False)
    assert len(losses) == 1 and np.isfinite(losses[0])
    # The saved run loads back as an encoder of the family (SimCSE's adapter on top of the base).
    out = str(tmp_path / "out")
    encoder = LLM2Vec.from_pretrained(out) if stage_name == "mntp" else \
        LLM2Vec.from_pretrained(family_dirs[family], peft_model_name_or_path=out)
    assert torch.isfinite(encoder.encode(["a text"], show_progress_bar=False)).all()


def test_encode_job_on_qwen3(family_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path / "cache"))
    texts = corpus(12, seed=4, min_words=8, max_words=20)
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    assert main(["encode", "--model", family_dirs["qwen3"], "--input", str(source), "--output", str(out),
                 "--no-progress"]) == 0
    embeddings, lines = load_embeddings(str(out))
    expected = LLM2Vec.from_pretrained(family_dirs["qwen3"], dtype=torch.float32).encode(texts, show_progress_bar=False)
    np.testing.assert_allclose(embeddings[np.argsort(lines)], expected.numpy(), atol=1e-5, rtol=1e-5)


def test_unlisted_families_are_refused_with_the_reason():
    from types import SimpleNamespace

    for model_type in NEW_FAMILIES:
        check_supported(SimpleNamespace(model_type="llama" if model_type == "llama3" else model_type))
    with pytest.raises(ValueError, match="'gemma3'.*text model.*gemma3_text"):
        check_supported(SimpleNamespace(model_type="gemma3"))
    with pytest.raises(ValueError, match="'falcon'.*does not go through transformers' AttentionInterface"):
        check_supported(SimpleNamespace(model_type="falcon"))
    with pytest.raises(ValueError, match="'olmo2'.*AttentionInterface, but the family is not on .*tested list"):
        check_supported(SimpleNamespace(model_type="olmo2"))
    with pytest.raises(ValueError, match="'no-such-model'.*no decoder model of that type"):
        check_supported(SimpleNamespace(model_type="no-such-model"))


def test_gemma3_checkpoint_that_says_is_causal_false(tmp_path):
    """A Gemma 3 config that itself says is_causal: false (as exported and some sentence-transformers directories
    do) gets transformers' generic bidirectional sliding mask (|i - j| <= W) rather than Gemma 3's own overlay
    (|i - j| < W): the encoder follows what the checkpoint's eager forward computes."""
    directory = build_model_dir(str(tmp_path / "gemma3"), "gemma3_text", is_causal=False,
                                use_bidirectional_attention=True)
    eager = AutoModel.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    encoder = LLM2Vec.from_pretrained(directory, dtype=torch.float32, pooling_mode="mean")
    expected = hf_embeddings(eager, encoder, TEXTS)
    for engine in ("packed", "padded"):
        encoder.engine = engine
        got = encoder.encode(TEXTS, show_progress_bar=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
