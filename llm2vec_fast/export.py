"""Writing an encoder as a sentence-transformers directory that plain sentence-transformers and transformers load.

The directory holds the merged Hugging Face model and its tokenizer at the root (the Transformer module's path)
and sentence-transformers' module files: `modules.json` (Transformer, [WordWeights,] Pooling[, Normalize]),
`1_Pooling/config.json`, `sentence_bert_config.json` and `config_sentence_transformers.json` (named prompts,
cosine similarity). Loading it needs neither llm2vec-fast nor trust_remote_code:

- Bidirectional attention survives a plain `AutoModel` load through `is_causal: false` in config.json, which
  transformers >= 5.2 honours (its model-input decorator passes it to every attention call and mask builder;
  checked on 5.17 and 5.25, tests/test_export.py). Gemma also gets `use_bidirectional_attention: true`.
  Sliding windows are switched off in the config, because our bidirectional encoder attends over the whole text.
- Our pooling reads the text's tokens only: the tokenizer's BOS and the instruction are attended to but not
  pooled. sentence-transformers excludes a prompt from pooling with `include_prompt: false`, but it can exclude
  a BOS only as part of a prompt, and a plain input has none. For mean pooling the BOS is therefore given weight
  0 by a `WordWeights` module (a built-in module that scales each token's vector by a weight per token id), which
  makes plain texts equal to ours. With a prompt, WordWeights' weight sum still counts the prompt's tokens, so a
  prompted vector is ours times n_text / (n_text + n_prompt): the same direction, so prompts are written only
  with normalize=True, whose Normalize module makes the vectors equal.
- An instruction becomes a named prompt: our join writes ``instruction.strip() + " " + text``, so the prompt is
  the stripped instruction plus one space, and the model sees the same string. sentence-transformers counts the
  prompt's tokens by tokenizing it alone; where the tokenizer merges that trailing space into the text's first
  word (byte-level BPE and SentencePiece do), it counts one token more and leaves the text's first token out of
  the pool. docs/export.md gives the measured difference.

What cannot be expressed is refused (`ExportError`, naming the setting and what to use instead): the reference's
prompt templates (chosen by hub name, or the EOS text eos_token pooling appends for Llama and Mistral: a suffix,
where sentence-transformers has only prefixes), weighted_mean after a BOS or with prompts, prompts with mean
pooling after a BOS unless normalized, bos_token pooling without a BOS, a Dense head. Two differences that concern
long texts only are warned about: our doc_max_length word shortening and long_input="chunk" (sentence-transformers
cuts at max_seq_length tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass

from .files import recorded_names, remove_entry, staging_beside

# What an export writes besides the model, tokenizer and module folders; the record lists every top-level name an
# export wrote, so that `overwrite` replaces an earlier export and nothing else.
EXPORT_RECORD = ".llm2vec-fast-export.json"
MODULES_FILE = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
# Module type names as sentence-transformers before 6.0 wrote them and as most published models carry them: 6.x
# loads them (tests/test_export.py), and tools that read a directory's modules.json by name know them.
_TYPES = {"Transformer": "sentence_transformers.models.Transformer",
          "WordWeights": "sentence_transformers.models.WordWeights",
          "Pooling": "sentence_transformers.models.Pooling",
          "Normalize": "sentence_transformers.models.Normalize"}
# Our pooling modes -> sentence-transformers' (its legacy boolean key is pooling_mode_<name> [+ "_tokens"]).
ST_POOLING = {"mean": "mean", "weighted_mean": "weightedmean", "last_token": "lasttoken", "eos_token": "lasttoken",
              "bos_token": "cls"}
_LEGACY_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                        "max": "pooling_mode_max_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                        "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


class ExportError(ValueError):
    """The encoder has a setting that a sentence-transformers directory cannot express; the message says which
    and what to use instead."""


@dataclass(frozen=True)
class PoolingPlan:
    """How our pooling is written for sentence-transformers.

    mode: sentence-transformers' pooling_mode. include_prompt: whether a prompt's tokens are pooled.
    zero_bos: a WordWeights module gives the BOS token weight 0 (mean over the text after a BOS).
    prompts_refused: why named prompts cannot be expressed (None: they can).
    """

    mode: str
    include_prompt: bool
    zero_bos: bool
    prompts_refused: str | None = None


def pooling_plan(encoder, normalize: bool) -> PoolingPlan:
    """The sentence-transformers pooling equal to `encoder`'s (an LLM2Vec), or ExportError."""
    pooling, skip = encoder.pooling_mode, encoder.skip_instruction
    row_tokenizer = encoder.row_tokenizer
    _refuse_template(encoder)
    adds_bos = row_tokenizer.adds_bos
    if pooling == "mean":
        zero_bos = skip and adds_bos
        refused = None
        if zero_bos and not normalize:
            refused = ("with mean pooling after a BOS token, sentence-transformers' WordWeights module (which leaves "
                       "the BOS out of the pool) divides a prompted input by its prompt's tokens as well, so the "
                       "vector is ours times n_text / (n_text + n_prompt); pass normalize=True (--normalize) to "
                       "write the prompts with a Normalize module, which makes them equal")
        return PoolingPlan("mean", include_prompt=not skip, zero_bos=zero_bos, prompts_refused=refused)
    if pooling == "weighted_mean":
        if skip and adds_bos:
            raise ExportError(
                "weighted_mean pooling over the text after a BOS token cannot be written for sentence-transformers: "
                "its weightedmean weighs each token by its position in the row (the BOS is position 1), ours by "
                "its position in the text. Export with pooling_mode='mean', or with skip_instruction=False (the "
                "whole row, BOS included, which sentence-transformers computes alike).")
        refused = ("weighted_mean weighs the text's tokens from 1; sentence-transformers keeps a prompted token's "
                   "position in the row, so the weights would start after the prompt") if skip else None
        return PoolingPlan("weightedmean", include_prompt=not skip, zero_bos=False, prompts_refused=refused)
    if pooling == "bos_token" and not adds_bos:
        raise ExportError("bos_token pooling needs a tokenizer that adds a BOS token, and this one adds none; "
                          "export with another pooling_mode.")
    # last_token / eos_token: the row's last token; bos_token: its first. Neither moves with a prompt, so the
    # prompt stays in the row's pooled positions (include_prompt false would make `cls` read the text's first).
    return PoolingPlan(ST_POOLING[pooling], include_prompt=True, zero_bos=False)


