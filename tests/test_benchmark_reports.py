"""The ablation report's rendering (markdown table, chart) on a synthetic report: no training, no model."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import reproduce_ablation  # noqa: E402


def synthetic_report(reused: bool, instruction: str = "") -> dict:
    def result(value):
        return {"spearman": value, "pearson": value - 0.01, "spearman_ci": [value - 0.1, value + 0.1],
                "pearson_ci": [value - 0.11, value + 0.09], "spearman_diff_ci": [-0.05, 0.04],
                "pearson_diff_ci": [-0.06, 0.03]}

    rows = []
    for name, value in (("Uni + mean", 0.56), ("Bi", 0.53), ("Bi + MNTP + SimCSE", 0.557)):
        row = {"variant": name, **result(value), "word_sets": {"simlex999": result(value / 2),
                                                               "wordsim353": result(value / 3)}}
        if name.startswith("Bi +"):
            row["train"] = {"mntp": {"steps": 120, "seconds": 650.0, "reused": reused},
                            "simcse": {"steps": 80, "seconds": 860.0, "reused": reused}}
            row["training"] = "MNTP 120 + SimCSE 80 steps"
            row["spearman_diff_bi_ci"] = [-0.01, 0.06]
        rows.append(row)
    sizes = dict(reproduce_ablation.FULL)
    return {"model": "smollm2-135m", "device": "cpu", "commit": "abc1234", "quick": False, "dtype": "float32",
            "pairs": 1225, "sizes": sizes, "bootstrap_resamples": 1000, "instruction": instruction,
            "seconds": 120.0, "rows": rows}


def test_markdown_lists_every_variant_with_intervals_and_paired_differences():
    text = reproduce_ablation.markdown(synthetic_report(reused=False))
    assert "| Uni + mean | 0.560 [0.460, 0.660] | 0.550 [0.450, 0.650] |  |  |" in text
    assert "| Bi | 0.530 [0.430, 0.630] | 0.520 [0.420, 0.620] | -0.030 [-0.050, +0.040] |" in text
    assert "| variant | simlex999 | simlex999 - Uni | wordsim353 | wordsim353 - Uni |" in text
    assert "MNTP 120 + SimCSE 80 steps" in text
    assert "difference from Bi (paired): Bi + MNTP + SimCSE +0.027 [-0.010, +0.060]." in text
    assert "reused" not in text and "instruction" not in text


def test_markdown_says_when_adapters_were_reused_and_an_instruction_was_used():
    text = reproduce_ablation.markdown(synthetic_report(reused=True, instruction="Retrieve similar text:"))
    assert "Adapters reused from an earlier run" in text and "mntp 10.8 min, simcse 14.3 min" in text
    assert "'Retrieve similar text:'" in text


def test_ablation_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    path = plots.plot_ablation(synthetic_report(reused=False), str(tmp_path / "ablation.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
