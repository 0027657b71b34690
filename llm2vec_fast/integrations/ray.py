"""Ray Data for llm2vec-fast (`pip install 'llm2vec-fast[ray]'`).

`LLM2VecPredictor` is a callable class for `ray.data.Dataset.map_batches`: Ray builds one per actor, which loads
the encoder once, and calls it on pyarrow batches; each call returns the batch with an `embedding` column (a
fixed-size list of floats) appended:

    import ray
    from llm2vec_fast.integrations.ray import LLM2VecPredictor

    ds = ray.data.read_parquet("corpus/")
    ds = ds.map_batches(LLM2VecPredictor, fn_constructor_kwargs={"model": "smollm2-135m"}, batch_format="pyarrow",
                        concurrency=4, num_gpus=1)   # 4 actors, one GPU each (num_cpus=N for CPU actors)
    ds.write_parquet("embeddings/")

Rows are encoded with the packed engine exactly as `llm2vec-fast encode` encodes a shard (the same tokenization
and the same token-budget slices), so a batch holding a shard's rows gives that shard's embeddings. `encode
--engine ray` (llm2vec_fast/encode_job/ray_engine.py) runs this class over a Parquet or datasets input and writes
the usual resumable, fingerprinted output. Ray itself is imported only by the engine, not here.
"""

from __future__ import annotations

import numpy as np


class LLM2VecPredictor:
    """Encode the rows of pyarrow batches with one LLM2Vec model loaded per instance (per Ray actor).

    model, peft_model: as `llm2vec-fast encode --model / --peft-model` (a directory, a cached hub id, or
    "smollm2-135m"). text_field, instruction_field: the batch's columns (the instruction column is optional; a
    null instruction, or none, means `instruction`). pooling, max_length: override the model's
    llm2vec_config.json. dtype: model weights ("float32", "bfloat16", "float16"). device: default "cuda" when a
    GPU is visible to the actor (Ray sets CUDA_VISIBLE_DEVICES for num_gpus=1), else "cpu". num_threads: torch
    threads of a CPU actor (default: torch's own choice).
    precision, truncate_dim, ranges: as `LLM2Vec.encode` (truncate, normalize, quantize; llm2vec_fast/quantization.py),
    except that int8/uint8 need `ranges` ([2, dim]): each batch calibrating its own would give every batch other
    buckets. embedding_dtype: "float32" or "float16", the older name of precision for those two.
    long_input, chunk_overlap: LLM2Vec's (a text longer than max_length: "truncate" or "chunk" it).
    drop_columns: columns left out of the returned batch (e.g. the texts, which the caller has already).
    A null, empty or whitespace-only text, or a non-finite embedding, raises ValueError naming the row.
    After each call, last_token_counts holds the token count of each row encoded.
    """

    def __init__(self, model: str = "smollm2-135m", *, peft_model: str | None = None, text_field: str = "text",
                 instruction_field: str = "instruction", instruction: str = "", pooling: str | None = None,
                 max_length: int | None = None, dtype: str = "float32", device: str | None = None,
                 normalize: bool = False, max_batch_tokens: int | None = None, num_threads: int | None = None,
                 long_input: str = "truncate", chunk_overlap: int = 0,
                 embedding_column: str = "embedding", embedding_dtype: str | None = None, drop_columns=(),
                 precision: str | None = None, truncate_dim: int | None = None, ranges=None):
        import torch

        from .. import quantization
        from ..encode_job.tables import pyarrow
        from ..encoder import LLM2Vec
        from ..loading import resolve_directory

        self._pa = pyarrow()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder_args = {k: v for k, v in (("pooling_mode", pooling), ("max_length", max_length)) if v is not None}
        self.model = LLM2Vec.from_pretrained(resolve_directory(model, "model"), peft_model_name_or_path=peft_model,
                                             dtype=getattr(torch, dtype), long_input=long_input,
                                             chunk_overlap=chunk_overlap, **encoder_args)
        self.budget = (max_batch_tokens or self.model.max_batch_tokens
                       or self.model.default_batch_tokens(self.device.split(":")[0]))
        self.text_field, self.instruction_field, self.instruction = text_field, instruction_field, instruction
        self.normalize, self.embedding_column = normalize, embedding_column
        self.precision = quantization.resolve_precision(precision, embedding_dtype, ("precision", "embedding_dtype"))
        self.truncate_dim, self.ranges = quantization.check_options(truncate_dim, self.precision, ranges,
                                                                    self.model.embedding_dim)
        if self.precision in quantization.SCALAR and self.ranges is None:
            raise ValueError(f"precision {self.precision!r} needs ranges ([2, dim] per-dimension minima and maxima, "
                             f"e.g. llm2vec_fast.quantization.calibration_ranges of a sample's float32 embeddings): "
                             f"calibrating on each batch would give every batch other buckets.")
        self.drop_columns = set(drop_columns)

    def __call__(self, batch):
        """`batch` (a pyarrow Table, or what Ray hands over) with the embedding column appended."""
        pa = self._pa
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        embeddings = self.embed(table)
        kept = table.drop_columns([c for c in table.column_names if c in self.drop_columns])
        flat = pa.array(embeddings.reshape(-1))
        return kept.append_column(self.embedding_column,
                                  pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1]))

    def embed(self, table) -> np.ndarray:
        """The embeddings of a pyarrow Table's rows, in row order, as stored: [rows, width] in the precision's dtype
        (width: truncate_dim or the embedding dimension; ceil(that / 8) for binary precisions)."""
        import torch

        from .. import quantization
        from ..encode_job.pipeline import Throughput, encode_shard
        from ..encode_job.tables import row_problem

        texts = table.column(self.text_field).to_pylist()
        instructions = (table.column(self.instruction_field).to_pylist()
                        if self.instruction_field in table.column_names else [None] * len(texts))
        for i, text in enumerate(texts):
            problem = row_problem(text, None, False)
            if problem is not None:
                raise ValueError(f"row {self._row_name(table, i)} of the batch: {problem}; filter such rows out "
                                 f"before map_batches (or use encode --skip-bad-lines)")
        pairs = [(self.instruction if q is None else q, t) for q, t in zip(instructions, texts)]
        rows = self.model.tokenize_inputs(pairs) if pairs else []
        self.last_token_counts = [len(row) for row in rows]
        normalize_full, normalize_truncated = quantization.normalize_where(self.normalize, self.truncate_dim)
        embeddings = encode_shard(self.model, rows, device=self.device, normalize=normalize_full,
                                  max_batch_tokens=self.budget, progress=_Silent(), throughput=Throughput())
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        if not bad.size:
            with np.errstate(over="ignore"):
                stored = quantization.finish(torch.from_numpy(embeddings), truncate_dim=self.truncate_dim,
                                             normalize=normalize_truncated, precision=self.precision,
                                             ranges=self.ranges).numpy()
            bad = np.flatnonzero(~np.isfinite(stored).all(axis=1)) if stored.dtype.kind == "f" else bad
        if bad.size:
            raise ValueError(f"non-finite embeddings (NaN or inf) for {bad.size} row(s) of the batch (first: row "
                             f"{self._row_name(table, int(bad[0]))}); check the model and the dtypes")
        return stored

    @staticmethod
    def _row_name(table, i: int) -> str:
        # The input line number when the batch carries one (encode --engine ray adds it), else the batch position.
        return str(table.column("line")[i].as_py()) if "line" in table.column_names else f"{i} (from 0)"


class _Silent:
    """The progress-bar interface encode_shard reports to, doing nothing (actors draw no bars)."""

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        pass
