"""bench_engine.py's result handling on the CPU: rows of a timed-out mode, merged runs, the plot."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench_engine():
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(context: int, seqs: int, tpot_ms: float) -> dict:
    return {"context": context, "seqs": seqs, "tpot_ms": tpot_ms, "tpot_method": "two-runs"}


def test_printed_rows_skip_log_lines(bench_engine):
    stdout = "\n".join(["INFO 11-30 engine started", json.dumps(row(1024, 1, 5.0)), '{"mode": "x"}',
                        json.dumps(row(4096, 16, 8.5)) + "\n"])  # fmt: skip
    assert bench_engine.printed_rows(stdout) == [row(1024, 1, 5.0), row(4096, 16, 8.5)]


def test_merge_keeps_timed_out_rows_and_labels_reruns(bench_engine, tmp_path):
    first = {
        "gpu": "H",
        "command": "a",
        "date": "d1",
        "modes": [{"mode": "ours", "tpot": [row(1024, 1, 6.0)]}, {"mode": "bf16", "tpot": [row(1024, 1, 5.0)]}],
    }
    partial = "INFO ...\n" + json.dumps(row(1024, 16, 9.0)) + "\nINFO still running"
    second = {"gpu": "H", "command": "b", "date": "d2",
              "modes": [{"mode": "tq", "error": "timeout after 9s", "partial": partial},
                        {"mode": "ours", "tpot": [row(1024, 1, 5.5)]}]}  # fmt: skip
    merged = bench_engine.merge_results([first, second], [Path("r1.json"), Path("r2.json")])
    assert [m.get("label", m["mode"]) for m in merged["modes"]] == ["ours", "bf16", "tq", "ours (r2)"]
    assert merged["modes"][2]["tpot"] == [row(1024, 16, 9.0)] and merged["modes"][2]["error"].startswith("timeout")
    assert [r["command"] for r in merged["runs"]] == ["a", "b"] and merged["gpu"] == "H"

    pytest.importorskip("matplotlib")
    png = tmp_path / "merged.png"
    bench_engine.plot(merged, png)
    assert png.stat().st_size > 10_000
