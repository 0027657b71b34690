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


def test_an_exception_in_our_own_row_fails_the_run_while_a_peer_is_only_unavailable(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "results.json")

    def broken():
        raise RuntimeError("kernel launch failed")

    def rows(ctx):
        ctx.bench.run("op", "peer", "S1", broken, tokens=1, baseline=True)
        ctx.bench.run("op", "ours-triton", "S1", broken, tokens=1, ours=True)

    monkeypatch.setattr(gpu_check, "SECTIONS", {"rows": rows})
    assert gpu_check.main(("rows",), out=out, cpu_smoke=True, budget_s=None) == 1
    result = read(out)
    peer, ours = result["bench"]
    assert peer["note"].startswith("unavailable: RuntimeError") and peer["correct"] is None
    assert ours["note"] == "FAILED: RuntimeError: kernel launch failed" and ours["correct"] is False
    assert result["failed"] == 1
    assert "1 failed" in capsys.readouterr().out


def test_section_names_and_groups():
    assert gpu_check.parse_sections("encode,kernels") == (*gpu_check.GROUPS["kernels"], "encode")
    with pytest.raises(ValueError, match="unknown sections"):
        gpu_check.parse_sections("attention,nope")


def test_every_result_is_also_a_flushed_json_line(tmp_path, monkeypatch):
    out = str(tmp_path / "results.json")
    lines_seen = {}

    def first(ctx):
        ctx.check("a", True)
        with open(tmp_path / "results.jsonl") as f:  # already on disk while the run goes on
            lines_seen["mid_run"] = [json.loads(line) for line in f]
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "SECTIONS", {"first": first, "second": lambda ctx: ctx.check("b", False)})
    gpu_check.main(("first", "second"), out=out, cpu_smoke=True, budget_s=None)
    assert [(r["kind"], r.get("check")) for r in lines_seen["mid_run"]] == [("check", "a")]
    with open(tmp_path / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["kind"], r.get("check") or r.get("section")) for r in rows] == [
        ("check", "a"), ("section", "first"), ("check", "b"), ("section", "second")]
    assert rows[1]["status"] == "failed" and rows[3]["status"] == "ok"


def test_dry_run_lists_the_plan_with_estimates(capsys):
    assert gpu_check.dry_run(tuple(gpu_check.SECTIONS), budget_s=100) == 0
    out = capsys.readouterr().out
    assert set(gpu_check.ESTIMATED_SECONDS) == set(gpu_check.SECTIONS)
    for name in gpu_check.SECTIONS:
        assert name in out
    assert "(skipped: budget)" in out  # 100 s cannot hold every section
    assert sum(gpu_check.ESTIMATED_SECONDS.values()) <= gpu_check.DEFAULT_BUDGET_S
