"""Reliability of the Python API: saves that reload exactly, no silently wrong embeddings, checked weights,
thread-safe encoding and clear errors for bad values (issue 12)."""

import json
import os
import random
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.tokenization import RowTokenizer
from test_encoder import TEXTS, encode, load, make_adapter

CJK = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可自之年生会那后能对着事其里所去行过家十用发天如然作方成者多日都三小"


def tiny_lora(base_dir, out_dir, dropout=0.0, seed=0):
    """A LoRA adapter with non-zero weights (and optional dropout) on every projection of the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base_dir
    with open(config_path, "w") as f:
        json.dump(config, f)
    return out_dir


def copy_model(source, destination):
    shutil.copytree(source, destination)
    return str(destination)


# ------------------------------------------------------------------------------------------------------ save


def test_merged_save_over_an_adapter_save_reloads_the_merged_model(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    model = load(llama_dir, peft_model_name_or_path=adapter)
    target = tmp_path / "saved"
    model.save(str(target))
    (target / "notes.txt").write_text("the user's own file")
    model.save(str(target), merge_before_save=True)
    assert torch.equal(encode(load(str(target)), TEXTS), encode(model, TEXTS))  # not the adapter applied twice
    assert not (target / "adapter_config.json").exists() and not (target / "adapter_model.safetensors").exists()
    assert (target / "notes.txt").read_text() == "the user's own file"


def test_adapter_save_over_a_merged_save_reloads_the_adapter(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    target = tmp_path / "saved"
    merged = load(llama_dir, peft_model_name_or_path=adapter, merge_peft=True)
    merged.save(str(target))
    unmerged = load(llama_dir, peft_model_name_or_path=adapter)
    unmerged.save(str(target))
    assert not (target / "model.safetensors").exists()  # else the adapter would be applied over merged weights
    reloaded = load(llama_dir, peft_model_name_or_path=str(target))
    assert torch.equal(encode(reloaded, TEXTS), encode(unmerged, TEXTS))
    # The directory alone is the released layout (base config + adapter): it loads with the adapter merged.
    torch.testing.assert_close(encode(load(str(target)), TEXTS), encode(unmerged, TEXTS), atol=1e-5, rtol=1e-4)


def test_save_without_config_removes_a_stale_one(llama_dir, tmp_path):
    target = tmp_path / "saved"
    load(llama_dir, pooling_mode="weighted_mean").save(str(target))
    model = load(llama_dir)
    model.save(str(target), save_config=False)
    assert not (target / "llm2vec_config.json").exists()
    assert load(str(target)).pooling_mode == "mean"


def test_save_never_writes_through_a_planted_symlink(llama_dir, tmp_path):
    victim = tmp_path / "elsewhere" / "precious.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    target = tmp_path / "saved"
    target.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "llm2vec_config.json"):
        os.symlink(victim, target / name)
    model = load(llama_dir)
    model.save(str(target))
    assert victim.read_bytes() == b"precious"
    assert not any(os.path.islink(target / name) for name in os.listdir(target))
    assert torch.equal(encode(load(str(target)), TEXTS), encode(model, TEXTS))
    assert [p for p in os.listdir(tmp_path) if ".saving-" in p] == []  # no staging directory left behind


def test_save_removes_what_a_killed_save_left(llama_dir, tmp_path):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    abandoned = tmp_path / f".saved.saving-{dead_pid}-0123456789ab"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half written")
    other = tmp_path / f".other.saving-{dead_pid}-0123456789ab"  # another destination's: not ours to judge
    other.mkdir()
    load(llama_dir).save(str(tmp_path / "saved"))
    assert not abandoned.exists() and other.exists()


def test_save_into_a_file_is_refused(llama_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        load(llama_dir).save(str(tmp_path / "file"))


# ---------------------------------------------------------------------------------------- doc_max_length


def chinese_document(seed, length=324):
    rng = random.Random(seed)
    return "".join(rng.choice(CJK) for _ in range(length))


@pytest.mark.parametrize("kind", ["chinese", "base64", "title-then-chinese"])
def test_texts_without_spaces_keep_their_first_tokens(llama_dir, kind):
    rng = random.Random(kind)
    if kind == "chinese":
        texts = [chinese_document(1), chinese_document(2)]
    elif kind == "base64":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        texts = ["".join(rng.choice(alphabet) for _ in range(400)) for _ in range(2)]
    else:  # the word rule would keep only "Title:", the same for both documents
        texts = ["Title: " + chinese_document(1), "Title: " + chinese_document(2)]
    model = load(llama_dir, doc_max_length=40)
    with pytest.warns(UserWarning, match="too few spaces"):
        first, second = encode(model, texts)
    assert (first - second).abs().max() > 1e-3
    rows, report = model.row_tokenizer.tokenize_pairs([("", t) for t in texts])
    assert report.doc_token_cut == 2 and report.doc_shortened == 0
    for text, row in zip(texts, rows):
        alone = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row.input_ids[row.text_start:row.text_end] == alone[:40]


def reference_shorten(tokenizer, text, max_length, doc_max_length):
    """The llm2vec reference's word rule, verbatim in substance."""
    def count(t):
        return len(tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])

    n = count(text)
    while n > doc_max_length:
        words = text.split()
        text = " ".join(words[: int(len(words) * doc_max_length / n)])
        n = count(text)
    return text


