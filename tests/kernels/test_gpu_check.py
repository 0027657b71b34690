"""benchmarks/gpu_check.py survives failures and short leases: its sections replaced by tiny fakes (no GPU, no
kernels), a section that raises is recorded and the next one runs, the results file is complete after every
check and section, and a spent budget skips what has not started."""

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import gpu_check  # noqa: E402


def read(path):
    with open(path) as f:
        return json.load(f)


def test_failing_section_is_recorded_and_the_next_runs_with_the_file_written_as_it_goes(tmp_path, monkeypatch):
    out = str(tmp_path / "results.json")
    seen = {}

    def broken(ctx):
        ctx.check("before the crash", True)
        raise RuntimeError("lost the device")

    def after(ctx):
        seen["at_start"] = read(out)
        ctx.check("second section check", True, err="1e-3")
        seen["after_check"] = read(out)
        return dict(rate=1.0)

    monkeypatch.setattr(gpu_check, "SECTIONS", {"broken": broken, "after": after, "later": lambda ctx: {}})
    rc = gpu_check.main(("broken", "after", "later"), out=out, cpu_smoke=True, budget_s=None)

    assert rc == 1
    start = seen["at_start"]
    assert start["sections"]["broken"]["status"] == "failed"
    assert "RuntimeError: lost the device" in start["sections"]["broken"]["error"]
    assert start["sections"]["after"]["status"] == "running" and start["sections"]["later"]["status"] == "pending"
    assert [c["check"] for c in start["checks"]] == ["before the crash"]
    assert seen["after_check"]["checks"][-1] == dict(check="second section check", ok=True, section="after",
                                                     err="1e-3")
    final = read(out)
    assert {n: s["status"] for n, s in final["sections"].items()} == dict(broken="failed", after="ok", later="ok")
    assert final["sections"]["after"]["summary"] == dict(rate=1.0)
    assert final["failed"] == 1
    assert not os.path.exists(out + ".tmp")


def test_spent_budget_skips_the_sections_not_started(tmp_path, monkeypatch):
    out = str(tmp_path / "results.json")
    monkeypatch.setattr(gpu_check, "SECTIONS", {"slow": lambda ctx: time.sleep(0.2), "next": lambda ctx: {}})
    assert gpu_check.main(("slow", "next"), out=out, cpu_smoke=True, budget_s=0.1) == 0
    sections = read(out)["sections"]
    assert sections["slow"]["status"] == "ok"
    assert sections["next"]["status"] == "skipped" and "budget" in sections["next"]["error"]


def test_section_names_and_groups():
    assert gpu_check.parse_sections("encode,kernels") == (*gpu_check.GROUPS["kernels"], "encode")
    with pytest.raises(ValueError, match="unknown sections"):
        gpu_check.parse_sections("attention,nope")
