"""Test-only fault injection: kill this process (SIGKILL) at a named point of a write, to prove that a resumed run
trusts nothing a kill left half-done.

Production code marks its kill points with `point(name, count, stage)`; the variable LLM2VEC_FAST_FAULT (read
through `llm2vec_fast.settings.current().fault`) arms at most one of them. Unset, a point returns at once: no
parsing, no file access.

Spec syntax (fields after the name are optional; a field left out matches any value):

    NAME[:COUNT[:STAGE]][@FILE]

    NAME   which point (below)
    COUNT  the point's count, a positive integer (what it counts is the point's own)
    STAGE  where within that operation
    FILE   one process only: the fault fires only while FILE exists, and only in the process that removes it;
           processes that are restarted after the kill (Ray actors) then run on unharmed

The points:

    shard:N:STAGE        the N-th shard this process commits (encode_job/shards.py), at STAGE "temp" (its file is
                         written under a temporary name, not yet renamed), "unrecorded" (in place, not yet recorded
                         in the progress file) or "recorded" (recorded: the shard is done)
    checkpoint:STEP:STAGE  the training checkpoint of step STEP (train/checkpoint.py), at STAGE "adapter"
                         (adapter written), "state" (trainer state written), "sealed" (manifest written, not yet
                         renamed) or "renamed" (in place)
    ray-actor:N          the N-th batch an encode --engine ray actor is handed (encode_job/ray_engine.py)

Examples: "shard:2:recorded" (killed right after its second shard is done), "checkpoint:4:state",
"ray-actor@/tmp/armed" (the first actor call that finds /tmp/armed removes it and dies; its restart works on).
"""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass

from . import settings

VARIABLE = "LLM2VEC_FAST_FAULT"
# Every point production code marks, with the stages it passes (empty: the point has no stages).
POINTS = {
    "shard": ("temp", "unrecorded", "recorded"),
    "checkpoint": ("adapter", "state", "sealed", "renamed"),
    "ray-actor": (),
}


@dataclass(frozen=True)
class Fault:
    """A parsed LLM2VEC_FAST_FAULT: the point `name`, and the count, stage and one-process FILE it must match
    (None: any)."""

    name: str
    count: int | None = None
    stage: str | None = None
    once_file: str | None = None

    def matches(self, name: str, count: int | None, stage: str | None) -> bool:
        """True when point `name`, reached with `count` and `stage`, is the one this fault arms."""
        return (name == self.name and (self.count is None or count == self.count)
                and (self.stage is None or stage == self.stage))


@functools.lru_cache(maxsize=8)
def parse(spec: str) -> Fault:
    """The Fault that `spec` (the syntax of this module's docstring) describes; a malformed spec, an unknown point
    or stage raises ValueError naming it."""
    where, at, once_file = spec.partition("@")
    if at and not once_file:
        raise _bad(spec, "'@' must be followed by a file path")
    name, *fields = where.split(":")
    if name not in POINTS:
        raise _bad(spec, f"unknown point {name!r}; the points are {', '.join(POINTS)}")
    if len(fields) > 2:
        raise _bad(spec, "expected NAME[:COUNT[:STAGE]][@FILE]")
    count = stage = None
    if fields:
        if not fields[0].isdigit() or int(fields[0]) < 1:
            raise _bad(spec, f"the count {fields[0]!r} is not a positive integer")
        count = int(fields[0])
    if len(fields) == 2:
        stage = fields[1]
        if stage not in POINTS[name]:
            stages = ", ".join(POINTS[name]) or "none"
            raise _bad(spec, f"point {name!r} has no stage {stage!r} (its stages: {stages})")
    return Fault(name, count, stage, once_file or None)


def point(name: str, count: int | None = None, stage: str | None = None) -> None:
    """A kill point: SIGKILL this process if LLM2VEC_FAST_FAULT arms point `name` at this `count` (what the point
    counts: shards committed, checkpoint step, actor calls) and `stage` (where in the operation)."""
    spec = settings.current().fault
    if not spec:
        return
    fault = parse(spec)
    if not fault.matches(name, count, stage):
        return
    if fault.once_file is not None:
        try:
            os.remove(fault.once_file)
        except FileNotFoundError:
            return  # disarmed, or another process took it
    os.kill(os.getpid(), signal.SIGKILL)


def _bad(spec: str, problem: str) -> ValueError:
    return ValueError(f"{VARIABLE}={spec!r}: {problem}. See llm2vec_fast/faults.py for the syntax, or unset "
                      f"{VARIABLE}.")
