"""`LLM2Vec`: the drop-in replacement for `llm2vec.LLM2Vec` (0.2.3), on current transformers.

Same constructor, `from_pretrained`, `tokenize`, `forward`, `encode` and `save`; the differences are bug fixes
listed in the README ("Differences from llm2vec"). Encoding is padding-free by default: the texts of a batch are
packed into one row and attention runs per text (engine="packed"); engine="padded" runs classic right-padded
batches through PyTorch SDPA with an explicit mask (used for causal models and as the comparison baseline).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import (PackedBatch, PaddedBatch, check_pooling_mode, check_positive_int, kernel_mode, pack, pad,
                       pooling_range, round_up_tokens, token_budget_batches)
from .files import staging_beside
from .inputs import normalize_inputs
from .kernels.pooling import segment_pool
from .loading import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENCODER_ARGS, LLM2VEC_CONFIG, WEIGHT_FILES, adapter_base_name,
                      apply_adapter, check_model_directory, has_weights, is_adapter_directory, load_base_model,
                      make_reference_loadable, read_adapter_config, read_llm2vec_config, resolve_directory,
                      split_loading_kwargs)
from .cpu_runtime import prepare_for_cpu_encode
from .modeling import base_model, check_supported, enable_gradient_checkpointing, is_bidirectional, patch, run_packed, run_padded
from .tokenization import RowTokenizer, TokenizedRow

ENGINES = ("auto", "packed", "padded")
# Tokens per batch when max_batch_tokens is not given, by device and matmul precision (`default_max_batch_tokens`).
# CPU: the measured best of 512-8192 on SmolLM2-135M with 2 threads (README, "Encode engine"): 1024 for fp32 GEMMs,
# 4096 where the GEMMs run in bf16 (bf16 or the mixed mode: larger AMX GEMMs and fewer per-batch passes; 1024 was
# 10-26% slower there in the passes measured). CUDA: a budget that fills an H200 with a 135M-7B model, not yet
# measured.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 1024, "cpu-bf16": 4096, "cuda": 32768}
# A CPU encode with bf16 GEMMs pads each packed batch to a multiple of this many tokens (a filler sequence, at most
# 1.5% more work at the 4096 budget): without it, RSS grew by ~4 MB per new batch token count, which a corpus
# encode meets by the thousand (oneDNN keeps JIT kernels per GEMM shape).
ROUND_TOKENS = 64


def default_max_batch_tokens(device_type: str, matmul_dtype: Optional[torch.dtype] = None) -> int:
    """The default token budget for an encode on `device_type` ("cpu", "cuda", ...) whose GEMMs run in
    matmul_dtype (on CPU, bfloat16 takes the larger budget; anything else, None included, the fp32 one)."""
    if device_type == "cpu" and matmul_dtype == torch.bfloat16:
        return DEFAULT_MAX_BATCH_TOKENS["cpu-bf16"]
    return DEFAULT_MAX_BATCH_TOKENS.get(device_type, DEFAULT_MAX_BATCH_TOKENS["cpu"])


# Files a save writes whose presence changes what a directory loads as: a stale one left from an earlier save
# (an adapter beside merged weights, weights beside a new adapter) is removed. Anything else is left alone.
_SAVE_MANAGED = (*WEIGHT_FILES, ADAPTER_CONFIG, *ADAPTER_WEIGHTS, LLM2VEC_CONFIG)
_SHARD_SUFFIXES = (".safetensors", ".bin")
# Written by PEFT's save_pretrained as a model card; a README the user keeps in the directory wins.
_KEEP_EXISTING = ("README.md",)


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
    matmul_dtype: the dtype of the linears' GEMMs in a CPU encode: None (the weights' dtype) or torch.bfloat16 for a
        float32 model, the mixed mode (bf16 matmuls; residual stream, norms, attention softmax and pooling in
        float32). `from_pretrained(dtype="mixed")` sets it; GPU encodes run in the weights' dtype.
    """

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True, *, engine: str = "auto",
                 max_batch_tokens: Optional[int] = None, matmul_dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_pooling_mode(pooling_mode)
        check_supported(model.config)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        check_positive_int("max_length", max_length)
        check_positive_int("doc_max_length", doc_max_length)
        if max_batch_tokens is not None:
            check_positive_int("max_batch_tokens", max_batch_tokens)
        if not isinstance(skip_instruction, bool):
            raise TypeError(f"skip_instruction must be True or False, got {skip_instruction!r}")
        if matmul_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"matmul_dtype must be None, torch.float32 or torch.bfloat16, got {matmul_dtype!r}")
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
        self.matmul_dtype = matmul_dtype
        self.config = model.config
        self._encode_scope = _EvalScope()

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                        enable_bidirectional: bool = True, **kwargs) -> "LLM2Vec":
        """Load an encoder from a local directory, a model in the local Hugging Face cache, a released LLM2Vec
        adapter layout, or the embedded default.

        Encoder arguments (pooling_mode, max_length, doc_max_length, skip_instruction, engine, max_batch_tokens)
        are taken from kwargs, then from `llm2vec_config.json` (of the adapter if given, else of the base).
        Hub arguments (cache_dir, revision, subfolder, local_files_only, token) say where a hub id is cached, as
        for `AutoModel.from_pretrained` but never downloading: cache_dir applies to the base and the adapter,
        revision and subfolder to the base (the base an adapter config names is taken at that config's revision).
        Every other kwarg goes to Hugging Face `from_pretrained` (dtype, device_map, config overrides such as
        attention_dropout=0.3); `torch_dtype` is accepted as the old name of dtype, and attn_implementation is
        replaced by our attention (a warning says so for a value whose substance we do not keep).
        dtype="mixed": float32 weights whose CPU matmuls run in bf16 (see `matmul_dtype`). dtype="auto" without
        CUDA: the CPU's measured choice (`cpu_linear.choose_cpu_dtype`: "mixed" where bf16 matmuls are native and
        measure faster, else float32), printed once on stderr; with CUDA it keeps Hugging Face's meaning (the
        checkpoint's dtype).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if "batch_size" in kwargs:
            raise TypeError("batch_size is an argument of encode(), not of from_pretrained(); pass it to encode(), "
                            "or max_batch_tokens= here for a default token budget.")
        encoder_args = {k: v for k in ENCODER_ARGS if (v := kwargs.pop(k, None)) is not None}
        runtime_args = {k: kwargs.pop(k) for k in ("engine", "max_batch_tokens", "matmul_dtype") if k in kwargs}
        hub, kwargs = split_loading_kwargs(kwargs)
        cache = {"cache_dir": hub.get("cache_dir")}

        base_dir = resolve_directory(base_model_name_or_path, "base model", revision=hub.get("revision"),
                                     subfolder=hub.get("subfolder"), **cache)
        check_model_directory(base_dir)
        if is_adapter_directory(base_dir):
            read_adapter_config(base_dir)  # a broken adapter_config.json is named before transformers reads it
        base_config = AutoConfig.from_pretrained(base_dir)
        check_supported(base_config)
        kwargs, runtime_args = _resolve_dtype(kwargs, runtime_args, base_config)

        weights_dir = base_dir
        if is_adapter_directory(base_dir) and not has_weights(base_dir):
            # The released LLM2Vec layout: base config + adapter; the weights are those of the adapter's base.
            weights_dir = resolve_directory(adapter_base_name(base_dir), "base model named in the adapter config",
                                            revision=read_adapter_config(base_dir).get("revision"), **cache)
        model = load_base_model(AutoModel, weights_dir, **kwargs)
        _warn_if_spread(model)
        model.config._name_or_path = _name_of(base_model_name_or_path, base_dir)
        if is_adapter_directory(base_dir):
            model = apply_adapter(model, base_dir, merge=True)

        adapter_dir = None
        if peft_model_name_or_path is not None:
            adapter_dir = resolve_directory(peft_model_name_or_path, "adapter", **cache)
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
        """The model batch of tokenized `rows` with their pooling ranges: a PackedBatch for a bidirectional model
        (or engine="packed"), else a PaddedBatch."""
        ranges = self._ranges(rows)
        if self._resolved_engine() == "packed":
            return pack(rows, ranges)
        return pad(rows, ranges, self.tokenizer.pad_token_id)

    # ---------------------------------------------------------------------------------------------- forward

    def embed_batch(self, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Differentiable embeddings [B, hidden] of a batch made by `make_batch`."""
        return self.pool(self.hidden_states(batch), batch)

    def hidden_states(self, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Last hidden states [T, hidden] of a batch, the rows that `batch.pool_starts/pool_ends` index (packed:
        the concatenated texts; padded: the flattened [B * S] rows)."""
        if isinstance(batch, PackedBatch):
            return run_packed(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        hidden = run_padded(self.model, batch.input_ids, batch.attention_mask, is_bidirectional(self.model))
        return hidden.reshape(-1, hidden.shape[-1])

    def pool(self, hidden: torch.Tensor, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Embeddings [B, hidden] pooled from `hidden_states(batch)` with this encoder's pooling mode."""
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

        Thread safety: concurrent encode calls on one model are safe and give the results of a single-threaded
        call, also when the model was left in train() mode: they share one eval-mode scope, and the module
        modes in place before the first of them are restored when the last one ends. They must all use the same
        device (a call for another device while one runs is refused). Training or a train-mode forward on the
        same model while an encode runs is not supported: until the encode ends the modules are in eval mode, so
        such a step would run without dropout, and a train() call from another thread would turn dropout on
        inside the encode.
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
        """Embeddings (float32, CPU, [len(rows), hidden]) of rows from `tokenize_inputs`, in their order.

        Thread-safe as `encode` describes."""
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if max_batch_tokens is not None:
            check_positive_int("max_batch_tokens", max_batch_tokens)
        device = _usable_device(device)
        budget = next((b for b in (max_batch_tokens, self.max_batch_tokens) if b is not None),
                      self.default_batch_tokens(device))
        check_positive_int("max_batch_tokens", budget)  # the attribute may have been set after construction
        output = torch.empty(len(rows), self.config.hidden_size, dtype=torch.float32)
        batches = token_budget_batches([len(r) for r in rows], budget, batch_size)
        # bf16 GEMMs on CPU: packed batches rounded up to a multiple of ROUND_TOKENS tokens (see round_up_tokens).
        round_tokens = device.type == "cpu" and self._gemm_dtype() == torch.bfloat16 and \
            self.tokenizer.pad_token_id is not None
        with self._encode_scope.enter(self, device), torch.inference_mode(), \
                tqdm(total=len(rows), desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
            for indices in batches:
                batch = self.make_batch([rows[i] for i in indices])
                if round_tokens and isinstance(batch, PackedBatch):
                    batch = round_up_tokens(batch, ROUND_TOKENS, self.tokenizer.pad_token_id)
                batch = batch.to(device)
                embeddings = self.embed_batch(batch).float()
                if normalize_embeddings:
                    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
                output[torch.tensor(indices)] = embeddings.cpu()
                progress.update(len(indices))
        return output

    def _prepare_for_encoding(self, device: torch.device) -> None:
        """One-time (per device) setup of an encode; runs under the encode scope's lock."""
        self.to(device)
        if device.type != "cpu":
            return
        tokens = self.max_batch_tokens or self.default_batch_tokens(device)
        prepare_for_cpu_encode(self.model, self.matmul_dtype, tokens)

    def default_batch_tokens(self, device=None) -> int:
        """The token budget an encode on `device` (default: CPU) uses when max_batch_tokens is not given: see
        `default_max_batch_tokens` (bf16 GEMMs: the model's dtype, or matmul_dtype in the mixed mode)."""
        device_type = torch.device(device).type if device is not None else "cpu"
        return default_max_batch_tokens(device_type, self._gemm_dtype())

    def _gemm_dtype(self) -> Optional[torch.dtype]:
        """The dtype the linears' GEMMs run in: matmul_dtype (the mixed mode), else the weights' dtype."""
        weights = next(self.model.parameters(), None)
        return self.matmul_dtype or (weights.dtype if weights is not None else None)

    # ------------------------------------------------------------------------------------ model methods

    # What code written for the reference and HF Trainer call on an LLM2Vec, delegated to the wrapped Hugging Face
    # model (the decoder inside a PEFT wrapper). The reference has only resize_token_embeddings and
    # gradient_checkpointing_enable; the rest are what Trainer and PEFT-era training scripts reach for.

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating-point parameter."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """Recompute each decoder layer's activations in the backward pass (HF's method, on the wrapped model).

        gradient_checkpointing_kwargs: passed to torch.utils.checkpoint (e.g. {"use_reentrant": False}); kwargs:
        the HF method's others (every_n_layers, offload on transformers versions that have them)."""
        enable_gradient_checkpointing(base_model(self.model), gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **kwargs) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what its Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Undo `gradient_checkpointing_enable`."""
        target = base_model(self.model)
        if hasattr(target, "activation_checkpointing_disable"):
            target.activation_checkpointing_disable()
        else:
            target.gradient_checkpointing_disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any decoder layer recomputes its activations in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so that reentrant checkpointing reaches the adapter."""
        base_model(self.model).enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        """Undo `enable_input_require_grads`."""
        base_model(self.model).disable_input_require_grads()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding module of the wrapped model."""
        return base_model(self.model).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding module of the wrapped model."""
        base_model(self.model).set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                **kwargs) -> nn.Embedding:
        """Resize the token embeddings (after adding tokens to the tokenizer); returns the new embedding module.

        kwargs: the HF method's others (mean_resizing)."""
        return base_model(self.model).resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)

    def tie_weights(self, *args, **kwargs):
        """Tie the wrapped model's shared weights (HF Trainer calls it after loading a checkpoint)."""
        return base_model(self.model).tie_weights(*args, **kwargs)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (HF's method on the wrapped model; counts an unmerged adapter's too)."""
        if not exclude_embeddings:
            return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        return base_model(self.model).num_parameters(only_trainable=only_trainable, exclude_embeddings=True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of that name."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts (PEFT's output, for an unmerged adapter or not)."""
        if hasattr(self.model, "print_trainable_parameters"):
            self.model.print_trainable_parameters()
            return
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def save_pretrained(self, save_directory: str, state_dict: Optional[dict] = None,
                        safe_serialization: bool = True, **kwargs) -> None:
        """`save(save_directory)` under HF's name and signature (as Trainer-style code calls it).

        state_dict: weights to write instead of the module's own, keyed as `self.state_dict()` is (e.g. gathered
        by a distributed trainer). safe_serialization: only True (safetensors) is supported. kwargs go to the
        wrapped model's save_pretrained (max_shard_size, is_main_process, ...)."""
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False) is not supported: llm2vec-fast writes "
                             "safetensors only. Drop the argument.")
        if state_dict is not None:
            prefix = "model."
            if any(not k.startswith(prefix) for k in state_dict):
                raise ValueError("save_pretrained(state_dict=...) expects the keys of LLM2Vec.state_dict() "
                                 "('model.' + the wrapped model's keys).")
            kwargs["state_dict"] = {k[len(prefix):]: v for k, v in state_dict.items()}
        self._save(save_directory, merge_before_save=False, save_config=True, model_kwargs=kwargs)

    # ------------------------------------------------------------------------------------------------- save

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Write model (or adapter, for an unmerged PEFT model), tokenizer and llm2vec_config.json.

        An unmerged adapter is saved with its base's config.json (the released LLM2Vec layout). The files are
        written into a staging directory beside `output_path` and renamed into place one by one (each rename
        atomic; a symlink planted at a destination is replaced, never written through). Files of an earlier
        save that would change what the directory loads as (adapter files beside new merged weights, weights
        beside a new adapter, an llm2vec_config.json when save_config=False) are removed; other files are kept.
        The files are also loadable by llm2vec 0.2.3 and its transformers 4.4x (see `make_reference_loadable`).
        """
        self._save(output_path, merge_before_save, save_config, model_kwargs={})

    def _save(self, output_path, merge_before_save: bool, save_config: bool, model_kwargs: dict) -> None:
        from peft import PeftModel

        if merge_before_save and isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        output_path = os.fspath(output_path)
        if os.path.lexists(output_path) and not os.path.isdir(output_path):
            raise FileExistsError(f"{output_path!r} exists and is not a directory; pass a directory to save into.")
        staging = staging_beside(output_path, "saving")
        try:
            self.model.save_pretrained(staging, **model_kwargs)
            if isinstance(self.model, PeftModel):
                self.model.get_base_model().config.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            if save_config:
                with open(os.path.join(staging, LLM2VEC_CONFIG), "w") as f:
                    json.dump({k: getattr(self, k) for k in ENCODER_ARGS}, f, indent=4)
            make_reference_loadable(staging, self.tokenizer)
            _install_saved_files(staging, output_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class _EvalScope:
    """One eval-mode scope shared by the encode calls running on a model at the same time.

    The first call to enter records every module's training flag and switches to eval; the last one to leave
    restores the flags. Calls in between see eval mode throughout, whatever the order they end in.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._device = None
        self._saved_modes = None

    def __reduce__(self):
        return _EvalScope, ()  # a copied or unpickled model starts with no encode running (locks do not pickle)

    @contextmanager
    def enter(self, encoder: "LLM2Vec", device: torch.device):
        with self._lock:
            if self._active and device != self._device:
                raise RuntimeError(
                    f"an encode on {self._device} is running on this model; a concurrent encode must use the same "
                    f"device (got {device}). Pass device={str(self._device)!r} or wait for it to finish.")
            if not self._active:
                saved = [(module, module.training) for module in encoder.modules()]
                encoder.eval()
                try:
                    encoder._prepare_for_encoding(device)
                except BaseException:
                    _restore_modes(saved)
                    raise
                self._saved_modes, self._device = saved, device
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    _restore_modes(self._saved_modes)
                    self._saved_modes = self._device = None


