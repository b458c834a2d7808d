"""Registers, spills and shared memory of the paged-attention kernel, compiled for Hopper without a GPU.

Triton ships ptxas, so the kernel can be compiled for sm_90a on any machine. Occupancy decides how much
memory latency a decode kernel can hide: a 4-warp program at 244 registers per thread leaves room for
only two programs per SM. Run this before spending GPU time on a tile change.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.backends.nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode

POINTERS = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32",
    "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "rot_ptr": "*fp32", "k_cent_ptr": "*fp16", "v_cent_ptr": "*fp16",
    "out_ptr": "*bf16", "ws_acc_ptr": "*fp32", "ws_max_ptr": "*fp32", "ws_sum_ptr": "*fp32", "qk_scale": "fp32",
    "koff_ptr": "*fp32", "lut_ptr": "*i32",
}  # fmt: skip
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def ptxas_report(ptx: str, arch: str) -> dict[str, int]:
    ptxas = Path(nvidia_backend.__file__).parent / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_store_bytes": int(spills.group(1)) if spills else 0}


def compile_attention(
    head_dim: int, num_heads: int, num_kv_heads: int, split: bool, change: dict, key_offset: bool = False
) -> dict:
    """Compile _attention_kernel as paged_attention would launch it for a bf16 decode batch."""
    key = triton.next_power_of_2(head_dim)
    default = decode._TILES[key]
    decode._TILES[key] = dataclasses.replace(default, **change)
    try:
        codec = KVCodec(TQConfig(), num_kv_heads, head_dim)
        meta = decode._attention_meta(codec, num_heads, torch.bfloat16, True, 1, 16, not split, key_offset=key_offset)
        launch = {k: meta.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in meta}
        names = decode._attention_kernel.arg_names
        signature = {n: "constexpr" if n in meta else POINTERS.get(n, "i32") for n in names}
        source = ASTSource(decode._attention_kernel, signature, {(names.index(k),): v for k, v in meta.items()})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch)
    finally:
        decode._TILES[key] = default
    report = ptxas_report(kernel.asm["ptx"], "sm_90a")
    warps = launch["num_warps"]
    by_regs = REGISTERS_PER_SM // max(1, report["registers"] * 32 * warps)
    return {
        "head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "split_k": split,
        "key_offset": key_offset,
        "tiles": dataclasses.asdict(dataclasses.replace(default, **change)), **report,
        "shared_bytes": kernel.metadata.shared,
        "programs_per_sm_by_registers": min(by_regs, MAX_WARPS_PER_SM // warps),
        "convert_layout_ops": kernel.asm["ttgir"].count("ttg.convert_layout"),
        "mma": "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cases = [(128, 32, 8, True, {}), (128, 32, 8, False, {}), (64, 9, 3, True, {}), (256, 8, 1, True, {})]
    cases += [
        (128, 32, 8, True, c)
        for c in (
            {"num_warps": 8},
            {"num_stages": 2},
            {"block_n": 32},
            {"block_n": 128},
            {"maxnreg": 128},
            {"swap_ab": True},
            {"swap_ab": True, "maxnreg": 168},
        )  # fmt: skip
    ]
    cases += [(128, 32, 8, True, {}, True), (128, 32, 8, False, {}, True)]  # with calibrated key offsets
    rows = []
    for case in cases:
        rows.append(compile_attention(*case))
        r = rows[-1]
        label = (case[4] or "default") if not r["key_offset"] else "key offset"
        print(f"d={r['head_dim']} split={r['split_k']} {label}: {r['registers']} regs, "
              f"{r['spill_store_bytes']} B spilled, {r['programs_per_sm_by_registers']} programs/SM, "
              f"{r['convert_layout_ops']} layout conversions, {r['mma']}", flush=True)  # fmt: skip
    if args.out:
        result = {"benchmark": "kernel_resources", "target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                  "command": " ".join([sys.executable, *sys.argv]), "rows": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
