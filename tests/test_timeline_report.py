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


def test_layer_pattern_tells_slow_layers_from_noise(timeline_report):
    fixed = [[10.0, 15.0, 10.0], [10.0, 15.0, 10.0], [10.0, 15.0, 10.0], [10.0, 15.0, 10.0]]  # layer 1 slow each step
    pattern = timeline_report.layer_pattern(fixed, slowest=1)
    assert pattern["steps"] == 4 and pattern["launches"] == 3
    assert pattern["slowest_layers"] == [[1, 15.0]] and pattern["within_layer_stdev_us"] == 0.0
    assert pattern["us_histogram"] == {10: 8, 15: 4}
    assert pattern["neighbour_correlation"] == pytest.approx(-1.0)  # (10, 15) then (15, 10) in every step
    assert pattern["between_layers_stdev_us"] == pytest.approx(5.0 * 2**0.5 / 3)
    moving = [[15.0, 10.0, 10.0], [10.0, 15.0, 10.0], [10.0, 10.0, 15.0]]  # a different layer slow each step
    pattern = timeline_report.layer_pattern(moving)
    assert pattern["between_layers_stdev_us"] == 0.0 and pattern["within_layer_stdev_us"] > 2.0
    assert timeline_report.correlation([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) > 0.99
    assert timeline_report.correlation([1.0, 1.0], [2.0, 3.0]) == 0.0
    assert timeline_report.layer_pattern([[1.0, 2.0]]) == {}  # one step says nothing about layers
