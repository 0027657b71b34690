"""The fault-injection hook (llm2vec_fast/faults.py): the LLM2VEC_FAST_FAULT spec, what it arms, and that a
point costs nothing while no fault is set."""

import os
import signal
import subprocess
import sys

import pytest

from llm2vec_fast import faults
from llm2vec_fast.faults import Fault, parse


@pytest.mark.parametrize("spec, fault", [
    ("shard", Fault("shard")),
    ("shard:2", Fault("shard", 2)),
    ("shard:3:temp", Fault("shard", 3, "temp")),
    ("checkpoint:15:renamed", Fault("checkpoint", 15, "renamed")),
    ("ray-actor:2", Fault("ray-actor", 2)),
    ("ray-actor@/tmp/x:y/armed", Fault("ray-actor", None, None, "/tmp/x:y/armed")),
    ("shard:1:recorded@armed", Fault("shard", 1, "recorded", "armed")),
])
def test_spec_parsing(spec, fault):
    assert parse(spec) == fault


@pytest.mark.parametrize("spec, problem", [
    ("shards:2", "unknown point 'shards'"),
    ("shard:two", "the count 'two' is not a positive integer"),
    ("shard:0", "the count '0' is not a positive integer"),
    ("shard:2:written", "point 'shard' has no stage 'written' (its stages: temp, unrecorded, recorded)"),
    ("ray-actor:1:temp", "point 'ray-actor' has no stage 'temp' (its stages: none)"),
    ("checkpoint:4:state:x", "expected NAME[:COUNT[:STAGE]][@FILE]"),
    ("ray-actor@", "'@' must be followed by a file path"),
])
def test_a_bad_spec_is_named_with_the_fix(spec, problem):
    with pytest.raises(ValueError) as error:
        parse(spec)
    assert f"LLM2VEC_FAST_FAULT={spec!r}: {problem}" in str(error.value) and "faults.py" in str(error.value)


def test_matching():
    fault = parse("checkpoint:4:state")
    assert fault.matches("checkpoint", 4, "state")
    assert not fault.matches("checkpoint", 4, "adapter") and not fault.matches("checkpoint", 2, "state")
    assert not fault.matches("shard", 4, "state")
    assert parse("shard").matches("shard", 7, "temp")  # a field left out matches anything


def test_an_unarmed_point_costs_nothing(monkeypatch):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    monkeypatch.setattr(faults, "parse", lambda spec: pytest.fail("parsed without a fault set"))
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("killed without a fault set"))
    monkeypatch.setattr(os, "remove", lambda *a: pytest.fail("touched a file without a fault set"))
    for count in range(1, 1000):
        faults.point("shard", count, "recorded")


def test_a_point_armed_elsewhere_does_not_fire(monkeypatch):
    monkeypatch.setenv(faults.VARIABLE, "checkpoint:4:state")
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("the wrong point fired"))
    faults.point("checkpoint", 4, "adapter")
    faults.point("checkpoint", 5, "state")
    faults.point("shard", 4, "recorded")


def run_point(spec: str, name: str, count: int, stage=None) -> int:
    code = f"from llm2vec_fast import faults; faults.point({name!r}, {count}, {stage!r})"
    env = dict(os.environ, **{faults.VARIABLE: spec})
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode


def test_the_armed_point_kills_its_process():
    assert run_point("shard:3:temp", "shard", 3, "temp") == -signal.SIGKILL
    assert run_point("shard:3:temp", "shard", 2, "temp") == 0


def test_a_once_file_lets_one_process_die(tmp_path):
    armed = tmp_path / "armed"
    spec = f"ray-actor@{armed}"
    assert run_point(spec, "ray-actor", 1) == 0  # not armed: the file is missing
    armed.write_text("")
    assert run_point(spec, "ray-actor", 1) == -signal.SIGKILL
    assert not armed.exists()
    assert run_point(spec, "ray-actor", 1) == 0  # the restarted process runs on