def _restore_modes(saved: list) -> None:
    for module, training in saved:
        module.training = training


def _usable_device(device) -> torch.device:
    """`device` (default: cuda if available, else cpu) after checking that the weights can live there.

    Checked before anything moves: a model sent to an unusable device (meta, a missing GPU) is left unusable.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device ({error}); pass e.g. 'cpu' or 'cuda:0'.") from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no data, so the model cannot run there (and moving it would drop its "
                         "weights); pass 'cpu' or 'cuda'.")
    if device.type == "cpu":
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; pass device='cpu'.")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"device={str(device)!r} cannot be used here ({str(error)[:200]}); pass 'cpu' or an "
                         f"available accelerator.") from None
    return device


def _install_saved_files(staging: str, output_path: str) -> None:
    """Move a finished save from `staging` into `output_path`, removing stale files an earlier save left."""
    if not os.path.lexists(output_path):
        os.rename(staging, output_path)  # a new directory appears whole
        return
    new = set(os.listdir(staging))
    for name in os.listdir(output_path):
        if name not in new and _is_managed(name):
            os.remove(os.path.join(output_path, name))  # a symlink is removed itself, its target kept
    for name in sorted(new, key=lambda n: n == LLM2VEC_CONFIG or n == ADAPTER_CONFIG):
        destination = os.path.join(output_path, name)
        if name in _KEEP_EXISTING and os.path.lexists(destination):
            continue
        if os.path.isdir(destination) and not os.path.islink(destination):
            raise IsADirectoryError(f"cannot save {name} into {output_path!r}: a directory of that name is in the "
                                    f"way. Move it, or save elsewhere.")
        os.replace(os.path.join(staging, name), destination)


def _is_managed(name: str) -> bool:
    # Sharded weights: model-00001-of-00004.safetensors, pytorch_model-00001-of-00002.bin.
    sharded = name.startswith(("model-", "pytorch_model-")) and "-of-" in name and name.endswith(_SHARD_SUFFIXES)
    return name in _SAVE_MANAGED or sharded


def resolve_auto_dtype(config, device=None, max_batch_tokens: Optional[int] = None) -> str:
    """What dtype="auto" means for a model with this `config` encoding on `device` (default: cuda if available):
    on CPU the measured choice of `cpu_linear.choose_cpu_dtype` ("mixed" or "float32", announced once on
    stderr); on a GPU "auto", Hugging Face's meaning (the checkpoint's dtype)."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type != "cpu"):
        return "auto"
    from .cpu_linear import announce_cpu_dtype, choose_cpu_dtype

    tokens = max_batch_tokens or default_max_batch_tokens("cpu", torch.bfloat16)  # the budget mixed would use
    choice, reason = choose_cpu_dtype(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                                      tokens)
    announce_cpu_dtype(choice, reason)
    return choice