def _refuse_template(encoder) -> None:
    from .prompts import SEPARATOR, apply_template

    probe = SEPARATOR + "text"
    name = encoder.config._name_or_path
    wrapped = apply_template(probe, name, encoder.config.model_type, encoder.pooling_mode)
    if wrapped == probe:
        return
    before, _, after = wrapped.partition(probe.strip())
    if apply_template(probe, name, encoder.config.model_type, "mean") != probe:  # not only eos_token's EOS text
        hint = ("The template is chosen by the hub name: a model loaded from its local folder gets none, which "
                "is right only if it was trained without the template.")
    else:
        hint = ("It is the EOS text of eos_token pooling; export with pooling_mode='last_token' only if the model "
                "was trained that way.")
    raise ExportError(f"the llm2vec reference wraps every input of {name!r} ({encoder.config.model_type}, "
                      f"{encoder.pooling_mode} pooling) as {before!r} + text + {after!r}; sentence-transformers can "
                      f"only put a prompt before the text, so this encoder cannot be exported. {hint}")


def instruction_prompt(instruction: str) -> str:
    """The sentence-transformers prompt of an instruction: what our join puts before the text (the instruction
    stripped, then one space); empty for an empty instruction."""
    stripped = instruction.strip()
    return f"{stripped} " if stripped else ""


