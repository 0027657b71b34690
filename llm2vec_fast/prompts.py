"""Instruction joining and the per-model prompt templates of the llm2vec reference (0.2.3).

The reference joins an instruction and a text with a separator string, wraps the joined string in a prompt
template chosen by the model's `config._name_or_path`, and later uses the separator to tell the text's tokens
from the instruction's. We keep the same strings so embeddings match, and locate the text by character offset.
"""

from __future__ import annotations

SEPARATOR = "!@#$%^&*()"

# name_or_path -> (prefix, suffix) around the stripped joined string, as the reference hard-codes them. Only
# Llama-3-Instruct's template is final; the others still get the EOS suffix in eos_token pooling.
_FINAL_TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
}
_CHAT_TEMPLATES = {
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# In eos_token pooling the reference appends an EOS text to the stripped string.
_EOS_SUFFIX_BY_NAME = {"meta-llama/Meta-Llama-3-8B": "<|end_of_text|>"}
_EOS_SUFFIX_BY_MODEL_TYPE = {"llama": " </s>", "mistral": " </s>"}


def join_instruction(instruction: str, text: str) -> str:
    """The reference's joined form: ``"instruction SEP text"``, or ``"SEP text"`` without an instruction."""
    return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def apply_template(joined: str, name_or_path: str, model_type: str, pooling_mode: str) -> str:
    """Wrap a joined string in the reference's template for this model (a no-op for unknown models)."""
    if name_or_path in _FINAL_TEMPLATES:
        prefix, suffix = _FINAL_TEMPLATES[name_or_path]
        return prefix + joined.strip() + suffix
    if name_or_path in _CHAT_TEMPLATES:
        prefix, suffix = _CHAT_TEMPLATES[name_or_path]
        joined = prefix + joined.strip() + suffix
    if pooling_mode == "eos_token":
        if name_or_path in _EOS_SUFFIX_BY_NAME:
            return joined.strip() + _EOS_SUFFIX_BY_NAME[name_or_path]
        if model_type in _EOS_SUFFIX_BY_MODEL_TYPE:
            return joined.strip() + _EOS_SUFFIX_BY_MODEL_TYPE[model_type]
    return joined


def split_separator(prepared: str) -> tuple[str, int]:
    """Remove the separator; return the string the model sees and the character index where the text starts.

    Without a separator (a raw string passed to `tokenize`) the whole string counts as text, as in the reference
    training path -- but starting after nothing, so instruction-free inputs pool over all their tokens.
    """
    index = prepared.find(SEPARATOR)
    if index < 0:
        return prepared, 0
    return prepared[:index] + prepared[index + len(SEPARATOR):], index