def test_word_shortening_still_follows_the_reference_for_spaced_text(llama_dir):
    model = load(llama_dir, doc_max_length=30, max_length=64)
    rng = random.Random(3)
    texts = [" ".join(rng.choice(["the", "cat", "river", "mountain", "happy"]) for _ in range(n)) + "\n end"
             for n in (40, 90, 300)]
    expected = [reference_shorten(model.tokenizer, t, 64, 30) for t in texts]
    assert torch.equal(encode(model, texts), encode(load(llama_dir, doc_max_length=10_000, max_length=64), expected))


# ---------------------------------------------------------------------------------------------- huge texts


def test_huge_text_is_cut_before_tokenizing_without_changing_tokens(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rt = RowTokenizer(tokenizer, max_length=512, doc_max_length=400, pooling_mode="mean")
    unbounded = RowTokenizer(tokenizer, max_length=512, doc_max_length=400, pooling_mode="mean")
    unbounded.character_limit = 10 ** 12
    limit = rt.character_limit
    words = " ".join(random.Random(0).choice(["the", "cat", "sat", "river"]) for _ in range(limit))
    for text in (words[: 3 * limit], chinese_document(0, 3 * limit)):
        pairs = [("find the animal:", text), (text, "the cat")]
        rows, report = rt.tokenize_pairs(pairs)
        assert report.characters_cut == 2
        assert rows == unbounded.tokenize_pairs(pairs)[0]


def test_a_30_mb_text_never_reaches_the_tokenizer_whole(llama_dir):
    model = load(llama_dir)
    seen = []
    original = type(model.tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(max(map(len, text)) if isinstance(text, list) else len(text))
        return original(self, text, *args, **kwargs)

    huge = chinese_document(5, 1000) * 30_000
    type(model.tokenizer).__call__ = spy
    try:
        with pytest.warns(UserWarning, match="only its first characters"):
            got = encode(model, [huge, "the cat"])
    finally:
        type(model.tokenizer).__call__ = original
    assert torch.isfinite(got).all()
    assert max(seen) <= model.row_tokenizer.character_limit + 64  # the text plus its template and instruction


# ------------------------------------------------------------------------------------------ missing weights


def test_missing_tensor_is_an_error_naming_it(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "missing")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    del weights["layers.1.mlp.up_proj.weight"]
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing \(layers\.1\.mlp\.up_proj\.weight\).*Re-download"):
        load(broken)


def test_unexpected_tensor_is_an_error_naming_it(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "unexpected")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 unexpected \(layers\.0\.mlp\.extra_proj\.weight\)"):
        load(broken)


def test_config_with_more_layers_than_the_weights_is_an_error(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "layers")
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] += 1
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"9 missing \(layers\.2\..*, \.\.\.\).*num_hidden_layers"):
        load(broken)


