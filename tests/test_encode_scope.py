"""encode_scope.py: concurrent encodes share one eval-mode scope on one device, restore every module's mode,
and an unusable device is refused before anything moves."""

import random
import threading

import pytest
import torch

from test_api_reliability import chinese_document, tiny_lora
from test_encoder import TEXTS, encode, load


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


def test_meta_device_is_refused_and_the_model_stays_usable(llama_dir):
    model = load(llama_dir)
    expected = encode(model, TEXTS)
    for device in ("meta", "cuda:99" if torch.cuda.is_available() else "cuda", "no-such-device"):
        with pytest.raises(ValueError, match="device"):
            encode(model, TEXTS, device=device)
    assert torch.equal(encode(model, TEXTS), expected)
