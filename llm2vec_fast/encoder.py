"""`LLM2Vec`: the drop-in replacement for `llm2vec.LLM2Vec` (0.2.3), on current transformers.

Same constructor, `from_pretrained`, `tokenize`, `forward`, `encode` and `save`; the differences are bug fixes
listed in the README ("Differences from llm2vec"). Encoding is padding-free by default: the texts of a batch are
packed into one row and attention runs per text (engine="packed"); engine="padded" runs classic right-padded
batches through PyTorch SDPA with an explicit mask (used for causal models and as the comparison baseline).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import (PackedBatch, PaddedBatch, check_pooling_mode, kernel_mode, pack, pad, pooling_range,
                       token_budget_batches)
from .inputs import normalize_inputs
from .kernels.pooling import segment_pool
from .loading import (ENCODER_ARGS, LLM2VEC_CONFIG, adapter_base_name, apply_adapter, check_model_directory,
                      has_weights, is_adapter_directory, read_llm2vec_config, resolve_directory, weights_only_view)
from .modeling import (base_model, check_supported, is_bidirectional, native_cpu_ops, patch, run_packed, run_padded,
                       use_native_cpu_ops)
from .tokenization import RowTokenizer, TokenizedRow

ENGINES = ("auto", "packed", "padded")
# Tokens per batch when max_batch_tokens is not given. CPU: measured best of 512-8192 on SmolLM2-135M (README,
# "Encode engine"); CUDA: a budget that fills an H200 with a 135M-7B model, not yet measured.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 1024, "cuda": 32768}


class LLM2Vec(nn.Module):
    """A decoder LLM used as a text encoder.

    model: a Hugging Face Llama / Mistral / Qwen2 / Gemma base model (or a PEFT wrapper of one). A model that was
        not patched (see `llm2vec_fast.patch`) is used as given, i.e. causal, like the reference does.
    tokenizer: its tokenizer (a fast tokenizer finds the instruction/text boundary in one call).
    pooling_mode: mean | weighted_mean | eos_token | last_token | bos_token.
    max_length: tokens per input, instruction included. doc_max_length: the text's own token limit, applied by
        shortening it to a proportional number of words (the reference's rule).
    skip_instruction: pool over the text's tokens only (the instruction is attended to, not pooled).
    engine: "auto" (packed for bidirectional models, padded otherwise), "packed" or "padded".
    max_batch_tokens: token budget per encode batch (default by device).
    """

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True, *, engine: str = "auto",
                 max_batch_tokens: Optional[int] = None):
        super().__init__()
        check_pooling_mode(pooling_mode)
        check_supported(model.config)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        for name, value in (("max_length", max_length), ("doc_max_length", doc_max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if getattr(base_model(model).config, "_attn_implementation", None) != "llm2vec_fast":
            patch(model, bidirectional=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.config = model.config

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                        enable_bidirectional: bool = True, **kwargs) -> "LLM2Vec":
        """Load an encoder from a local directory, a released LLM2Vec adapter layout, or the embedded default.

        Encoder arguments (pooling_mode, max_length, doc_max_length, skip_instruction, engine, max_batch_tokens)
        are taken from kwargs, then from `llm2vec_config.json` (of the adapter if given, else of the base);
        every other kwarg goes to Hugging Face `from_pretrained` (dtype, device_map, config overrides such as
        attention_dropout=0.3).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        encoder_args = {k: kwargs.pop(k) for k in ENCODER_ARGS if kwargs.get(k) is not None}
        runtime_args = {k: kwargs.pop(k) for k in ("engine", "max_batch_tokens") if k in kwargs}
        kwargs.pop("attn_implementation", None)  # we install our own attention

        base_dir = resolve_directory(base_model_name_or_path, "base model")
        check_model_directory(base_dir)
        check_supported(AutoConfig.from_pretrained(base_dir))

        weights_dir = base_dir
        if is_adapter_directory(base_dir) and not has_weights(base_dir):
            # The released LLM2Vec layout: base config + adapter; the weights are those of the adapter's base.
            weights_dir = resolve_directory(adapter_base_name(base_dir), "base model named in the adapter config")
        if is_adapter_directory(weights_dir):
            with weights_only_view(weights_dir) as view:
                model = AutoModel.from_pretrained(view, **kwargs)
        else:
            model = AutoModel.from_pretrained(weights_dir, **kwargs)
        model.config._name_or_path = _name_of(base_model_name_or_path, base_dir)
        if is_adapter_directory(base_dir):
            model = apply_adapter(model, base_dir, merge=True)

        adapter_dir = None
        if peft_model_name_or_path is not None:
            adapter_dir = resolve_directory(peft_model_name_or_path, "adapter")
            model = apply_adapter(model, adapter_dir, merge=merge_peft)

        tokenizer = _load_tokenizer(AutoTokenizer, base_dir, weights_dir)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

        patch(model, bidirectional=enable_bidirectional)
        config = read_llm2vec_config(adapter_dir if adapter_dir is not None else base_dir)
        config.update(encoder_args)
        return cls(model=model, tokenizer=tokenizer, **config, **runtime_args)

    # ------------------------------------------------------------------------------------------ tokenization

    @property
    def row_tokenizer(self) -> RowTokenizer:
        """The tokenizer front end for the current settings (rebuilt only when a setting changes)."""
        settings = (id(self.tokenizer), self.max_length, self.doc_max_length, self.pooling_mode,
                    self.config._name_or_path)
        if getattr(self, "_row_tokenizer_settings", None) != settings:
            self._row_tokenizer = RowTokenizer(
                self.tokenizer, max_length=self.max_length, doc_max_length=self.doc_max_length,
                pooling_mode=self.pooling_mode, name_or_path=self.config._name_or_path,
                model_type=self.config.model_type)
            self._row_tokenizer_settings = settings
        return self._row_tokenizer

    def prepare_for_tokenization(self, text: str) -> str:
        """The reference's template step, applied to an already joined string."""
        from .prompts import apply_template

        return apply_template(text, self.config._name_or_path, self.config.model_type, self.pooling_mode)

    def tokenize(self, texts: list[str]) -> dict:
        """Reference-compatible features of prepared strings (``"instruction !@#$%^&*()text"``): left-padded
        `input_ids` and `attention_mask` [B, S], and `embed_mask` [B, S] marking the text's tokens."""
        rows = self.row_tokenizer.tokenize_prepared(list(texts))
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        embed_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            shift = width - len(row)
            input_ids[b, shift:] = torch.tensor(row.input_ids)
            attention_mask[b, shift:] = 1
            embed_mask[b, shift + row.text_start: shift + row.text_end] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "embed_mask": embed_mask}

    def _ranges(self, rows: list[TokenizedRow]) -> list[tuple[int, int]]:
        bos = self.tokenizer.bos_token_id
        return [pooling_range(row, self.pooling_mode, self.skip_instruction, bos) for row in rows]

    def _resolved_engine(self) -> str:
        if self.engine != "auto":
            if self.engine == "packed" and not is_bidirectional(self.model):
                raise ValueError("engine='packed' needs a bidirectional model; use engine='padded' for a causal one.")
            return self.engine
        return "packed" if is_bidirectional(self.model) else "padded"

    def make_batch(self, rows: list[TokenizedRow]) -> PackedBatch | PaddedBatch:
        ranges = self._ranges(rows)
        if self._resolved_engine() == "packed":
            return pack(rows, ranges)
        return pad(rows, ranges, self.tokenizer.pad_token_id)

    # ---------------------------------------------------------------------------------------------- forward

    def embed_batch(self, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Differentiable embeddings [B, hidden] of a batch made by `make_batch`."""
        if isinstance(batch, PackedBatch):
            hidden = run_packed(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        else:
            hidden = run_padded(self.model, batch.input_ids, batch.attention_mask, is_bidirectional(self.model))
            hidden = hidden.reshape(-1, hidden.shape[-1])
        return segment_pool(hidden, batch.pool_starts, batch.pool_ends, kernel_mode(self.pooling_mode))

    def forward(self, sentence_feature: dict) -> torch.Tensor:
        """Embeddings [B, hidden] of reference-style features (from `tokenize`); differentiable."""
        input_ids, attention_mask = sentence_feature["input_ids"], sentence_feature["attention_mask"]
        embed_mask = sentence_feature.get("embed_mask")
        if embed_mask is None:
            embed_mask = torch.zeros_like(attention_mask)
        rows = []
        for ids, valid, text in zip(input_ids.tolist(), attention_mask.bool().tolist(), embed_mask.bool().tolist()):
            positions = [p for p, keep in enumerate(valid) if keep]
            text_positions = [k for k, p in enumerate(positions) if text[p]]
            start, end = (text_positions[0], text_positions[-1] + 1) if text_positions else (0, 0)
            rows.append(TokenizedRow([ids[p] for p in positions], start, end))
        batch = self.make_batch(rows).to(input_ids.device)
        return self.embed_batch(batch)

    # ----------------------------------------------------------------------------------------------- encode

    def encode(self, sentences, batch_size: Optional[int] = None, show_progress_bar: bool = True,
               convert_to_numpy: bool = False, convert_to_tensor: bool = False, device: Optional[str] = None,
               normalize_embeddings: bool = False, max_batch_tokens: Optional[int] = None):
        """Embed `sentences` (a string, a list of strings, or [instruction, text] pairs); results in input order.

        batch_size: at most this many texts per batch (the reference's knob); by default batches are filled up to
        `max_batch_tokens` tokens instead. Returns float32 on the CPU: a tensor [N, hidden] (or [hidden] for a
        bare string), a numpy array with convert_to_numpy.
        """
        single = isinstance(sentences, str)
        rows = self.tokenize_inputs(sentences)
        output = self.encode_rows(rows, batch_size=batch_size, show_progress_bar=show_progress_bar, device=device,
                                  normalize_embeddings=normalize_embeddings, max_batch_tokens=max_batch_tokens)
        if single:
            output = output[0]
        return output.numpy() if convert_to_numpy and not convert_to_tensor else output

    def tokenize_inputs(self, sentences) -> list[TokenizedRow]:
        """Validate and tokenize encode inputs (one batched tokenizer call); warn about anything truncated."""
        rows, report = self.row_tokenizer.tokenize_pairs(normalize_inputs(sentences))
        report.warn(self.max_length, self.doc_max_length)
        return rows

    def encode_rows(self, rows: list[TokenizedRow], batch_size: Optional[int] = None, show_progress_bar: bool = False,
                    device: Optional[str] = None, normalize_embeddings: bool = False,
                    max_batch_tokens: Optional[int] = None) -> torch.Tensor:
        """Embeddings (float32, CPU, [len(rows), hidden]) of rows from `tokenize_inputs`, in their order."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        budget = max_batch_tokens or self.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS.get(device.type, 1024)
        output = torch.empty(len(rows), self.config.hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        self.to(device)
        if device.type == "cpu" and native_cpu_ops(self.model) is None:
            use_native_cpu_ops(self.model)  # once per model; an explicit use_native_cpu_ops(..., enable=False) stays
        batches = token_budget_batches([len(r) for r in rows], budget, batch_size)
        try:
            with torch.inference_mode(), tqdm(total=len(rows), desc="Encoding", unit="text",
                                              disable=not show_progress_bar) as progress:
                for indices in batches:
                    batch = self.make_batch([rows[i] for i in indices]).to(device)
                    embeddings = self.embed_batch(batch).float()
                    if normalize_embeddings:
                        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
                    output[torch.tensor(indices)] = embeddings.cpu()
                    progress.update(len(indices))
        finally:
            self.train(was_training)
        return output

    # ------------------------------------------------------------------------------------------------- save

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Write model (or adapter, for an unmerged PEFT model), tokenizer and llm2vec_config.json."""
        from peft import PeftModel

        if merge_before_save and isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        self.model.save_pretrained(output_path)
        self.tokenizer.save_pretrained(output_path)
        if save_config:
            os.makedirs(output_path, exist_ok=True)
            with open(os.path.join(output_path, LLM2VEC_CONFIG), "w") as f:
                json.dump({k: getattr(self, k) for k in ENCODER_ARGS}, f, indent=4)


def _name_of(requested, directory: str) -> str:
    # Prompt templates are keyed on the hub name; keep a name the user gave rather than a cache path.
    requested = os.fspath(requested)
    return requested if not os.path.isdir(requested) else directory


def _load_tokenizer(auto_tokenizer, *directories):
    errors = []
    for directory in dict.fromkeys(directories):
        try:
            return auto_tokenizer.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            errors.append(f"{directory}: {error}")
    raise FileNotFoundError("no tokenizer could be loaded: " + "; ".join(errors))
