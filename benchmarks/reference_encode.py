"""A faithful re-implementation of the llm2vec 0.2.3 encode algorithm, run on any (patched) HF model.

What it keeps from the reference, because that is what costs time: each text tokenized once to count its tokens
for doc_max_length, sorting by character length, left-padded batches of `batch_size` texts, the whole batch
tokenized again plus a third tokenizer call per text to build the embed mask, default position ids (0..S-1,
shifted by the left padding), a dense [B, 1, S, S] bidirectional mask, and a Python loop for pooling. Used only by
the benchmarks, as the "reference" side measured in the same process as our engine.
"""

from __future__ import annotations

import numpy as np
import torch

from llm2vec_fast.prompts import SEPARATOR, apply_template


def convert_to_str(tokenizer, instruction, text, max_length, doc_max_length):
    count = len(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"])
    while count > doc_max_length:
        words = text.split()
        text = " ".join(words[: int(len(words) * doc_max_length / count)])
        count = len(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"])
    return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def tokenize(tokenizer, texts, max_length):
    text_parts, originals = [], []
    for text in texts:
        parts = text.split(SEPARATOR)
        text_parts.append(parts[1] if len(parts) > 1 else "")
        originals.append("".join(parts))
    tokenizer.padding_side = "left"
    features = tokenizer(originals, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    embed_mask = torch.zeros_like(features["attention_mask"])
    for i, text in enumerate(text_parts):
        ids = tokenizer([text], return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                        add_special_tokens=False)["input_ids"][0]
        if len(ids) > 0:
            embed_mask[i, -len(ids):] = 1
    features["embed_mask"] = embed_mask
    return features


def pool_mean(hidden, embed_mask):
    lengths = embed_mask.sum(dim=-1)
    return torch.stack([hidden[i, -int(n):, :].mean(dim=0) for i, n in enumerate(lengths)], dim=0)


def reference_encode(encoder, sentences, batch_size=32, device="cpu"):
    """Mean-pooled embeddings of `sentences` (strings or [instruction, text]) the reference's way."""
    tokenizer, model = encoder.tokenizer, encoder.model
    pairs = [["", s] if isinstance(s, str) else s for s in sentences]
    joined = [convert_to_str(tokenizer, i, t, encoder.max_length, encoder.doc_max_length) for i, t in pairs]
    order = np.argsort([-len(s) for s in joined])
    embeddings = []
    with torch.inference_mode():
        for start in range(0, len(joined), batch_size):
            batch = [apply_template(joined[i], encoder.config._name_or_path, encoder.config.model_type,
                                    encoder.pooling_mode) for i in order[start:start + batch_size]]
            features = {k: v.to(device) for k, v in tokenize(tokenizer, batch, encoder.max_length).items()}
            valid = features["attention_mask"].bool()
            mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)  # bidirectional, [B, 1, S, S]
            hidden = model(input_ids=features["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
            embeddings.append(pool_mean(hidden, features["embed_mask"]).float().cpu())
    result = torch.cat(embeddings)
    return result[np.argsort(order)]
