"""Per-layer spread of each kernel in `bench_engine.py --profile` results' one-step timelines, mode against mode.

A profile's per-step totals say that a kernel is slower in one engine than in another; the timeline of one pure decode
step says whether every layer's launch is a little slower or some launches a lot (mean, spread, fastest and slowest
launch of each kernel that runs once a layer or more), and the profile's launches over all its steps whether the
slow launches are the same layers' every step.

    python benchmarks/timeline_report.py benchmarks/results/engine_profile_timeline_32k1_*_h200_2026-12-03g.json \
        --out benchmarks/results/timeline_report_32k1_h200_2026-12-03g.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
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


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson's r, 0 where either side does not vary."""
    if len(a) < 2 or min(statistics.pstdev(a), statistics.pstdev(b)) == 0:
        return 0.0
    return statistics.correlation(a, b)


def layer_pattern(steps: list[list[float]], slowest: int = 5) -> dict:
    """One kernel's launches over several steps (step_launches): is a slow launch the same layer's every step?

    between_layers_stdev is the spread of the launches' per-layer means; within_layer_stdev the mean spread of one
    layer's launch across steps. Noise alone puts the first near the second / sqrt(steps); well above that, the
    slow launches belong to layers (where their weights lie), not to moments. neighbour_correlation: of a launch's
    time with the next layer's in the same step (slow stretches of a step against independent slow launches);
    us_histogram: launches per whole microsecond (two humps: two states a launch runs in)."""
    steps = [row for row in steps if row and len(row) == len(steps[0])]
    if len(steps) < 2:
        return {}
    per_layer = list(zip(*steps, strict=True))
    means = [statistics.fmean(us) for us in per_layer]
    order = sorted(range(len(means)), key=lambda i: -means[i])
    return {
        "steps": len(steps),
        "launches": len(means),
        "mean_us": statistics.fmean(means),
        "between_layers_stdev_us": statistics.pstdev(means),
        "within_layer_stdev_us": statistics.fmean(statistics.pstdev(us) for us in per_layer),
        "neighbour_correlation": correlation(
            [us for row in steps for us in row[:-1]], [us for row in steps for us in row[1:]]
        ),
        "us_histogram": dict(sorted(Counter(int(us) for row in steps for us in row).items())),
        "slowest_layers": [[i, round(means[i], 2)] for i in order[:slowest]],
        "fastest_layers": [[i, round(means[i], 2)] for i in order[::-1][:slowest]],
    }


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
                "layers": {name: layer_pattern(steps)
                           for name, steps in (result["profile"].get("launches") or {}).items()},
            }  # fmt: skip
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
        for name, row in entry["layers"].items():
            if row:
                spread = f"layers' means +- {row['between_layers_stdev_us']:.2f} us, a layer's +- "
                spread += f"{row['within_layer_stdev_us']:.2f}; slowest {row['slowest_layers'][:3]}"
                print(f"  {name[:40]:40} {row['steps']} steps: {spread}")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "modes": report}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
