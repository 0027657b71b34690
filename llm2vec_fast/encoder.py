"""`LLM2Vec`: the drop-in replacement for `llm2vec.LLM2Vec` (0.2.3), on current transformers.

Same constructor, `from_pretrained`, `tokenize`, `forward`, `encode` and `save`; the differences are bug fixes
listed in docs/differences.md. Encoding is padding-free by default: the texts of a batch are
packed into one row and attention runs per text (engine="packed"); engine="padded" runs classic right-padded
batches through PyTorch SDPA with an explicit mask (the comparison baseline).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import (PackedBatch, PaddedBatch, check_pooling_mode, check_positive_int, kernel_mode, pack, pad,
                       pooling_range, reference_features, round_up_tokens, rows_of_features, token_budget_batches)
from . import quantization
from .chunking import WindowMeans, check_long_input, split_windows, whole_windows, window_row
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

    model: a Hugging Face base model of a tested family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text,
        Phi-3: `modeling.FAMILIES`), or a PEFT wrapper of one. A model that was
        not patched (see `llm2vec_fast.patch`) is used as given, i.e. causal, like the reference does.
    tokenizer: its tokenizer (a fast tokenizer finds the instruction/text boundary in one call).
    pooling_mode: mean | weighted_mean | eos_token | last_token | bos_token.
    max_length: tokens per input, instruction included. doc_max_length: the text's own token limit, applied by
        shortening it to a proportional number of words (the reference's rule).
    skip_instruction: pool over the text's tokens only (the instruction is attended to, not pooled).
    engine: "auto" (= "packed": texts packed into one row, attention per text, causal or bidirectional), "packed"
        or "padded" (right-padded batches with an explicit mask: the comparison baseline).
    max_batch_tokens: token budget per encode batch (default by device).
    matmul_dtype: the dtype of the linears' GEMMs in a CPU encode: None (the weights' dtype) or torch.bfloat16 for a
        float32 model, the mixed mode (bf16 matmuls; residual stream, norms, attention softmax and pooling in
        float32). `from_pretrained(dtype="mixed")` sets it; GPU encodes run in the weights' dtype.
    long_input: what `encode` does with a text that does not fit: "truncate" (the reference's doc_max_length word
        rule, then the max_length cut, with a warning) or "chunk" (embed every token: the text is split into
        windows of max_length tokens, instruction repeated in each, and their pooled vectors are averaged,
        weighted by their token counts; mean and weighted_mean pooling only; see llm2vec_fast/chunking.py).
    chunk_overlap: in chunk mode, the text tokens each window repeats from the end of the previous one (counted
        in both windows' means).
    """

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True, *, engine: str = "auto",
                 max_batch_tokens: Optional[int] = None, matmul_dtype: Optional[torch.dtype] = None,
                 long_input: str = "truncate", chunk_overlap: int = 0):
        super().__init__()
        check_pooling_mode(pooling_mode)
        check_long_input(long_input, chunk_overlap, pooling_mode)
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
        self.long_input = long_input
        self.chunk_overlap = chunk_overlap
        self.config = model.config
        # What a sentence-transformers directory puts after pooling (Dense layers, Normalize): an nn.Module mapping
        # pooled [B, hidden] to embeddings [B, head.out_features], or None (the LLM2Vec layout: the pooled vector is
        # the embedding).
        self.head: Optional[nn.Module] = None
        # Named prompts (sentence-transformers' `prompts`, `default_prompt_name`): encode(prompt_name=...) looks them
        # up. A sentence-transformers directory fills them; set them freely.
        self.prompts: dict[str, str] = {}
        self.default_prompt_name: Optional[str] = None
        # The sentence-transformers directory this encoder was loaded from (st_directory.STDirectory), or None. When
        # set, inputs are tokenized as sentence-transformers does (prompt + text as one string, its truncation).
        self.sentence_transformers = None
        self._encode_scope = EvalScope()

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                        enable_bidirectional: Optional[bool] = None, **kwargs) -> "LLM2Vec":
        """Load an encoder from a local directory, a model in the local Hugging Face cache, a released LLM2Vec
        adapter layout, or the embedded default.

        Encoder arguments (pooling_mode, max_length, doc_max_length, skip_instruction, engine, max_batch_tokens,
        long_input, chunk_overlap) are taken from kwargs, then (the first four) from `llm2vec_config.json` (of the
        adapter if given, else of the base).
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
        A sentence-transformers directory (one with modules.json) brings its pooling, Dense/Normalize head
        (`head`), max_seq_length, prompts and attention direction (bidirectional only when its config says so;
        enable_bidirectional= overrides); see docs/sentence-transformers.md.
        """
        return load_encoder(cls, base_model_name_or_path, peft_model_name_or_path, merge_peft,
                            enable_bidirectional, **kwargs)

    # ------------------------------------------------------------------------------------------ tokenization

    def use_sentence_transformers(self, description) -> None:
        """Adopt what a sentence-transformers directory (an st_directory.STDirectory) puts around the decoder: its
        head, prompts, and its way of tokenizing."""
        from .st_directory import build_head

        self.head = build_head(description, self.config.hidden_size)
        self.prompts = dict(description.prompts)
        self.default_prompt_name = description.default_prompt_name
        self.sentence_transformers = description

    @property
    def row_tokenizer(self) -> RowTokenizer:
        """The tokenizer front end for the current settings (rebuilt only when a setting changes)."""
        settings = (id(self.tokenizer), self.max_length, self.doc_max_length, self.pooling_mode,
                    self.config._name_or_path, self.sentence_transformers is not None, self.skip_instruction)
        if getattr(self, "_row_tokenizer_settings", None) != settings and self.sentence_transformers is not None:
            from .st_tokenization import PromptTokenizer

            self._row_tokenizer = PromptTokenizer(self.tokenizer, self.max_length, exclude_prompt=self.skip_instruction)
            self._row_tokenizer_settings = settings
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
        if self.sentence_transformers is not None and self.skip_instruction and self.pooling_mode == "mean":
            # sentence-transformers' include_prompt=false: the tokens after the prompt, even none (a zero vector,
            # as its Pooling gives; st_tokenization warns), never the whole row.
            return [(row.text_start, row.text_end) for row in rows]
        return [pooling_range(row, self.pooling_mode, self.skip_instruction, bos) for row in rows]

    def _resolved_engine(self) -> str:
        # Packed attention is per text and honours causality, sliding windows and softcaps, so it serves causal
        # models too ("auto"); "padded" stays the comparison baseline.
        return "packed" if self.engine == "auto" else self.engine

    def make_batch(self, rows: list[TokenizedRow]) -> PackedBatch | PaddedBatch:
        """The model batch of tokenized `rows` with their pooling ranges: a PackedBatch (engine "auto" or
        "packed"), else a PaddedBatch."""
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
               normalize_embeddings: bool = False, max_batch_tokens: Optional[int] = None,
               truncate_dim: Optional[int] = None, precision: str = "float32", ranges=None,
               long_input: Optional[str] = None, chunk_overlap: Optional[int] = None,
               prompt_name: Optional[str] = None, prompt: Optional[str] = None):
        """Embed `sentences` (a string, a list of strings, or [instruction, text] pairs); results in input order.

        prompt_name, prompt: as in sentence-transformers: the prompt `prompts[prompt_name]`, or the string `prompt`,
        goes before every text; with neither, `default_prompt_name`'s prompt does (if set). On an encoder loaded from a
        sentence-transformers directory it is prepended as sentence-transformers does (and an [instruction, text]
        pair's instruction is that text's prompt); on an LLM2Vec encoder it is the instruction of every text.

        batch_size: at most this many texts per batch (the reference's knob); by default batches are filled up to
        `max_batch_tokens` tokens instead. Returns float32 on the CPU: a tensor [N, hidden] (or [hidden] for a
        bare string), a numpy array with convert_to_numpy. A NaN or inf embedding raises ValueError naming the
        inputs.

        Smaller embeddings (sentence-transformers' options and order: truncate, normalize, quantize; see
        llm2vec_fast/quantization.py): truncate_dim keeps the first N dimensions (Matryoshka models).
        precision: float32 | float16 | int8 | uint8 | binary | ubinary: int8/uint8 give [N, dim] per-dimension
        buckets of `ranges` ([2, dim] minima and maxima, e.g. `quantization.calibration_ranges` of a sample); without
        ranges they are calibrated on this call's own embeddings, as sentence-transformers does, so two calls get
        different buckets: quantize a corpus with fixed ranges. binary/ubinary give the packed sign bits
        [N, ceil(dim / 8)] as int8 (offset by -128) / uint8. The tensor or array has the precision's dtype.

        long_input: "truncate" or "chunk", chunk_overlap: tokens shared by consecutive windows (default: the
        encoder's `long_input` and `chunk_overlap`, "truncate" and 0 unless set; see the class docstring). In chunk
        mode a text is never shortened: its windows are batched with the other texts and its embedding is the
        token-weighted mean of their pooled vectors, then the head; a text that truncate mode leaves whole gets
        the same embedding in both modes (bit for bit when no text of the call needs windows).

        Thread safety: concurrent encode calls on one model are safe and give the results of a single-threaded
        call, also when the model was left in train() mode: they share one eval-mode scope, and the module
        modes in place before the first of them are restored when the last one ends. They must all use the same
        device (a call for another device while one runs is refused). Training or a train-mode forward on the
        same model while an encode runs is not supported: until the encode ends the modules are in eval mode, so
        such a step would run without dropout, and a train() call from another thread would turn dropout on
        inside the encode.
        """
        single = isinstance(sentences, str)
        truncate_dim, ranges = quantization.check_options(truncate_dim, precision, ranges, self.embedding_dim)
        normalize_full, normalize_truncated = quantization.normalize_where(normalize_embeddings, truncate_dim)
        long_input, chunk_overlap = self._long_input_options(long_input, chunk_overlap)
        rows = self.tokenize_inputs(sentences, long_input=long_input, prompt_name=prompt_name, prompt=prompt)
        output = self.encode_rows(rows, batch_size=batch_size, show_progress_bar=show_progress_bar, device=device,
                                  normalize_embeddings=normalize_full, max_batch_tokens=max_batch_tokens,
                                  long_input=long_input, chunk_overlap=chunk_overlap)
        _refuse_non_finite(output)
        output = quantization.finish(output, truncate_dim=truncate_dim, normalize=normalize_truncated,
                                     precision=precision, ranges=ranges)
        if single:
            output = output[0]
        return output.numpy() if convert_to_numpy and not convert_to_tensor else output

    def tokenize_inputs(self, sentences, long_input: Optional[str] = None, prompt_name: Optional[str] = None,
                        prompt: Optional[str] = None) -> list[TokenizedRow]:
        """Validate and tokenize encode inputs (one batched tokenizer call); warn about anything truncated.

        long_input: "chunk" keeps every token (rows may exceed max_length; `encode_rows` in chunk mode splits
        them), "truncate" cuts (default: the encoder's `long_input`). prompt_name, prompt: as `encode` takes them."""
        long_input, _ = self._long_input_options(long_input, None)
        pairs = with_prompt(normalize_inputs(sentences), self.resolve_prompt(prompt_name, prompt),
                            explicit=prompt_name is not None or prompt is not None)
        rows, report = self.row_tokenizer.tokenize_pairs(pairs, whole=long_input == "chunk")
        report.warn(self.max_length, self.doc_max_length)
        return rows

    def resolve_prompt(self, prompt_name: Optional[str] = None, prompt: Optional[str] = None) -> Optional[str]:
        """The prompt an encode applies: `prompt`, else `prompts[prompt_name]`, else the default prompt's, else None
        (sentence-transformers' rule, except that passing both is an error rather than a warning)."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("pass prompt= or prompt_name=, not both: prompt is the prompt's text, prompt_name the "
                             "name of one of the model's prompts.")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                known = ", ".join(map(repr, self.prompts)) or "none"
                raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts ({known}); pass "
                                 f"one of them, or the prompt's text as prompt=.")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def _long_input_options(self, long_input: Optional[str], chunk_overlap: Optional[int]) -> tuple[str, int]:
        """long_input and chunk_overlap with None resolved to the encoder's attributes, checked."""
        long_input = self.long_input if long_input is None else long_input
        chunk_overlap = self.chunk_overlap if chunk_overlap is None else chunk_overlap
        check_long_input(long_input, chunk_overlap, self.pooling_mode)
        return long_input, chunk_overlap

    def encode_rows(self, rows: list[TokenizedRow], batch_size: Optional[int] = None, show_progress_bar: bool = False,
                    device: Optional[str] = None, normalize_embeddings: bool = False,
                    max_batch_tokens: Optional[int] = None, long_input: Optional[str] = None,
                    chunk_overlap: Optional[int] = None) -> torch.Tensor:
        """Embeddings (float32, CPU, [len(rows), hidden]) of rows from `tokenize_inputs`, in their order.

        long_input, chunk_overlap: as `encode` (default: the encoder's). In chunk mode a row longer than max_length
        is encoded as windows (chunking.py) that share the token-budget batches with the other rows; its
        embedding is the head of the weighted mean of their pooled vectors.
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
        long_input, chunk_overlap = self._long_input_options(long_input, chunk_overlap)
        windows = split_windows(rows, self.max_length, chunk_overlap) if long_input == "chunk" else whole_windows(rows)
        means = WindowMeans(windows)
        output = torch.empty(len(rows), self.embedding_dim, dtype=torch.float32)
        # One batcher call over the windows of all rows: a long text's windows fill batches like any other rows.
        batches = token_budget_batches([w.length for w in windows], budget, batch_size)
        # bf16 GEMMs on CPU: packed batches rounded up to a multiple of ROUND_TOKENS tokens (see round_up_tokens).
        round_tokens = device.type == "cpu" and self._gemm_dtype() == torch.bfloat16 and \
            self.tokenizer.pad_token_id is not None
        with self._encode_scope.enter(self, device), torch.inference_mode(), \
                tqdm(total=len(rows), desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
            for indices in batches:
                batch_windows = [windows[i] for i in indices]
                batch = self.make_batch([window_row(rows[w.row], w) for w in batch_windows])
                weights = (batch.pool_ends - batch.pool_starts).tolist() if means.chunked else None
                if round_tokens and isinstance(batch, PackedBatch):
                    batch = round_up_tokens(batch, ROUND_TOKENS, self.tokenizer.pad_token_id)
                batch = batch.to(device)
                # The head after combining: a long text's embedding is the head of its windows' mean pooled vector.
                done, pooled = means.add(batch_windows, self.pool(self.hidden_states(batch), batch), weights)
                if not done:
                    continue
                embeddings = self.apply_head(pooled).float()
                if normalize_embeddings:
                    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
                output[torch.tensor(done)] = embeddings.cpu()
                progress.update(len(done))
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
        if self.sentence_transformers is not None:
            raise ValueError(
                f"this encoder was loaded from the sentence-transformers directory "
                f"{self.sentence_transformers.path!r}; save() writes the LLM2Vec layout, which would drop its "
                f"Dense/Normalize head and prompts. Keep (copy) that directory instead.")
        save_encoder(self, output_path, merge_before_save, save_config)


def with_prompt(pairs: list[tuple[str, str]], prompt: Optional[str], explicit: bool) -> list[tuple[str, str]]:
    """`pairs` with `prompt` as the instruction of each text that has none. explicit: the caller named the prompt
    (prompt= or prompt_name=), so a pair's own instruction beside it is ambiguous and refused; a default prompt
    yields to a pair's own instruction."""
    if not prompt:
        return pairs
    if explicit:
        own = next((k for k, (instruction, _) in enumerate(pairs) if instruction), None)
        if own is not None:
            raise ValueError(f"input {own} is an [instruction, text] pair, and a prompt was given too: pass plain "
                             f"strings with prompt=/prompt_name=, or pairs without them.")
    return [(instruction or prompt, text) for instruction, text in pairs]


def _refuse_non_finite(embeddings: torch.Tensor) -> None:
    """A NaN or inf embedding is an error naming the inputs, never a result (as the encode job refuses them)."""
    bad = (~torch.isfinite(embeddings).all(dim=-1)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"the model gave non-finite embeddings (NaN or inf) for {len(bad)} of {len(embeddings)} input(s) "
            f"(indices {shown}): its weights, an adapter or its config (e.g. rope_theta) hold non-finite values, or "
            f"a reduced dtype overflowed. Check the checkpoint, or encode in float32.")

