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
    threads of a CPU actor (default: torch's own choice). embedding_dtype: "float32" or "float16".
    drop_columns: columns left out of the returned batch (e.g. the texts, which the caller has already).
    A null, empty or whitespace-only text, or a non-finite embedding, raises ValueError naming the row.
    After each call, last_token_counts holds the token count of each row encoded.
    """

    def __init__(self, model: str = "smollm2-135m", *, peft_model: str | None = None, text_field: str = "text",
                 instruction_field: str = "instruction", instruction: str = "", pooling: str | None = None,
                 max_length: int | None = None, dtype: str = "float32", device: str | None = None,
                 normalize: bool = False, max_batch_tokens: int | None = None, num_threads: int | None = None,
                 embedding_column: str = "embedding", embedding_dtype: str = "float32", drop_columns=()):
        import torch

        from ..encode_job.tables import pyarrow
        from ..encoder import LLM2Vec
        from ..loading import resolve_directory

        self._pa = pyarrow()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder_args = {k: v for k, v in (("pooling_mode", pooling), ("max_length", max_length)) if v is not None}
        self.model = LLM2Vec.from_pretrained(resolve_directory(model, "model"), peft_model_name_or_path=peft_model,
                                             dtype=getattr(torch, dtype), **encoder_args)
        self.budget = (max_batch_tokens or self.model.max_batch_tokens
                       or self.model.default_batch_tokens(self.device.split(":")[0]))
        self.text_field, self.instruction_field, self.instruction = text_field, instruction_field, instruction
        self.normalize, self.embedding_column = normalize, embedding_column
        self.embedding_dtype = np.dtype(embedding_dtype)
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
        """The embeddings [rows, hidden] of a pyarrow Table's rows, in row order, in embedding_dtype."""
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
        embeddings = encode_shard(self.model, rows, device=self.device, normalize=self.normalize,
                                  max_batch_tokens=self.budget, progress=_Silent(), throughput=Throughput())
        with np.errstate(over="ignore"):
            stored = embeddings.astype(self.embedding_dtype, copy=False)
        bad = np.flatnonzero(~np.isfinite(stored).all(axis=1))
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
