"""bench_engine.py's result handling on the CPU: rows of a timed-out mode, merged runs, the plot, repeats, arms."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench_engine(benchmark_script):
    return benchmark_script("bench_engine")


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
    arms = {"modes": [{"mode": "ours", "label": 'ours {"live_splits": false}', "tpot": []},
                      {"mode": "ours", "label": "ours {}", "tpot": []}]}  # fmt: skip
    again = bench_engine.merge_results([arms, arms], [Path("a1.json"), Path("a2.json")])
    assert [m["label"] for m in again["modes"]] == ['ours {"live_splits": false}', "ours {}",
                                                    'ours {"live_splits": false} (a2)', "ours {} (a2)"]  # fmt: skip

    pytest.importorskip("matplotlib")
    png = tmp_path / "merged.png"
    bench_engine.plot(merged, png)
    assert png.stat().st_size > 10_000


def test_tpot_lines_divide_by_bf16_at_the_same_shape(bench_engine):
    """The plot's lower row: a mode's TPOT over bf16's at its (seqs, context); None where bf16 has no row."""
    bf16 = {"mode": "bf16", "tpot": [row(4096, 1, 5.0), row(1024, 1, 4.0)]}
    ours = {"mode": "ours", "tpot": [row(1024, 1, 5.0), row(4096, 1, 4.5), row(4096, 16, 7.0)]}
    result = {"modes": [bf16, ours]}
    lines = bench_engine.tpot_lines(result)
    assert list(lines) == [1, 16]
    assert lines[1]["bf16"] == [(1024, 4.0, 1.0), (4096, 5.0, 1.0)]
    assert lines[1]["ours"] == [(1024, 5.0, 1.25), (4096, 4.5, 0.9)]
    assert lines[16] == {"ours": [(4096, 7.0, None)]}


def test_repeated_tpot_reports_the_median_of_its_two_run_samples(bench_engine):
    """Each sample is (t129 - t1) / 128 of its own pair of runs; the row reports their median and keeps them all."""
    walls = iter([1.0 + 0.128, 1.0, 2.0 + 0.512, 2.0, 3.0 + 0.256, 3.0])  # samples: 1, 4, 2 ms a token

    def timed(prompts, max_tokens):
        return next(walls), (0.01 if max_tokens > 1 else None)

    entry = bench_engine.tpot_entry(timed, [[1, 2]], "two-runs", repeats=3)
    assert [s["tpot_ms"] for s in entry["samples"]] == pytest.approx([1.0, 4.0, 2.0])
    assert entry["tpot_ms"] == pytest.approx(2.0) and entry["tpot_metrics_ms"] == pytest.approx(10.0)
    assert entry["t129_s"] == pytest.approx(1.128) and entry["tpot_method"] == "two-runs"
    once = bench_engine.tpot_entry(lambda prompts, n: (0.5, None), [[1]], "metrics", repeats=1)
    assert once == {"t129_s": 0.5, "t1_s": 0.5, "tpot_ms": 0.0, "tpot_method": "two-runs"}  # no timestamps


def test_tiles_change_names_real_fields(bench_engine):
    """--tiles: a change of Tiles fields for an engine A/B; an unknown field stops the run before any engine."""
    from turboquant_vllm.kernels.decode_tiles import TILES

    assert bench_engine.tiles_with({}) == TILES[128]
    changed = bench_engine.tiles_with({"publish_q": not TILES[128].publish_q})
    assert changed.publish_q != TILES[128].publish_q and changed.block_n == TILES[128].block_n
    with pytest.raises(SystemExit, match="no such Tiles field"):
        bench_engine.tiles_with({"publish_queries": True})


def test_tiles_list_runs_alternating_arms(bench_engine):
    """--tiles '[...]': one arm per element, in order, each checked before any engine; no --tiles is the one
    default arm whose engine core runs in its own process."""
    assert bench_engine.tile_arms(None) == [None]
    assert bench_engine.tile_arms('{"publish_q": true}') == [{"publish_q": True}]
    arms = bench_engine.tile_arms('[{"live_splits": false}, {}, {"live_splits": false}, {}]')
    assert arms == [{"live_splits": False}, {}, {"live_splits": False}, {}]
    with pytest.raises(SystemExit, match="no such Tiles field"):
        bench_engine.tile_arms('[{}, {"live_split": false}]')
    with pytest.raises(SystemExit, match="each arm is a JSON object"):
        bench_engine.tile_arms("[true]")


def test_arms_run_every_mode_in_order_each_with_its_change(bench_engine, tmp_path, monkeypatch):
    """Each arm's child gets that arm's --tiles; rows and engine logs say which arm they are."""
    from turboquant_vllm.eval import child

    calls = []

    def fake_child(cmd, timeout):
        calls.append(cmd)
        mode = cmd[cmd.index("--child") + 1]
        return child.ChildResult("log line\nRESULT " + json.dumps({"mode": mode, "tpot": []}), "", False)

    monkeypatch.setattr(child, "run_child", fake_child)
    out = tmp_path / "ab.json"
    arms = '[{"live_splits": false}, {}]'
    monkeypatch.setattr("sys.argv", ["bench_engine.py", "--modes", "ours,bf16", "--shapes", "", "--tiles", arms,
                                     "--out", str(out)])  # fmt: skip
    bench_engine.main()
    sent = [(c[c.index("--child") + 1], json.loads(c[c.index("--tiles") + 1])) for c in calls]
    assert sent == [("ours", {"live_splits": False}), ("bf16", {"live_splits": False}), ("ours", {}), ("bf16", {})]
    result = json.loads(out.read_text())
    assert [(m["mode"], m["tiles_change"]) for m in result["modes"]] == sent
    assert result["tiles_change"] == [{"live_splits": False}, {}]
    assert sorted(p.name for p in tmp_path.glob("ab_*.log")) == [
        "ab_bf16_arm0.log", "ab_bf16_arm1.log", "ab_ours_arm0.log", "ab_ours_arm1.log"]  # fmt: skip


def test_no_pdl_reaches_every_child_and_the_recorded_switches(bench_engine, tmp_path, monkeypatch):
    """--no-pdl is passed to each mode's child and the JSON records PDL as off."""
    from turboquant_vllm.eval import child

    calls = []

    def fake_child(cmd, timeout):
        calls.append(cmd)
        return child.ChildResult("RESULT " + json.dumps({"mode": cmd[cmd.index("--child") + 1], "tpot": []}), "", False)

    monkeypatch.setattr(child, "run_child", fake_child)
    out = tmp_path / "no_pdl.json"
    monkeypatch.setattr(
        "sys.argv", ["bench_engine.py", "--modes", "ours", "--shapes", "", "--no-pdl", "--out", str(out)]
    )
    bench_engine.main()
    assert len(calls) == 1 and "--no-pdl" in calls[0]
    assert json.loads(out.read_text())["kernel_switches"]["pdl"] is False
