"""timeline_report.py on the CPU: per-layer spread of kernels from a profile's one-step timeline."""

import json

import pytest


@pytest.fixture(scope="module")
def timeline_report(benchmark_script):
    return benchmark_script("timeline_report")


def test_launch_spread_counts_each_kernels_launches(timeline_report):
    timeline = [["gemm", 0.0, 10.0, 0.5], ["attn", 10.5, 4.0, 0.5], ["gemm", 15.0, 14.0, 0.5], ["lm", 29.5, 3.0, 0.5]]
    spread = timeline_report.launch_spread(timeline, min_launches=2)
    assert list(spread) == ["gemm"]  # attn and lm launch once
    assert spread["gemm"] == {"launches": 2, "mean_us": 12.0, "stdev_us": 2.0, "min_us": 10.0, "max_us": 14.0,
                              "total_us": 24.0}  # fmt: skip
    assert list(timeline_report.launch_spread(timeline, min_launches=1)) == ["gemm", "attn", "lm"]


def test_mode_spreads_reads_profiled_modes_only(timeline_report, tmp_path):
    profiled = {"mode": "ours", "profile": {"step_ms": 5.5, "timeline": [["k", 0.0, 2.0, 1.0], ["k", 3.0, 4.0, 1.0]]}}
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"modes": [profiled, {"mode": "bf16", "tpot": []}]}))
    report = timeline_report.mode_spreads([path], min_launches=2)
    assert list(report) == ["ours"]
    assert report["ours"]["idle_us"] == 2.0 and report["ours"]["kernels"]["k"]["mean_us"] == 3.0
