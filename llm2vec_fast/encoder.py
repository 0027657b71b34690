"""`LLM2Vec`: the drop-in replacement for `llm2vec.LLM2Vec` (0.2.3), on current transformers.

Same constructor, `from_pretrained`, `tokenize`, `forward`, `encode` and `save`; the differences are bug fixes
listed in docs/differences.md. Encoding is padding-free by default: the texts of a batch are
packed into one row and attention runs per text (engine="packed"); engine="padded" runs classic right-padded
batches through PyTorch SDPA with an explicit mask (used for causal models and as the comparison baseline).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import (PackedBatch, PaddedBatch, check_pooling_mode, check_positive_int, kernel_mode, pack, pad,
                       pooling_range, reference_features, round_up_tokens, rows_of_features, token_budget_batches)
from .cpu_runtime import prepare_for_cpu_encode
from .encode_scope import EvalScope, usable_device
from .hf_model import HuggingFaceModelMixin
from .inputs import normalize_inputs
from .kernels.pooling import segment_pool
from .loading import load_encoder
from .modeling import base_model, check_supported, is_bidirectional, patch, run_packed, run_padded
from .precision import default_max_batch_tokens
from .saving import save_encoder
from .tokenization import RowTokenizer, TokenizedRow

ENGINES = ("auto", "packed", "padded")
# A CPU encode with bf16 GEMMs pads each packed batch to a multiple of this many tokens (a filler sequence, at most
# 1.5% more work at the 4096 budget): without it, RSS grew by ~4 MB per new batch token count, which a corpus
# encode meets by the thousand (oneDNN keeps JIT kernels per GEMM shape).
ROUND_TOKENS = 64


class LLM2Vec(HuggingFaceModelMixin, nn.Module):
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
        # What a sentence-transformers directory puts after pooling (Dense layers, Normalize): an nn.Module mapping
        # pooled [B, hidden] to embeddings [B, head.out_features], or None (the LLM2Vec layout: the pooled vector is
        # the embedding).
        self.head: Optional[nn.Module] = None
        self._encode_scope = EvalScope()

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
        return load_encoder(cls, base_model_name_or_path, peft_model_name_or_path, merge_peft,
                            enable_bidirectional, **kwargs)

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
        return reference_features(self.row_tokenizer.tokenize_prepared(list(texts)), self.tokenizer.pad_token_id)

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
        """Differentiable embeddings [B, embedding_dim] of a batch made by `make_batch`."""
        return self.apply_head(self.pool(self.hidden_states(batch), batch))

    def apply_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vectors [B, hidden] -> embeddings [B, embedding_dim] through `head` (identity without one)."""
        return pooled if self.head is None else self.head(pooled)

    @property
    def embedding_dim(self) -> int:
        """The width of the vectors `encode` returns (before any truncate_dim): the head's `out_features`, or the
        hidden size without a head."""
        return self.config.hidden_size if self.head is None else int(self.head.out_features)

    def hidden_states(self, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Last hidden states [T, hidden] of a batch, the rows that `batch.pool_starts/pool_ends` index (packed:
        the concatenated texts; padded: the flattened [B * S] rows)."""
        if isinstance(batch, PackedBatch):
            return run_packed(self.model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        hidden = run_padded(self.model, batch.input_ids, batch.attention_mask, is_bidirectional(self.model))
        return hidden.reshape(-1, hidden.shape[-1])

    def pool(self, hidden: torch.Tensor, batch: PackedBatch | PaddedBatch) -> torch.Tensor:
        """Pooled vectors [B, hidden] of `hidden_states(batch)` with this encoder's pooling mode (before `head`)."""
        return segment_pool(hidden, batch.pool_starts, batch.pool_ends, kernel_mode(self.pooling_mode))

    def forward(self, sentence_feature: dict) -> torch.Tensor:
        """Embeddings [B, embedding_dim] of reference-style features (from `tokenize`); differentiable."""
        batch = self.make_batch(rows_of_features(sentence_feature)).to(sentence_feature["input_ids"].device)
        return self.embed_batch(batch)

    # ----------------------------------------------------------------------------------------------- encode

    def encode(self, sentences, batch_size: Optional[int] = None, show_progress_bar: bool = True,
               convert_to_numpy: bool = False, convert_to_tensor: bool = False, device: Optional[str] = None,
               normalize_embeddings: bool = False, max_batch_tokens: Optional[int] = None):
        """Embed `sentences` (a string, a list of strings, or [instruction, text] pairs); results in input order.

        batch_size: at most this many texts per batch (the reference's knob); by default batches are filled up to
        `max_batch_tokens` tokens instead. Returns float32 on the CPU: a tensor [N, hidden] (or [hidden] for a
        bare string), a numpy array with convert_to_numpy. A NaN or inf embedding raises ValueError naming the
        inputs.

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
        _refuse_non_finite(output)
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

        Thread-safe as `encode` describes. Non-finite rows are returned as they are: a caller that writes them
        refuses them in its own terms (the encode job names the input lines)."""
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if max_batch_tokens is not None:
            check_positive_int("max_batch_tokens", max_batch_tokens)
        device = usable_device(device)
        budget = next((b for b in (max_batch_tokens, self.max_batch_tokens) if b is not None),
                      self.default_batch_tokens(device))
        check_positive_int("max_batch_tokens", budget)  # the attribute may have been set after construction
        output = torch.empty(len(rows), self.embedding_dim, dtype=torch.float32)
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
        save_encoder(self, output_path, merge_before_save, save_config)


def _refuse_non_finite(embeddings: torch.Tensor) -> None:
    """A NaN or inf embedding is an error naming the inputs, never a result (as the encode job refuses them)."""
    bad = (~torch.isfinite(embeddings).all(dim=-1)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"the model gave non-finite embeddings (NaN or inf) for {len(bad)} of {len(embeddings)} input(s) "
            f"(indices {shown}): its weights, an adapter or its config (e.g. rope_theta) hold non-finite values, or "
            f"a reduced dtype overflowed. Check the checkpoint, or encode in float32.")

