"""LLM2Vec API on tiny random models of every supported family."""

import json
import os
import random

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llm2vec_fast import LLM2Vec
from tiny_models import WORDS

TEXTS = ["the cat sat on the mat", ["find the animal:", "the big dog ran quickly to the river"], "sun",
         "a small red boat on the sea and a green train in the mountain city", ["q:", "coffee"]]


def load(directory, **kw):
    kw.setdefault("dtype", torch.float32)
    return LLM2Vec.from_pretrained(directory, **kw)


def encode(model, texts, **kw):
    return model.encode(texts, show_progress_bar=False, **kw)


def reference_rows(tokenizer, pairs):
    """(ids, number of text tokens) per pair, computed the llm2vec reference's way."""
    out = []
    for instruction, text in pairs:
        joined = f"{instruction.strip()} {text}" if instruction else text
        ids = tokenizer(joined)["input_ids"]
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append((ids, n))
    return out


def hand_embeddings(directory, pairs, mode, bidirectional=True):
    """Plain transformers, one text at a time with an explicit mask, pooled by hand."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    hf = AutoModel.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)
    result = []
    for ids, n in reference_rows(tokenizer, pairs):
        length = len(ids)
        mask = torch.ones(length, length, dtype=torch.bool)
        if not bidirectional:
            mask = mask.tril()
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([ids]), attention_mask=mask[None, None]).last_hidden_state[0].double()
        text = h[length - n:]
        if mode == "mean":
            result.append(text.mean(0))
        elif mode == "weighted_mean":
            w = torch.arange(1, n + 1, dtype=torch.float64)
            result.append((text * (w / w.sum())[:, None]).sum(0))
        elif mode in ("eos_token", "last_token"):
            result.append(h[-1])
        elif mode == "bos_token":
            result.append(h[0])
    return torch.stack(result).float()


PAIRS = [("", "the cat sat on the mat"), ("find the animal:", "the big dog ran quickly"), ("", "sun"),
         ("retrieve a song:", "happy music and a sad film")]


@pytest.mark.parametrize("engine", ["packed", "padded"])
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token", "bos_token"])
def test_pooling_modes_match_hand_computation(llama_dir, mode, engine):
    model = load(llama_dir, pooling_mode=mode, engine=engine)
    ours = encode(model, [list(p) for p in PAIRS])
    expected = hand_embeddings(llama_dir, PAIRS, mode)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_causal_mean_matches_hand_computation(llama_dir):
    model = load(llama_dir, enable_bidirectional=False)
    torch.testing.assert_close(encode(model, [list(p) for p in PAIRS]),
                               hand_embeddings(llama_dir, PAIRS, "mean", bidirectional=False), atol=2e-5, rtol=1e-4)


def test_eos_token_pooling_appends_eos_text(llama_dir):
    model = load(llama_dir, pooling_mode="eos_token")
    row = model.row_tokenizer.tokenize_pairs([("", "the cat")])[0][0]
    assert row.input_ids[-1] == model.tokenizer.eos_token_id
    assert torch.isfinite(encode(model, ["the cat"])).all()


def test_instruction_is_attended_but_not_pooled(llama_dir):
    model = load(llama_dir)
    plain, instructed, other = encode(model, [["", "the cat sat"], ["find the animal:", "the cat sat"],
                                              ["find the song:", "the cat sat"]])
    # Attended: the instruction changes the text's hidden states ...
    assert (instructed - plain).abs().max() > 1e-3
    assert (instructed - other).abs().max() > 1e-3
    # ... but is not pooled: skip_instruction=False pools it too and gives something else again.
    with_instruction = encode(load(llama_dir, skip_instruction=False), [["find the animal:", "the cat sat"]])[0]
    assert (with_instruction - instructed).abs().max() > 1e-3


def test_batch_composition_invariance(llama_dir):
    model = load(llama_dir)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(23)]
    alone = torch.stack([encode(model, [t])[0] for t in texts])
    for budget in (16, 64, 300, 100000):
        order = list(range(len(texts)))
        rng.shuffle(order)
        shuffled = encode(model, [texts[i] for i in order], max_batch_tokens=budget)
        restored = torch.empty_like(shuffled)
        restored[torch.tensor(order)] = shuffled
        assert (restored - alone).abs().max() < 1e-5, budget
    assert (encode(model, texts, batch_size=3) - alone).abs().max() < 1e-5


def test_results_keep_input_order(llama_dir):
    model = load(llama_dir)
    texts = ["a", "the big dog ran quickly to the river and the sea", "sun", "the cat sat"]
    together = encode(model, texts, max_batch_tokens=12)
    for i, text in enumerate(texts):
        torch.testing.assert_close(together[i], encode(model, [text])[0], atol=1e-5, rtol=0)


def test_output_forms(llama_dir):
    model = load(llama_dir)
    single = encode(model, "the cat sat")
    assert single.shape == (model.config.hidden_size,) and single.dtype == torch.float32
    array = encode(model, ["the cat", "a dog"], convert_to_numpy=True)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (2, 64)
    tensor = encode(model, ["the cat"], convert_to_tensor=True, convert_to_numpy=True)
    assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
    normalized = encode(model, ["the cat", "a dog"], normalize_embeddings=True)
    torch.testing.assert_close(normalized.norm(dim=-1), torch.ones(2))
    assert encode(model, []).shape == (0, 64)


def test_empty_text_pools_what_the_model_saw(llama_dir):
    model = load(llama_dir)
    with pytest.warns(UserWarning, match="empty text"):
        got = encode(model, [["find the animal:", ""], ""])
    assert torch.isfinite(got).all()
    # Defined as the mean over the row's tokens (BOS + instruction): the skip_instruction=False embedding.
    whole = encode(load(llama_dir, skip_instruction=False), [["find the animal:", ""], ""])
    torch.testing.assert_close(got, whole)


def test_bos_pooling_errors_without_bos(tiny_model_dirs):
    model = load(tiny_model_dirs["qwen2"], pooling_mode="bos_token")
    with pytest.raises(ValueError, match="BOS"):
        encode(model, ["the cat"])


def test_bos_pooling_with_two_bos_uses_the_first(llama_dir):
    from test_modeling import first_token_hidden

    model = load(llama_dir, pooling_mode="bos_token")
    got = encode(model, ["<s> the cat <s>"])
    assert torch.isfinite(got).all()
    ids = model.row_tokenizer.tokenize_pairs([("", "<s> the cat <s>")])[0][0].input_ids
    assert ids.count(model.tokenizer.bos_token_id) == 3
    hidden = first_token_hidden(model, ids, "packed")
    torch.testing.assert_close(got[0], hidden, atol=1e-5, rtol=0)


def test_tokenizer_with_token_type_ids(llama_dir):
    model = load(llama_dir)
    expected = encode(model, TEXTS)
    model.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    torch.testing.assert_close(encode(model, TEXTS), expected)
    features = model.tokenize(["!@#$%^&*()the cat"])
    features["token_type_ids"] = torch.zeros_like(features["input_ids"])
    assert torch.isfinite(model(features)).all()


def test_forward_is_differentiable_and_matches_encode(llama_dir):
    model = load(llama_dir)
    prepared = ["!@#$%^&*()the cat sat", "find the animal: !@#$%^&*()the big dog", "!@#$%^&*()sun"]
    features = model.tokenize(prepared)
    assert features["input_ids"][2, 0] == model.tokenizer.pad_token_id  # left padding, as the reference
    embeddings = model(features)
    embeddings.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    expected = encode(model, ["the cat sat", ["find the animal:", "the big dog"], "sun"])
    torch.testing.assert_close(embeddings.detach(), expected, atol=1e-5, rtol=1e-5)


def make_adapter(base_dir, out_dir, seed=0, hidden_size=None):
    from peft import LoraConfig, get_peft_model

    model = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    if hidden_size is not None:
        from tiny_models import tiny_config

        model = AutoModel.from_config(tiny_config("llama", model.config.vocab_size, hidden_size=hidden_size))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # LoRA B starts at zero: make the adapter actually change the model
    peft_model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base_dir
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def test_bad_encoder_arguments(llama_dir):
    with pytest.raises(ValueError, match="unknown pooling_mode 'cls'.*mean"):
        load(llama_dir, pooling_mode="cls")
    model = load(llama_dir)
    with pytest.raises(ValueError, match="batch_size"):
        encode(model, ["a"], batch_size=0)
    with pytest.raises(TypeError, match="input 1 is None"):
        encode(model, ["a", None])


def test_bf16_cpu_encode_rounds_batches_and_keeps_the_embeddings(llama_dir, monkeypatch):
    """bf16 GEMMs on CPU: every packed batch reaches the model as a multiple of ROUND_TOKENS tokens, and the
    embeddings match an encode of the same batches without the filler to bf16 accuracy."""
    from llm2vec_fast import encoder as encoder_module
    from llm2vec_fast.encoder import ROUND_TOKENS

    model = LLM2Vec.from_pretrained(llama_dir, dtype=torch.bfloat16)
    texts = [" ".join(WORDS[i:i + 3 + i % 7]) for i in range(12)]
    seen = []
    original = model.hidden_states

    def spy(batch):
        seen.append(batch.num_tokens)
        return original(batch)

    monkeypatch.setattr(model, "hidden_states", spy)
    rounded = model.encode(texts, convert_to_tensor=True)
    assert seen and all(n % ROUND_TOKENS == 0 for n in seen)
    monkeypatch.setattr(encoder_module, "round_up_tokens", lambda batch, multiple, pad_id: batch)
    seen.clear()
    plain = model.encode(texts, convert_to_tensor=True)
    assert not all(n % ROUND_TOKENS == 0 for n in seen)
    cosine = torch.nn.functional.cosine_similarity(rounded.float(), plain.float(), dim=-1)
    assert cosine.min() > 0.999
