"""Paired needle comparison of each compressed cache with the uncompressed one, over several eval runs.

One run places one pass key per (length, depth), so equal pass counts can hide different placements. Runs with
other `--needle-seed`s ask the same placements with other keys; this pools them and counts, per prompt, whether
both caches pass, neither, or only one (quality.needle_agreement), with the sign test of the disagreements.

    python benchmarks/needle_agreement.py benchmarks/results/hf_needle_defaults*_cpu_2026-12-01*.json \
        --out benchmarks/results/hf_needle_agreement_cpu_2026-12-01.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from turboquant_vllm.eval.quality import needle_agreement, needle_pass_rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="eval JSONs with a `needle` section")
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    args = p.parse_args(argv)
    payloads = [json.loads(path.read_text()) for path in args.runs]
    needles = [payload["needle"] for payload in payloads]
    table = needle_agreement(needles)
    view = Table(title=f"needle prompts of {len(needles)} runs, paired with the uncompressed cache")
    for column in ("cache", "prompts", "both pass", "neither", "only uncompressed", "only this cache", "sign test p"):
        view.add_column(column, justify="left" if column == "cache" else "right")
    for name, row in table.items():
        view.add_row(name, str(row["prompts"]), str(row["both"]), str(row["neither"]), str(row["only_baseline"]),
                     str(row["only_cache"]), f"{row['sign_test_p']:.3g}")  # fmt: skip
    Console(width=120).print(view)
    if args.out:
        runs = [{"file": path.name, "needle_seed": payload.get("settings", {}).get("needle_seed", 0),
                 "pass_rate": needle_pass_rate(needle)}
                for path, payload, needle in zip(args.runs, payloads, needles, strict=True)]  # fmt: skip
        result = {"benchmark": "needle_agreement", "command": " ".join([sys.executable, *sys.argv]), "runs": runs,
                  "agreement": table}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
