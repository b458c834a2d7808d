"""Fetch and cache the evaluation assets (Austen texts, SmolLM2 GGUF and its HF conversion) ahead of tests."""

from __future__ import annotations

import argparse
import time

from turboquant_vllm.eval import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", default=None, help="default: $TURBOQUANT_VLLM_CACHE or ~/.cache/turboquant_vllm")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--skip-model", action="store_true", help="only the Austen texts")
    args = parser.parse_args()

    steps = [("austen", lambda: f"{len(data.austen_text(args.cache_dir))} novels")]
    if not args.skip_model:
        steps += [
            ("smollm2 gguf", lambda: data.smollm2_path(args.cache_dir)),
            ("smollm2 hf", lambda: data.smollm2_hf_dir(args.cache_dir, dtype=args.dtype)),
        ]
    for name, step in steps:
        start = time.perf_counter()
        result = step()
        print(f"{name}: {result} ({time.perf_counter() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
