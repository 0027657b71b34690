"""`export_sentence_transformers` / `llm2vec-fast export`: a directory that sentence-transformers and transformers
load alone, embedding like our encoder.

Plain texts must match to 1e-5 (float32) for every pooling mode sentence-transformers has that we have; named
prompts match as closely as the joint tokenization allows (bounds measured below); plain `AutoModel` must load
the model bidirectionally; what cannot be expressed is refused before anything is written.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main
from llm2vec_fast.export import EXPORT_RECORD, ExportError, export_from_pretrained, export_sentence_transformers
from llm2vec_fast.testing import corpus
from test_encoder import make_adapter

pytest.importorskip("sentence_transformers")
# Said by every export (checked in test_plain_texts_embed_alike_in_sentence_transformers).
pytestmark = pytest.mark.filterwarnings("ignore:texts longer than doc_max_length")

TEXTS = corpus(10, seed=3) + ["a", "the cat sat on the mat and the dog ran quickly to the big red house."]
INSTRUCTIONS = ("Retrieve relevant passages:", "  classify the topic  ")
# Texts of 3 to 15 words: a prompted one-token text pools nothing in sentence-transformers (see below).
PROMPTED_TEXTS = corpus(10, seed=3)


def sentence_transformer(directory):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(directory, device="cpu")


def st_encode(model, texts, **kwargs):
    return torch.as_tensor(model.encode(texts, batch_size=4, **kwargs))


def ours(encoder, inputs, normalize=False):
    return encoder.encode(inputs, show_progress_bar=False, normalize_embeddings=normalize)


@pytest.fixture(scope="module")
def llama_adapter(llama_dir, tmp_path_factory):
    return make_adapter(llama_dir, str(tmp_path_factory.mktemp("adapter")), seed=1)


def read_json(directory, name):
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


# (family, our pooling, skip_instruction) -> sentence-transformers' pooling and include_prompt, and whether the BOS
# is left out of the pool by a WordWeights module.
CASES = {
    ("llama", "mean", True): ("mean", False, True),
    ("llama", "weighted_mean", False): ("weightedmean", True, False),
    ("llama", "last_token", True): ("lasttoken", True, False),
    ("llama", "bos_token", True): ("cls", True, False),
    ("qwen2", "mean", True): ("mean", False, False),  # no BOS: nothing to leave out
    ("qwen2", "weighted_mean", True): ("weightedmean", False, False),
    ("qwen2", "eos_token", True): ("lasttoken", True, False),  # no EOS text appended for qwen2
    ("mistral", "mean", True): ("mean", False, True),  # its sliding window (4) must be switched off
    ("gemma", "mean", True): ("mean", False, True),
}


@pytest.mark.parametrize("family, pooling, skip", list(CASES), ids=lambda v: str(v))
def test_plain_texts_embed_alike_in_sentence_transformers(tiny_model_dirs, tmp_path, family, pooling, skip):
    encoder = LLM2Vec.from_pretrained(tiny_model_dirs[family], pooling_mode=pooling, skip_instruction=skip,
                                      max_length=64)
    output = str(tmp_path / "st")
    with pytest.warns(UserWarning, match="doc_max_length"):
        export_sentence_transformers(encoder, output)
    mode, include_prompt, zero_bos = CASES[family, pooling, skip]
    types = [m["type"].rsplit(".", 1)[1] for m in read_json(output, "modules.json")]
    assert types == ["Transformer"] + ["WordWeights"] * zero_bos + ["Pooling"]
    pooling_config = read_json(output, f"{len(types) - 1}_Pooling/config.json")
    assert [k for k, v in pooling_config.items() if v is True and k != "include_prompt"] == \
        [{"mean": "pooling_mode_mean_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
          "lasttoken": "pooling_mode_lasttoken", "cls": "pooling_mode_cls_token"}[mode]]
    assert pooling_config["include_prompt"] is include_prompt
    config = read_json(output, "config.json")
    assert config["is_causal"] is False and config.get("sliding_window") is None
    model = sentence_transformer(output)
    assert model.max_seq_length == 64
    torch.testing.assert_close(st_encode(model, TEXTS), ours(encoder, TEXTS), atol=1e-5, rtol=0)


def test_a_causal_export_stays_causal_with_its_sliding_window(tiny_model_dirs, tmp_path):
    """enable_bidirectional=False: is_causal stays true and the tiny Mistral's 4-token window stays, as our causal
    path applies it (a bidirectional export clears it, see CASES)."""
    encoder = LLM2Vec.from_pretrained(tiny_model_dirs["mistral"], enable_bidirectional=False)
    output = str(tmp_path / "st")
    export_sentence_transformers(encoder, output)
    config = read_json(output, "config.json")
    assert config["is_causal"] is True and config["sliding_window"] == 4
    torch.testing.assert_close(st_encode(sentence_transformer(output), TEXTS), ours(encoder, TEXTS), atol=1e-5, rtol=0)


def test_automodel_loads_the_export_bidirectionally(llama_dir, tmp_path):
    """Plain transformers (no llm2vec-fast patch) gives our bidirectional hidden states, with and without padding
    (without, transformers skips the mask and attention relies on is_causal alone), under sdpa and eager."""
    from transformers import AutoModel, AutoTokenizer

    from llm2vec_fast.modeling import run_padded

    encoder = LLM2Vec.from_pretrained(llama_dir)
    output = str(tmp_path / "st")
    export_sentence_transformers(encoder, output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.padding_side == "right"
    for texts in (TEXTS[:1], TEXTS[:4]):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = run_padded(encoder.model, batch["input_ids"], batch["attention_mask"], bidirectional=True)
            causal = run_padded(encoder.model, batch["input_ids"], batch["attention_mask"], bidirectional=False)
        valid = batch["attention_mask"].bool()
        for attention in ("sdpa", "eager"):
            model = AutoModel.from_pretrained(output, attn_implementation=attention).eval()
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            torch.testing.assert_close(hidden[valid], expected[valid], atol=1e-5, rtol=0)
            assert (hidden[valid] - causal[valid]).abs().max() > 0.1  # the comparison can tell the two apart


def test_a_merged_lora_adapter_is_exported(llama_dir, llama_adapter, tmp_path):
    adapter = llama_adapter
    output = str(tmp_path / "st")
    export_from_pretrained(llama_dir, output, adapters=[adapter])
    encoder = LLM2Vec.from_pretrained(llama_dir, adapter)
    base = LLM2Vec.from_pretrained(llama_dir)
    exported = st_encode(sentence_transformer(output), TEXTS)
    torch.testing.assert_close(exported, ours(encoder, TEXTS), atol=1e-5, rtol=0)
    assert (exported - ours(base, TEXTS)).abs().max() > 1e-2  # the adapter is in the export


def test_adapters_are_merged_in_order(llama_dir, llama_adapter, tmp_path):
    """Two adapters: the export equals the first export (a plain model folder to our loader too) with the second
    adapter on top."""
    second = make_adapter(llama_dir, str(tmp_path / "second"), seed=3)
    first_export, both = str(tmp_path / "first"), str(tmp_path / "both")
    export_from_pretrained(llama_dir, first_export, adapters=[llama_adapter], pooling_mode="last_token")
    export_from_pretrained(llama_dir, both, adapters=[llama_adapter, second], pooling_mode="last_token")
    expected = ours(LLM2Vec.from_pretrained(first_export, second, pooling_mode="last_token"), TEXTS)
    torch.testing.assert_close(st_encode(sentence_transformer(both), TEXTS), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, pooling, normalize, bound", [
    # last_token reads the row's last position, which the prompt does not move: equal up to float32.
    ("llama", "last_token", False, 1e-5),
    # mean over the text: sentence-transformers counts the prompt's tokens by tokenizing it alone, and the
    # trailing space that our join puts after the instruction is a token of its own there but merges into the
    # text's first word in the joint tokenization, so the text's first token is left out of the pool. The bound
    # is just above the worst cosine distance measured over INSTRUCTIONS x PROMPTED_TEXTS with these tiny random
    # models (0.180 for llama, 0.174 for qwen2, both sentence-transformers versions); a tokenization effect, see
    # docs/export.md for the figures of a real model.
    ("llama", "mean", True, 0.2),
    ("qwen2", "mean", False, 0.2),
])
def test_named_prompts_embed_like_instructions(tiny_model_dirs, tmp_path, family, pooling, normalize, bound):
    encoder = LLM2Vec.from_pretrained(tiny_model_dirs[family], pooling_mode=pooling)
    output = str(tmp_path / "st")
    prompts = {f"task{i}": text for i, text in enumerate(INSTRUCTIONS)}
    export_sentence_transformers(encoder, output, normalize=normalize, prompts=prompts, default_prompt_name="task0")
    config = read_json(output, "config_sentence_transformers.json")
    assert config["prompts"]["task1"] == "classify the topic " and config["default_prompt_name"] == "task0"
    model = sentence_transformer(output)
    for name, instruction in prompts.items():
        expected = ours(encoder, [[instruction, text] for text in PROMPTED_TEXTS], normalize=normalize)
        got = st_encode(model, PROMPTED_TEXTS, prompt_name=name)
        if pooling == "last_token":
            torch.testing.assert_close(got, expected, atol=bound, rtol=0)
        else:
            assert (1 - torch.nn.functional.cosine_similarity(got, expected)).max() < bound
    # The default prompt applies when encode names none.
    torch.testing.assert_close(st_encode(model, TEXTS[:3]), st_encode(model, TEXTS[:3], prompt_name="task0"))


@pytest.mark.parametrize("family, kwargs, export_kwargs, message", [
    ("llama", dict(pooling_mode="weighted_mean"), {}, "weightedmean weighs each token by its position in the row"),
    ("llama", dict(pooling_mode="eos_token"), {}, r"as '' \+ text \+ ' </s>'"),
    ("qwen2", dict(pooling_mode="bos_token"), {}, "adds none"),
    ("llama", dict(), dict(prompts={"q": "find:"}), "pass normalize=True"),
    ("qwen2", dict(pooling_mode="weighted_mean"), dict(prompts={"q": "find:"}), "weights would start after"),
    ("llama", dict(), dict(prompts={"q": "find:"}, default_prompt_name="p", normalize=True), "names no prompt"),
], ids=["weighted-mean-after-bos", "eos-text-template", "bos-without-bos", "prompts-with-bos-weights",
        "weighted-mean-prompts", "unknown-default-prompt"])
def test_what_cannot_be_expressed_is_refused_before_writing(tiny_model_dirs, tmp_path, family, kwargs,
                                                            export_kwargs, message):
    encoder = LLM2Vec.from_pretrained(tiny_model_dirs[family], **kwargs)
    with pytest.raises(ExportError, match=message):
        export_sentence_transformers(encoder, str(tmp_path / "st"), **export_kwargs)
    assert os.listdir(tmp_path) == []


def test_a_template_chosen_by_hub_name_is_refused(llama_dir, tmp_path):
    encoder = LLM2Vec.from_pretrained(llama_dir)
    encoder.config._name_or_path = "mistralai/Mistral-7B-Instruct-v0.2"  # as loaded by that hub id
    with pytest.raises(ExportError, match=r"as '\[INST\] ' \+ text \+ ' \[/INST\]'.*chosen by the hub name"):
        export_sentence_transformers(encoder, str(tmp_path / "st"))
    assert os.listdir(tmp_path) == []


def test_an_output_that_is_not_an_earlier_export_is_kept(llama_dir, tmp_path):
    encoder = LLM2Vec.from_pretrained(llama_dir, pooling_mode="last_token")
    output = tmp_path / "st"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_sentence_transformers(encoder, str(output))
    with pytest.raises(FileExistsError, match="files an export did not write"):
        export_sentence_transformers(encoder, str(output), overwrite=True)
    assert os.listdir(output) == ["notes.txt"]
    (output / "notes.txt").unlink()
    export_sentence_transformers(encoder, str(output))
    export_sentence_transformers(encoder, str(output), overwrite=True, normalize=True)
    assert "2_Normalize" in os.listdir(output) and EXPORT_RECORD in os.listdir(output)
    assert sorted(os.listdir(tmp_path)) == ["st"]  # no staging left beside it


# Runs in a fresh interpreter with sentence-transformers alone: prints the embeddings and whether anything of
# llm2vec-fast was imported.
ST_ALONE = """
import json, sys
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
texts = json.loads(sys.argv[2])
result = {"plain": model.encode(texts).tolist(), "query": model.encode(texts, prompt_name="query").tolist(),
          "llm2vec_fast": sorted(m for m in sys.modules if m.startswith("llm2vec_fast"))}
