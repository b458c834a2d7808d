"""Where a two-run TPOT goes, from `bench_engine.py --trace-steps ... [--telemetry]` results.

TPOT = (t129 - t1) / 128 splits exactly into two parts of the traced runs:
- mixed extra: the 129-token run's mixed steps (some prompt still prefilling, the early requests decoding alongside)
  less the 1-token run, whose steps are all prefill; the decodes that ride along later prompts' prefill chunks;
- pure: the decode steps after the last prefill, whose batch shrinks as requests finish.
With telemetry, each part's SM clock and power (samples inside its steps' windows) say whether a part ran throttled.
Where the trace lists each step's prompt chunks, the sizes of those over cached context (the 129-token run's
shrink by the decodes riding along) are listed for both runs.
With --trace-kernels, the mixed steps' kernel excess (129-token run less 1-token run, ms over the run) per kernel
family says which kernels the mixed extra is made of; only the kernels each run listed (its top ones) are counted.
The traced steps are synchronised one by one, so both parts carry the host's time per step as well; the
untraced TPOT of the same lease is the figure to quote.

    python benchmarks/trace_report.py benchmarks/results/engine_trace_telemetry_*_h200_2026-12-02i.json \
        --out benchmarks/results/trace_report_h200_2026-12-02i.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DECODE_TOKENS = 128  # t129 - t1: the decode steps a two-run TPOT divides by
# Kernel name fragments -> family, first match wins (ours, FlashAttention, the GEMMs, everything else).
KERNEL_FAMILIES = (
    ("_attention_kernel", "ours: attention"),
    ("_rotate_queries", "ours: query rotation"),
    ("_reduce_splits", "ours: split-K reduce"),
    ("_dequant", "ours: dequantise"),
    ("_store", "ours: store"),
    ("flash::", "FlashAttention"),
    ("nvjet", "GEMM"),
    ("index", "index copies"),
)


def step_windows(steps: list[list]) -> list[tuple[float, float, int, int]]:
    """(start s, end s, prefilling, decoding) of each traced step, from the run's start (steps back to back)."""
    windows, t = [], 0.0
    for ms, prefilling, decoding in steps:
        windows.append((t, t + ms / 1e3, prefilling, decoding))
        t += ms / 1e3
    return windows


def clock_in(series: list[list], windows: list[tuple[float, float, int, int]]) -> dict:
    """Median SM clock and power over the telemetry samples that fall inside the given step windows."""
    inside = [row for row in series if any(a <= row[0] <= b for a, b, _, _ in windows)]
    if not inside:
        return {"samples": 0}
    return {"samples": len(inside), "sm_mhz_median": statistics.median(r[1] for r in inside),
            "power_w_median": statistics.median(r[3] for r in inside)}  # fmt: skip


def split_tpot(trace: dict, series: list[list] | None = None) -> dict:
    """A mode's traced TPOT as mixed extra + pure (ms a token), with the full batch's median step and clocks."""
    long, short = trace["t129"], trace["t1"]
    mixed_extra = (long["mixed_ms"] - short["total_ms"]) / DECODE_TOKENS
    pure = (long["total_ms"] - long["mixed_ms"]) / DECODE_TOKENS
    full = max(int(b) for b in long["pure_by_batch"])
    out = {
        "context": trace["context"],
        "seqs": trace["seqs"],
        "traced_tpot_ms": (long["total_ms"] - short["total_ms"]) / DECODE_TOKENS,
        "mixed_extra_ms": mixed_extra,
        "pure_ms": pure,
        "mixed_steps": long["mixed_steps"],
        "decodes_in_mixed_steps": sum(d for _, p, d in long["steps"] if p),
        "full_batch_step_ms": long["pure_by_batch"][str(full)]["median_ms"],
    }
    for name, run in (("t129", long), ("t1", short)):  # in-process traces list each step's prompt chunks
        if "prefill_chunks" in run:
            out[f"chunks_over_context_{name}"] = sorted(t for step in run["prefill_chunks"] for t, ctx in step if ctx)
    if series is not None:
        windows = step_windows(long["steps"])
        out["clock_mixed"] = clock_in(series, [w for w in windows if w[2]])
        out["clock_full_batch"] = clock_in(series, [w for w in windows if not w[2] and w[3] == full])
    return out


def kernel_family(name: str) -> str:
    return next((family for fragment, family in KERNEL_FAMILIES if fragment in name), "other")


def mixed_kernel_excess(trace: dict) -> dict[str, float] | None:
    """ms of GPU kernels by family in the 129-token run's mixed steps less the 1-token run's (None: not profiled)."""
    long, short = trace["t129"], trace["t1"]
    if "mixed_kernels_us" not in long or "mixed_kernels_us" not in short:
        return None
    excess: dict[str, float] = {}
    for rows, sign in ((long["mixed_kernels_us"], 1), (short["mixed_kernels_us"], -1)):
        for row in rows:
            family = kernel_family(row["name"])
            excess[family] = excess.get(family, 0.0) + sign * row["us_per_step"] / 1e3
    return {"all_kernels": round(long["mixed_kernels_ms"] - short["mixed_kernels_ms"], 3),
            **{f: round(ms, 3) for f, ms in sorted(excess.items())}}  # fmt: skip


def report(result: dict) -> list[dict]:
    """One row per traced mode of a bench_engine result."""
    rows = []
    for mode in result["modes"]:
        trace = mode.get("step_trace")
        if not trace:
            continue
        phases = mode.get("telemetry", {}).get("phases", [])
        t129 = [p["series"] for p in phases if p["phase"].endswith("trace t129")]
        row = {"mode": mode.get("label", mode["mode"]), **split_tpot(trace, t129[0] if t129 else None)}
        excess = mixed_kernel_excess(trace)
        if excess is not None:
            row["mixed_kernel_excess_ms"] = excess
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="bench_engine JSON files with step_trace")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [dict(row, source=path.name) for path in args.results for row in report(json.loads(path.read_text()))]
    for row in rows:
        clocks = "".join(f"  {k} {row[k]['sm_mhz_median']} MHz {row[k]['power_w_median']} W"
                         for k in ("clock_mixed", "clock_full_batch") if row.get(k, {}).get("samples"))  # fmt: skip
        print(f"{row['mode']:>10} {row['context']}x{row['seqs']}: traced TPOT {row['traced_tpot_ms']:.2f} ms = "
              f"mixed extra {row['mixed_extra_ms']:.2f} + pure {row['pure_ms']:.2f}; "
              f"full-batch step {row['full_batch_step_ms']:.2f} ms{clocks}")  # fmt: skip
        if "mixed_kernel_excess_ms" in row:
            print("    mixed steps' kernel excess, ms:", json.dumps(row["mixed_kernel_excess_ms"]))
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "trace_report", "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