def test_causal_lm_checkpoint_with_its_lm_head_loads(tmp_path):
    from llm2vec_fast.testing import build_tokenizer, random_model

    directory = str(tmp_path / "clm")
    tokenizer = build_tokenizer(directory)
    random_model("llama", len(tokenizer), causal_lm=True, tie_word_embeddings=False).save_pretrained(directory)
    assert torch.isfinite(encode(load(directory), TEXTS)).all()


def drop_adapter_tensors(adapter_dir, keep):
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    weights = load_file(path)
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:keep]}, path)
    return len(names) - keep


@pytest.mark.parametrize("layout", ["second-adapter", "released"])
def test_adapter_missing_tensors_is_an_error(llama_dir, tmp_path, layout):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    assert drop_adapter_tensors(adapter, keep=12) == 16
    with pytest.raises(ValueError, match=r"16 missing \(base_model\.model\.layers\..*lora_.*Re-save"):
        if layout == "released":
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(llama_dir, name), os.path.join(adapter, name))
            load(adapter)
        else:
            load(llama_dir, peft_model_name_or_path=adapter)


def test_adapter_with_unexpected_tensors_is_an_error(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(path)
    weights["base_model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"1 unexpected \(base_model\.model\.layers\.0\.mlp\.extra\.lora_A"):
        load(llama_dir, peft_model_name_or_path=adapter)


def test_adapter_directory_without_weights_is_named(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"adapter'.*no adapter weights \(adapter_model\.safetensors"):
        load(llama_dir, peft_model_name_or_path=adapter)


# -------------------------------------------------------------------------------------------- threads


def test_concurrent_encodes_on_a_train_mode_model_give_eval_results(llama_dir, tmp_path):
    adapter = tiny_lora(llama_dir, str(tmp_path / "adapter"), dropout=0.5)
    # doc_max_length=8: the word rule and the no-space fallback run concurrently too.
    model = load(llama_dir, peft_model_name_or_path=adapter, attention_dropout=0.3, max_batch_tokens=16,
                 doc_max_length=8)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["the", "cat", "sat", "river", "blue"]) for _ in range(rng.randint(3, 12)))
             for _ in range(24)] + [chinese_document(1, 30), chinese_document(2, 30)]
    model.eval()
    expected = encode(model, texts)
    model.train()
    results, errors = {}, []
    start = threading.Barrier(4)

    def work(worker):
        try:
            start.wait()
            results[worker] = [encode(model, texts) for _ in range(3)]
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(torch.equal(got, expected) for runs in results.values() for got in runs)
    assert model.training and all(m.training for m in model.modules())


def test_encode_restores_each_module_mode(llama_dir):
    model = load(llama_dir)
    model.train()
    frozen = model.model.layers[0]
    frozen.eval()
    encode(model, TEXTS)
    assert model.training and model.model.layers[1].training and not frozen.training


def test_encode_on_another_device_while_one_runs_is_refused(llama_dir):
    model = load(llama_dir)
    with model._encode_scope.enter(model, torch.device("cpu")):
        with pytest.raises(RuntimeError, match="same device"):
            model._encode_scope.enter(model, torch.device("meta")).__enter__()


def test_model_copies_encode(llama_dir):
    import copy

    model = load(llama_dir)
    assert torch.equal(encode(copy.deepcopy(model), TEXTS), encode(model, TEXTS))


def test_model_with_native_cpu_ops_pickles_and_copies(llama_dir):
    import copy
    import pickle

    from llm2vec_fast.cpu_runtime import native_cpu_ops

    model = load(llama_dir)
    expected = encode(model, TEXTS)  # a CPU encode turns the native ops on
    if not native_cpu_ops(model.model):
        pytest.skip("the native CPU ops could not be built here")
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        layer = clone.model.layers[0]
        assert layer.forward.args[0] is layer and layer.mlp.forward.args[0] is layer.mlp  # bound to the clone
        assert torch.equal(encode(clone, TEXTS), expected)