print(json.dumps(result))
"""


def test_the_cli_export_loads_in_sentence_transformers_alone(llama_dir, llama_adapter, tmp_path, capsys):
    adapter = llama_adapter
    output = str(tmp_path / "st")
    argv = ["export", "--model", llama_dir, "--adapter", adapter, "--output", output, "--pooling", "last_token",
            "--normalize", "--prompt", "query=Retrieve relevant passages:", "--max-length", "48"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"exported to {os.path.abspath(output)}" in captured.out and "doc_max_length" in captured.err
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-c", ST_ALONE, output, json.dumps(TEXTS)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["llm2vec_fast"] == []
    encoder = LLM2Vec.from_pretrained(llama_dir, adapter, pooling_mode="last_token", max_length=48)
    torch.testing.assert_close(torch.tensor(found["plain"]), ours(encoder, TEXTS, normalize=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(found["query"]),
        ours(encoder, [["Retrieve relevant passages:", text] for text in TEXTS], normalize=True), atol=1e-5, rtol=0)


def test_cli_refusals_are_one_line(llama_dir, tmp_path, capsys):
    output = str(tmp_path / "st")
    assert main(["export", "--model", llama_dir, "--output", output, "--prompt", "nameless"]) == 1
    assert "write NAME=INSTRUCTION" in capsys.readouterr().err
    assert main(["export", "--model", llama_dir, "--output", output, "--pooling", "eos_token"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("llm2vec-fast: error: ") and "cannot be exported" in last
    assert "--pooling 'last_token'" in last
    assert not os.path.exists(output)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text"])
def test_bidirectional_sliding_windows_survive_the_export(tmp_path, family):
    """Our bidirectional Qwen3 / Gemma 2 / Gemma 3 keep their sliding windows (8 tokens, shorter than the texts):
    the export states them so that sentence-transformers alone attends over the same keys."""
    import transformers
    from llm2vec_fast.testing import build_model_dir

    if family == "gemma2" and tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25):
        pytest.skip("transformers < 5.25 builds causal masks for Gemma 2 whatever its config says (the export warns)")
    encoder = LLM2Vec.from_pretrained(build_model_dir(str(tmp_path / family), family), max_length=64,
                                      dtype=torch.float32)
    output = str(tmp_path / "st")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_sentence_transformers(encoder, output)
    assert read_json(output, "config.json")["sliding_window"] is not None
    texts = TEXTS + [" ".join(["the big dog ran to the river"] * 4)]
    torch.testing.assert_close(st_encode(sentence_transformer(output), texts), ours(encoder, texts), atol=1e-5,
                               rtol=0)