def export_sentence_transformers(encoder, output_dir, *, normalize: bool = False, prompts: dict | None = None,
                                 default_prompt_name: str | None = None, overwrite: bool = False) -> list[str]:
    """Write `encoder` (an LLM2Vec) to `output_dir` as a sentence-transformers directory; return the warnings said.

    normalize: append a Normalize module (unit-length embeddings). prompts: name -> instruction, written as named
    prompts (see `instruction_prompt`); ``SentenceTransformer(dir).encode(texts, prompt_name=name)`` then embeds
    like ``encoder.encode([[instruction, text], ...])``. default_prompt_name: the prompt used when encode names
    none. overwrite: replace an earlier export in `output_dir` (a directory holding anything else is refused).

    An adapter loaded unmerged is merged into the encoder's model first (in place, as `LLM2Vec.save` with
    merge_before_save does). Settings that cannot be expressed raise ExportError before anything is written.
    """
    prompts = dict(prompts or {})
    check_prompts(prompts, default_prompt_name)
    if encoder.head is not None:
        raise ExportError("the encoder has a head after pooling (Dense layers), which export does not write yet; "
                          "export an encoder without one.")
    from .modeling import is_bidirectional

    plan = pooling_plan(encoder, normalize)
    if prompts and plan.prompts_refused:
        raise ExportError(f"named prompts cannot be exported for this encoder: {plan.prompts_refused}.")
    output_dir = os.fspath(output_dir)
    check_output_directory(output_dir, overwrite)
    said = _long_text_warnings(encoder)
    if prompts and not plan.include_prompt:
        said.append("sentence-transformers counts a prompt's tokens by tokenizing it alone; where the tokenizer "
                    "merges the space after the instruction into the text's first word (byte-level BPE and "
                    "SentencePiece do), that token is left out of the pool, so prompted embeddings differ from "
                    "ours (and a one-token text pools nothing); docs/export.md gives the measured difference.")
    if encoder.config.model_type == "gemma2" and is_bidirectional(encoder.model):
        said.append("a bidirectional Gemma 2 export loads bidirectionally with transformers 5.25 (tested); "
                    "transformers 5.17 still builds causal masks for Gemma 2 whatever its config says, so load it "
                    "with a recent transformers (docs/export.md).")
    for message in said:
        warnings.warn(message, stacklevel=2)
    _merge_adapters(encoder)
    staging = staging_beside(output_dir, "exporting")
    try:
        _write_model(encoder, staging)
        _write_tokenizer(encoder, staging)
        _write_modules(encoder, staging, plan, normalize)
        _write_st_config(staging, {name: instruction_prompt(text) for name, text in prompts.items()},
                         default_prompt_name)
        with open(os.path.join(staging, EXPORT_RECORD), "w") as f:
            json.dump(sorted(os.listdir(staging)), f)
        _usual_modes(staging)
        _install(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return said


def check_prompts(prompts: dict, default_prompt_name: str | None) -> None:
    """Refuse prompt names and values that are not strings, and a default that names no prompt."""
    for name, text in prompts.items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise ExportError(f"prompts must map non-empty names to instruction strings, got {name!r}: {text!r}.")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ExportError(f"default_prompt_name {default_prompt_name!r} names no prompt; the prompts are "
                          f"{sorted(prompts) or 'none'}.")


def check_output_directory(output_dir: str, overwrite: bool) -> None:
    """Refuse an output that is a file or a symlink, or a non-empty directory unless `overwrite` and it holds
    only what an earlier export wrote. Raises FileExistsError."""
    if os.path.islink(output_dir):
        raise FileExistsError(f"output {output_dir!r} is a symlink; pass the real directory.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output {output_dir!r} is a file; pass a directory.")
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output {output_dir!r} is not empty ({_listing(entries)}); choose a new directory, "
                              f"or pass overwrite=True (--overwrite) to replace an earlier export there.")
    written = recorded_names(output_dir, EXPORT_RECORD)
    foreign = [name for name in entries if name not in written and name != EXPORT_RECORD]
    if foreign:
        raise FileExistsError(f"output {output_dir!r} holds files an export did not write ({_listing(foreign)}); "
                              f"overwrite replaces only an earlier export. Choose a new or empty directory.")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _usual_modes(directory: str) -> None:
    """Give the export's files and folders the modes a plain open() / mkdir() gives: save_pretrained writes the
    weights 0600, which a server running as another user (a container) could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for root, folders, names in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _install(staging: str, output_dir: str) -> None:
    """Put the finished export in place of `output_dir` (absent, empty, or an earlier export checked above)."""
    if os.path.isdir(output_dir):
        old = staging_beside(output_dir, "replaced")
        os.rmdir(old)
        os.rename(output_dir, old)  # the earlier export moves aside whole; removed once the new one is in place
        os.rename(staging, output_dir)
        remove_entry(old)
    else:
        os.rename(staging, output_dir)


def _long_text_warnings(encoder) -> list[str]:
    said = [f"texts longer than doc_max_length={encoder.doc_max_length} tokens embed differently in the export: "
            f"llm2vec-fast shortens them to whole words (the reference's rule), sentence-transformers cuts every "
            f"input at max_seq_length={encoder.max_length} tokens. Shorter texts are unaffected."]
    if getattr(encoder, "long_input", "truncate") != "truncate":
        said.append(f"long_input={encoder.long_input!r} is not exported: sentence-transformers truncates a text "
                    f"longer than max_seq_length={encoder.max_length} tokens instead of embedding all of it.")
    return said


def _merge_adapters(encoder) -> None:
    from peft import PeftModel

    if isinstance(encoder.model, PeftModel):
        encoder.model = encoder.model.merge_and_unload()


# ----------------------------------------------------------------------------------------------- the files


def export_config(config: dict, bidirectional: bool, window: int | None = None) -> dict:
    """The config.json of the export: `config` (the decoder's saved config) made to load as our encoder runs.

    bidirectional: the encoder attends both ways; `is_causal: false` makes transformers >= 5.2 build
    bidirectional masks and run non-causal attention in a plain AutoModel load, and Gemma's own flag sets its
    attention modules' is_causal. window: what our bidirectional sliding layers see (query i, key j iff
    |i - j| < window; `bidirectional_window`), or None. With a window (Qwen3, Gemma 2, Gemma 3), the config states
    window - 1, since transformers' generic bidirectional sliding mask keeps |i - j| <= sliding_window; Gemma 3's
    own flag is left off, as it would halve the window on load. Without one (none, or Mistral's, which our
    bidirectional attention ignores) sliding windows are cleared. A causal export keeps the config's window, which
    our causal path applies as transformers does (tests/test_export.py).
    """
    config = dict(config)
    config["is_causal"] = not bidirectional
    if bidirectional:
        if config.get("model_type") == "gemma":
            config["use_bidirectional_attention"] = True
        if window is not None:
            config["sliding_window"] = window - 1
            if config.get("model_type") == "gemma3_text":
                config["use_bidirectional_attention"] = False
        else:
            if config.get("sliding_window") is not None:
                config["sliding_window"] = None
            if config.get("use_sliding_window"):
                config["use_sliding_window"] = False
            if isinstance(config.get("layer_types"), list):
                config["layer_types"] = ["full_attention"] * len(config["layer_types"])
    for key in ("attn_implementation", "_attn_implementation"):
        config.pop(key, None)  # ours is registered only inside llm2vec-fast
    return config


def _write_model(encoder, directory: str) -> None:
    from .modeling import base_model, is_bidirectional

    decoder = base_model(encoder.model)
    decoder.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    bidirectional = is_bidirectional(encoder.model)
    window = bidirectional_window(decoder) if bidirectional else None
    with open(path, "w", encoding="utf-8") as f:
        json.dump(export_config(config, bidirectional, window), f, indent=2, sort_keys=True)
        f.write("\n")


def bidirectional_window(decoder) -> int | None:
    """The kernels' window of `decoder`'s sliding layers in bidirectional mode (None: no sliding layer, or a window
    the family ignores when bidirectional)."""
    from .modeling import family_of, kernel_window, module_window, stated_noncausal

    family = family_of(decoder.config)
    for module in decoder.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx") and module_window(module) is not None:
            window = kernel_window(family, module_window(module), False, stated_noncausal(module))
            if window is not None and window < 2:
                raise ExportError(f"a bidirectional sliding window of {window} token cannot be stated in a config "
                                  f"that transformers reads as |i - j| <= sliding_window; export this model causal.")
            return window
    return None


def _write_tokenizer(encoder, directory: str) -> None:
    encoder.tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    # Right padding: sentence-transformers 6.0's weightedmean counts positions from the row's start, and the
    # model's default position ids count from there too. model_max_length is what 6.x reads as max_seq_length.
    config.update(padding_side="right", model_max_length=encoder.max_length)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_modules(encoder, directory: str, plan: PoolingPlan, normalize: bool) -> None:
    hidden = encoder.config.hidden_size
    modules = [("Transformer", "")]
    # sentence_bert_config.json: max_seq_length as every release reads it (6.x also reads the tokenizer's
    # model_max_length, written above), no lower-casing.
    _write_json(os.path.join(directory, TRANSFORMER_CONFIG), {"max_seq_length": encoder.max_length,
                                                              "do_lower_case": False})
    if plan.zero_bos:
        modules.append(("WordWeights", "1_WordWeights"))
        _write_json(os.path.join(directory, modules[-1][1], "config.json"), _bos_word_weights(encoder.tokenizer))
    modules.append(("Pooling", f"{len(modules)}_Pooling"))
    pooling = {"word_embedding_dimension": hidden}
    pooling.update({key: plan.mode == name for name, key in _LEGACY_POOLING_KEYS.items()})
    pooling["include_prompt"] = plan.include_prompt
    _write_json(os.path.join(directory, modules[-1][1], "config.json"), pooling)
    if normalize:
        modules.append(("Normalize", f"{len(modules)}_Normalize"))
        _write_json(os.path.join(directory, modules[-1][1], "config.json"), {})
    _write_json(os.path.join(directory, MODULES_FILE),
                [{"idx": i, "name": str(i), "path": path, "type": _TYPES[kind]}
                 for i, (kind, path) in enumerate(modules)])


def _bos_word_weights(tokenizer) -> dict:
    """WordWeights' config: weight 0 for the BOS token, 1 for every other id.

    WordWeights looks each vocabulary entry up in word_weights, and then its lower-case form, so an entry other
    than the BOS whose lower-case form is the BOS's string would get 0 too: refused here rather than written."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    bos = tokenizer.bos_token
    zero = [i for i, token in enumerate(vocab) if token == bos or (token or "").lower() == bos]
    if zero != [tokenizer.bos_token_id]:
        raise ExportError(f"the tokenizer's vocabulary has entries besides the BOS {bos!r} that sentence-transformers' "
                          f"WordWeights would weigh like it (ids {zero[:5]}); this vocabulary cannot be exported with "
                          f"mean pooling that leaves the BOS out. Export with pooling_mode='last_token'.")
    return {"vocab": [token or "" for token in vocab], "word_weights": {bos: 0.0}, "unknown_word_weight": 1.0}


