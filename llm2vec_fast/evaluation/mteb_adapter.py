"""An llm2vec-fast encoder as an `mteb` (2.x) model.

`mteb.evaluate(model, tasks)` accepts any object with the `EncoderProtocol` shape: `encode(inputs, *,
task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs)` where `inputs` is a DataLoader of batches
(dicts whose "text" entry is a list of strings), plus `similarity`, `similarity_pairwise` and `mteb_model_meta`.
`MTEBEncoder` provides that without importing mteb (only `mteb_model_meta` does, when mteb is installed).

Instructions follow LLM2Vec's evaluation: a task's instruction goes on queries, never on documents
(`prompt_type == "document"`); symmetric tasks (STS, classification, clustering: `prompt_type` None) put it on
every text. The instruction is, in order: `instructions[task name]`, `instructions[task type]`, the task's own
prompt from its metadata (a string, or the "query" entry of a dict), else none. Like the reference's MTEB
wrapper, a trailing colon is ensured ("Retrieve relevant passages." -> "Retrieve relevant passages:").
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch


def llm2vec_instruction(instruction: str) -> str:
    """The reference's instruction form: stripped, ending with a colon."""
    instruction = instruction.strip()
    if instruction and not instruction.endswith(":"):
        instruction = instruction.rstrip(".") + ":"
    return instruction


def _prompt_type_value(prompt_type) -> str | None:
    if prompt_type is None:
        return None
    return getattr(prompt_type, "value", prompt_type)


class MTEBEncoder:
    """Wrap an `LLM2Vec` for `mteb.evaluate`.

    encoder: the LLM2Vec to evaluate.
    instructions: task name or task type -> instruction (overrides the task's own prompt); {} to use only the
        tasks' prompts.
    use_task_prompts: fall back to the instruction in the task metadata when `instructions` has none.
    batch_size / max_batch_tokens: passed to `encode`. mteb's own `batch_size` (in its `encode_kwargs`) overrides
        batch_size; without either, batches are filled up to max_batch_tokens.
    show_progress_bar: the default when mteb's `encode_kwargs` do not say.
    name, revision: what results are filed under.
    """

    def __init__(self, encoder, instructions: Mapping[str, str] | None = None, use_task_prompts: bool = True,
                 batch_size: int | None = None, max_batch_tokens: int | None = None, name: str | None = None,
                 revision: str | None = None, device: str | None = None, show_progress_bar: bool = False):
        self.model = encoder
        self.instructions = dict(instructions or {})
        self.use_task_prompts = use_task_prompts
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = device
        self.show_progress_bar = show_progress_bar
        base = str(getattr(encoder.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1]
        self.name = name or f"llm2vec-fast/{base}"
        self.revision = revision or "local"

    # --------------------------------------------------------------------------------------------- protocol

    def instruction_for(self, task_metadata, prompt_type=None) -> str:
        """The instruction for texts of `prompt_type` ("query", "document" or None) in this task."""
        if _prompt_type_value(prompt_type) == "document":
            return ""
        for key in (getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)):
            if key is not None and key in self.instructions:
                return llm2vec_instruction(self.instructions[key])
        if not self.use_task_prompts:
            return ""
        prompt = getattr(task_metadata, "prompt", None)
        if isinstance(prompt, Mapping):
            prompt = prompt.get("query")
        return llm2vec_instruction(prompt) if isinstance(prompt, str) else ""

    def encode(self, inputs: Iterable, *, task_metadata, hf_split: str | None = None, hf_subset: str | None = None,
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        """Embeddings [N, H] (float32) of every text in `inputs` (batches with a "text" list), in order."""
        texts = _texts_of(inputs)
        instruction = self.instruction_for(task_metadata, prompt_type)
        sentences = [[instruction, t] for t in texts] if instruction else texts
        if not sentences:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return self.model.encode(sentences, batch_size=self._batch_size(kwargs),
                                 max_batch_tokens=self.max_batch_tokens, device=self.device,
                                 show_progress_bar=bool(kwargs.get("show_progress_bar", self.show_progress_bar)),
                                 convert_to_numpy=True)

    def _batch_size(self, kwargs) -> int | None:
        """mteb's `encode_kwargs["batch_size"]` when given, else ours: at most that many texts per batch (None
        fills batches up to max_batch_tokens; the DataLoader's own batching only groups what mteb reads)."""
        size = kwargs.get("batch_size")
        return self.batch_size if size is None else size

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix [N1, N2]."""
        a, b = _as_2d(embeddings1), _as_2d(embeddings2)
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of row i with row i: [N]."""
        a, b = _as_2d(embeddings1), _as_2d(embeddings2)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta for the results (None when mteb is not installed)."""
        try:
            from mteb.models.model_meta import ModelMeta
        except ImportError:
            return None
        parameters = sum(p.numel() for p in self.model.parameters())
        return ModelMeta.create_empty(overwrites=dict(
            name=self.name, revision=self.revision, n_parameters=parameters,
            embed_dim=self.model.config.hidden_size, max_tokens=self.model.max_length,
            similarity_fn_name="cosine", use_instructions=True, framework=["PyTorch"]))


def _texts_of(inputs) -> list[str]:
    if isinstance(inputs, str):
        raise TypeError("encode expects batches of texts (a DataLoader of {'text': [...]} dicts), not a string")
    texts: list[str] = []
    for batch in inputs:
        if isinstance(batch, str):
            texts.append(batch)
        elif isinstance(batch, Mapping) and "text" in batch:
            texts.extend(batch["text"])
        else:
            raise TypeError(f"unsupported mteb input batch {type(batch).__name__}: expected a dict with a 'text' "
                            f"list (text tasks only)")
    return texts


def _as_2d(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return x.unsqueeze(0) if x.dim() == 1 else x
