"""Per-layer spread of each kernel in `bench_engine.py --profile` results' one-step timelines, mode against mode.

A profile's per-step totals say that a kernel is slower in one engine than in another; the timeline of one pure decode
step says whether every layer's launch is a little slower or some launches a lot (mean, spread, fastest and slowest
launch of each kernel that runs once a layer or more).

    python benchmarks/timeline_report.py benchmarks/results/engine_profile_timeline_32k1_*_h200_2026-12-03g.json \
        --out benchmarks/results/timeline_report_32k1_h200_2026-12-03g.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def launch_spread(timeline: list[list], min_launches: int) -> dict[str, dict[str, float]]:
    """Each kernel with at least min_launches launches in the step: launches, mean, population stdev, min and max
    device us, longest total first."""
    times: dict[str, list[float]] = {}
    for name, _start, us, _idle in timeline:
        times.setdefault(name, []).append(us)
    rows = {
        name: {"launches": len(us), "mean_us": statistics.fmean(us), "stdev_us": statistics.pstdev(us),
               "min_us": min(us), "max_us": max(us), "total_us": sum(us)}
        for name, us in times.items() if len(us) >= min_launches
    }  # fmt: skip
    return dict(sorted(rows.items(), key=lambda item: -item[1]["total_us"]))


def mode_spreads(paths: list[Path], min_launches: int) -> dict[str, dict]:
    """{mode label: {"step_ms", "idle_us", "kernels": launch_spread}} for every profiled mode of the files."""
    report = {}
    for path in paths:
        data = json.loads(path.read_text())
        for result in data.get("modes", []):
            timeline = (result.get("profile") or {}).get("timeline")
            if not timeline:
                continue
            report[result.get("label", result["mode"])] = {
                "file": path.name,
                "step_ms": result["profile"]["step_ms"],
                "idle_us": sum(row[3] for row in timeline),
                "kernels": launch_spread(timeline, min_launches),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench_engine.py JSON files with --profile")
    parser.add_argument("--min-launches", type=int, default=32, help="kernels launched at least this often a step")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    args = parser.parse_args()
    report = mode_spreads(args.results, args.min_launches)
    for mode, entry in report.items():
        print(f"{mode}: step {entry['step_ms']:.3f} ms, idle {entry['idle_us']:.1f} us between kernels")
        for name, row in entry["kernels"].items():
            print(f"  {name[:50]:50} x{row['launches']:<3} {row['mean_us']:7.2f} +- {row['stdev_us']:5.2f} us "
                  f"({row['min_us']:.2f}-{row['max_us']:.2f})")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "modes": report}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
