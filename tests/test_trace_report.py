"""trace_report.py on the CPU: a hand-made two-run trace splits into mixed extra + pure, clocks per part."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def trace_report(benchmark_script):
    return benchmark_script("trace_report")


def two_runs() -> dict:
    """t129: two mixed steps (100 ms, 110 ms; 1 decode rides along the second), then 16-batch pure steps of 10 ms
    and 2-batch ones of 4 ms; t1: two prefill steps of 100 ms and 102 ms."""
    long_steps = [[100.0, 2, 0], [110.0, 1, 1], *([[10.0, 0, 16]] * 100), *([[4.0, 0, 2]] * 10)]
    long = {"total_ms": 210.0 + 1000.0 + 40.0, "mixed_ms": 210.0, "mixed_steps": 2, "steps": long_steps,
            "pure_by_batch": {"2": {"steps": 10, "ms": 40.0, "median_ms": 4.0},
                              "16": {"steps": 100, "ms": 1000.0, "median_ms": 10.0}}}  # fmt: skip
    short = {"total_ms": 202.0, "mixed_ms": 202.0, "mixed_steps": 2, "steps": [[100.0, 2, 0], [102.0, 1, 0]]}
    return {"context": 1024, "seqs": 16, "t129": long, "t1": short}


def test_tpot_is_mixed_extra_plus_pure(trace_report):
    row = trace_report.split_tpot(two_runs())
    assert row["mixed_extra_ms"] == pytest.approx(8.0 / 128)  # 210 - 202 ms over the 128 decode tokens
    assert row["pure_ms"] == pytest.approx(1040.0 / 128)
    assert row["traced_tpot_ms"] == pytest.approx(row["mixed_extra_ms"] + row["pure_ms"])
    assert row["full_batch_step_ms"] == 10.0 and row["decodes_in_mixed_steps"] == 1
    assert "clock_mixed" not in row


def test_clocks_are_read_inside_each_parts_steps(trace_report):
    """Samples every 50 ms at 1500 MHz during the mixed steps (first 0.21 s), 1980 after; a gap holds none."""
    series = [
        [t / 1000, 1500 if t < 210 else 1980, 3201, 690.0 if t < 210 else 500.0, 60, 4] for t in range(0, 1250, 50)
    ]
    row = trace_report.split_tpot(two_runs(), series)
    assert row["clock_mixed"] == {"samples": 5, "sm_mhz_median": 1500, "power_w_median": 690.0}
    assert row["clock_full_batch"]["sm_mhz_median"] == 1980 and row["clock_full_batch"]["samples"] == 20
    assert trace_report.clock_in(series, [(5.0, 6.0, 0, 16)]) == {"samples": 0}


def test_report_reads_every_traced_mode(trace_report, tmp_path, monkeypatch, capsys):
    """Modes without a trace are skipped; a mode's telemetry series of the traced 129-token run is used."""
    series = [[0.0, 1600, 3201, 680.0, 60, 4], [0.5, 1980, 3201, 450.0, 55, 0]]
    result = {"modes": [
        {"mode": "bf16", "tpot": []},
        {"mode": "ours", "step_trace": two_runs(),
         "telemetry": {"phases": [{"phase": "1024x16 trace t1", "series": []},
                                  {"phase": "1024x16 trace t129", "series": series}]}},
    ]}  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(result))
    rows = trace_report.report(result)
    assert [r["mode"] for r in rows] == ["ours"] and rows[0]["clock_mixed"]["sm_mhz_median"] == 1600
    out = tmp_path / "report.json"
    monkeypatch.setattr("sys.argv", ["trace_report.py", str(path), "--out", str(out)])
    trace_report.main()
    assert json.loads(out.read_text())["rows"][0]["source"] == "trace.json"
    assert "mixed extra 0.06 + pure 8.12" in capsys.readouterr().out


def test_mixed_kernel_excess_by_family(trace_report):
    """--trace-kernels rows of both runs: the 129-token run's mixed-step kernels less the 1-token run's, by family;
    a kernel only one run listed counts on its side alone."""
    trace = two_runs()
    trace["t129"].update(mixed_kernels_ms=30.0, mixed_kernels_us=[
        {"name": "_attention_kernel", "us_per_step": 5000.0}, {"name": "_dequant_kv_kernel", "us_per_step": 4000.0},
        {"name": "void cutlass::device_kernel<flash::FlashAttnFwdSm90<", "us_per_step": 20000.0},
        {"name": "nvjet_sm90_tst_128x16", "us_per_step": 1000.0}])  # fmt: skip
    trace["t1"].update(mixed_kernels_ms=24.0, mixed_kernels_us=[
        {"name": "_dequant_kv_kernel", "us_per_step": 3000.0},
        {"name": "void cutlass::device_kernel<flash::FlashAttnFwdSm90<", "us_per_step": 20500.0},
        {"name": "elementwise_kernel", "us_per_step": 500.0}])  # fmt: skip
    assert trace_report.mixed_kernel_excess(trace) == {
        "all_kernels": 6.0, "FlashAttention": -0.5, "GEMM": 1.0, "other": -0.5, "ours: attention": 5.0,
        "ours: dequantise": 1.0}  # fmt: skip
    assert trace_report.mixed_kernel_excess(two_runs()) is None


def test_chunks_over_cached_context_are_listed_per_run(trace_report):
    """Traces that list each step's prompt chunks: the sizes of those with cached context, smallest first."""
    trace = two_runs()
    trace["t129"]["prefill_chunks"] = [[[8, 0]], [[2, 8], [6, 0]], [[4, 6], [3, 0]], [[6, 3]], [[1, 9]], [], []]
    trace["t1"]["prefill_chunks"] = [[[8, 0]], [[2, 8], [6, 0]]]
    row = trace_report.split_tpot(trace)
    assert row["chunks_over_context_t129"] == [1, 2, 4, 6] and row["chunks_over_context_t1"] == [2]