def _resolve_dtype(kwargs: dict, runtime_args: dict, config) -> tuple[dict, dict]:
    """Turn from_pretrained's dtype="mixed" / "auto" (CPU) into a Hugging Face dtype plus our matmul_dtype."""
    name = "dtype" if "dtype" in kwargs else "torch_dtype"
    dtype = kwargs.get(name)
    if not isinstance(dtype, str) or dtype not in ("auto", "mixed"):
        return kwargs, runtime_args
    if dtype == "auto":
        dtype = resolve_auto_dtype(config, max_batch_tokens=runtime_args.get("max_batch_tokens"))
        if dtype == "auto":
            return kwargs, runtime_args
    if runtime_args.get("matmul_dtype") is not None and dtype == "mixed" \
            and runtime_args["matmul_dtype"] != torch.bfloat16:
        raise ValueError(f"dtype='mixed' means matmul_dtype=torch.bfloat16, got matmul_dtype="
                         f"{runtime_args['matmul_dtype']!r}; pass one of the two.")
    kwargs = dict(kwargs)
    kwargs[name] = torch.float32 if dtype in ("mixed", "float32") else getattr(torch, dtype)
    if dtype == "mixed":
        runtime_args = {**runtime_args, "matmul_dtype": torch.bfloat16}
    return kwargs, runtime_args


def _warn_if_spread(model) -> None:
    # A device_map is honoured at load, but encode runs the whole model on one device and moves it there.
    devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(devices) > 1:
        warnings.warn(f"device_map placed the model on {len(devices)} devices ({', '.join(devices)}); "
                      f"encode() runs the whole model on one device and moves it there (encode(device=...)). "
                      f"For several GPUs, run one process per GPU instead.", stacklevel=3)


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