def _write_st_config(directory: str, prompts: dict, default_prompt_name: str | None) -> None:
    from . import __version__

    _write_json(os.path.join(directory, ST_CONFIG), {
        "__version__": {"llm2vec_fast": __version__},
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    })


# ------------------------------------------------------------------------------------------- from files


def export_from_pretrained(model: str, output_dir, *, adapters=(), normalize: bool = False,
                           prompts: dict | None = None, default_prompt_name: str | None = None,
                           overwrite: bool = False, **encoder_kwargs) -> list[str]:
    """Load `model` with `adapters` applied and merged in order, then `export_sentence_transformers` it.

    encoder_kwargs go to `LLM2Vec.from_pretrained` (pooling_mode, max_length, doc_max_length, skip_instruction,
    dtype, enable_bidirectional, ...); encoder defaults not given come from the last adapter's
    llm2vec_config.json, else the model's. The output is checked before anything loads.
    """
    from .adapters import apply_adapter
    from .encoder import LLM2Vec
    from .loading import ENCODER_ARGS, read_llm2vec_config, resolve_directory

    check_prompts(dict(prompts or {}), default_prompt_name)
    check_output_directory(os.fspath(output_dir), overwrite)
    adapters = [os.fspath(a) for a in adapters]
    encoder = LLM2Vec.from_pretrained(model, adapters[0] if adapters else None, merge_peft=True, **encoder_kwargs)
    for adapter in adapters[1:]:
        directory = resolve_directory(adapter, "adapter")
        encoder.model = apply_adapter(encoder.model, directory, merge=True)
        for key, value in read_llm2vec_config(directory).items():
            if key in ENCODER_ARGS and encoder_kwargs.get(key) is None:
                setattr(encoder, key, value)
    return export_sentence_transformers(encoder, output_dir, normalize=normalize, prompts=prompts,
                                        default_prompt_name=default_prompt_name, overwrite=overwrite)