# ------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("sentences, words", [
    (["ok", "bad \ud800 text"], "input 1: its text holds a lone surrogate (U+D800) at character 4"),
    ([["ok", "fine"], ["\udfff", "text"]], "input 1: its instruction holds a lone surrogate (U+DFFF)"),
])
def test_lone_surrogates_name_the_input(llama_dir, sentences, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        encode(load(llama_dir), sentences)


def test_meta_device_is_refused_and_the_model_stays_usable(llama_dir):
    model = load(llama_dir)
    expected = encode(model, TEXTS)
    for device in ("meta", "cuda:99" if torch.cuda.is_available() else "cuda", "no-such-device"):
        with pytest.raises(ValueError, match="device"):
            encode(model, TEXTS, device=device)
    assert torch.equal(encode(model, TEXTS), expected)


BAD_COUNTS = [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("64", TypeError), (True, TypeError)]


@pytest.mark.parametrize("value, error", BAD_COUNTS, ids=["zero", "negative", "float", "str", "bool"])
def test_bad_max_batch_tokens_everywhere(llama_dir, value, error):
    model = load(llama_dir)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        LLM2Vec(model.model, model.tokenizer, max_batch_tokens=value)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        load(llama_dir, max_batch_tokens=value)
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        encode(model, TEXTS, max_batch_tokens=value)
    model.max_batch_tokens = value  # set after construction: still refused, not silently replaced
    with pytest.raises(error, match="max_batch_tokens must be a positive int"):
        encode(model, TEXTS)


@pytest.mark.parametrize("value, error", BAD_COUNTS, ids=["zero", "negative", "float", "str", "bool"])
def test_bad_batch_size(llama_dir, value, error):
    with pytest.raises(error, match="batch_size must be a positive int"):
        encode(load(llama_dir), TEXTS, batch_size=value)


def test_batch_size_in_from_pretrained_points_to_encode(llama_dir):
    with pytest.raises(TypeError, match=r"batch_size is an argument of encode\(\)"):
        load(llama_dir, batch_size=True)


@pytest.mark.parametrize("content, words", [
    ('{"skip_instruction": "yes"}', 'skip_instruction is "yes", but it must be true or false'),
    ('{"max_length": 12.5}', "max_length is 12.5, but it must be a positive integer"),
    ('{"doc_max_length": true}', "doc_max_length is true, but it must be a positive integer"),
    ('{"pooling_mode": "cls"}', 'pooling_mode is "cls", but it must be one of mean'),
    ('{"pooling_mode": "mean",}', "is not valid JSON (Expecting"),
    ("null", "must hold a JSON object ({...}), not null"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_llm2vec_config_names_the_file(llama_dir, tmp_path, content, words):
    directory = copy_model(llama_dir, tmp_path / "model")
    with open(os.path.join(directory, "llm2vec_config.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=__import__("re").escape(os.path.join(directory, "llm2vec_config.json"))) \
            as caught:
        load(directory)
    assert words in str(caught.value)


@pytest.mark.parametrize("content, words", [("{not json", "is not valid JSON"), ("null", "not null")])
@pytest.mark.parametrize("layout", ["second-adapter", "released"])
def test_bad_adapter_config_names_the_file(llama_dir, tmp_path, content, words, layout):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    if layout == "released":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(llama_dir, name), os.path.join(adapter, name))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=__import__("re").escape(os.path.join(adapter, "adapter_config.json"))) \
            as caught:
        load(adapter) if layout == "released" else load(llama_dir, peft_model_name_or_path=adapter)
    assert words in str(caught.value)


def test_non_boolean_skip_instruction_argument(llama_dir):
    model = load(llama_dir)
    with pytest.raises(TypeError, match="skip_instruction must be True or False"):
        LLM2Vec(model.model, model.tokenizer, skip_instruction="no")
