"""Registers, spills and shared memory of the paged-attention kernel, compiled for Hopper without a GPU.

Triton ships ptxas, so the kernel can be compiled for sm_90a on any machine. Occupancy decides how much
memory latency a decode kernel can hide: a 4-warp program at 244 registers per thread leaves room for
only two programs per SM. Run this before spending GPU time on a tile change.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
import triton.backends.nvidia as nvidia_backend
import triton.language as tl
from bench_store_dequant import LARGE_STORE_VARIANTS  # this script's folder is on sys.path
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode, decode_reduce, decode_tiles, store
from turboquant_vllm.kernels import recent as recent_module

POINTERS = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32",
    "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "rot_ptr": "*fp32", "k_cent_ptr": "*fp16", "v_cent_ptr": "*fp16",
    "out_ptr": "*bf16", "ws_acc_ptr": "*fp32", "ws_max_ptr": "*fp32", "ws_sum_ptr": "*fp32", "qk_scale": "fp32",
    "koff_ptr": "*fp32", "lut_ptr": "*i32", "ws_q_ptr": "*fp32", "slot_ptr": "*i64", "k_bnd_ptr": "*fp32",
    "k_cent32_ptr": "*fp32", "v_bnd_ptr": "*fp32", "v_cent32_ptr": "*fp32", "koff_orig_ptr": "*fp32",
    "ws_ticket_ptr": "*i32", "sink_kv_ptr": "*bf16", "sink_tag_ptr": "*i32",
    "recent_kv_ptr": "*bf16", "recent_tag_ptr": "*i32",
    "key_ptr": "*bf16", "value_ptr": "*bf16", "rot_lo_ptr": "*fp32", "koff_rot_ptr": "*fp32",
}  # fmt: skip
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
H200_SMS = 132
REGISTER_GRANULE = 8  # registers are allocated per warp in 256s, i.e. per thread in multiples of 8


def triton_tool(name: str) -> Path:
    """A CUDA binary Triton ships (ptxas, nvdisasm): no CUDA toolkit needed."""
    return Path(nvidia_backend.__file__).parent / "bin" / name


def ptxas_report(ptx: str, arch: str) -> dict[str, int]:
    ptxas = triton_tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_store_bytes": int(spills.group(1)) if spills else 0}


# SASS opcodes of tensor-core MMAs: fp16/bf16 mma.sync and wgmma, and fp8 wgmma (Tiles.fp8_keys)
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "QGMMA")


def disassemble(cubin: bytes) -> str:
    """The SASS of `cubin`, by the nvdisasm Triton ships."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(triton_tool("nvdisasm")), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def context_loop_sass(cubin: bytes) -> dict[str, int]:
    """Instruction counts of the context loop (one pass per BLOCK_N tile) in the SASS of `cubin`: the largest loop
    (a branch back to an earlier label) with tensor-core instructions (the tile's two dots; the fused store's loop
    has none)."""
    sass = disassemble(cubin)
    labels: dict[str, int] = {}
    code: list[tuple[int, str, str | None]] = []  # address, opcode (predicate dropped), branch target label
    pending: list[str] = []
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label.group(1))
        elif ins := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            addr = int(ins.group(1), 16)
            labels.update(dict.fromkeys(pending, addr))
            pending = []
            text = re.sub(r"^@!?U?P\w+\s+", "", ins.group(2))
            target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
            code.append((addr, text.split()[0], target.group(1) if target else None))
    loops = [(labels[t], addr) for addr, _, t in code if t in labels and labels[t] <= addr]
    if not loops:
        return {}

    def ops_in(span: tuple[int, int]) -> list[str]:
        return [op for addr, op, _ in code if span[0] <= addr <= span[1]]

    def tensor_core(ops: list[str]) -> int:
        return sum(op.startswith(TENSOR_CORE_OPS) for op in ops)

    lo, hi = max(loops, key=lambda span: (tensor_core(ops_in(span)) > 0, span[1] - span[0]))
    ops = ops_in((lo, hi))
    return {
        "instructions": len(ops),
        "register_moves": sum(op.startswith(("IMAD.MOV", "MOV")) or op == "IMAD.U32" for op in ops),
        "byte_permutes": sum(op.startswith("PRMT") for op in ops),
        "barriers": sum(op.startswith("BAR") for op in ops),
        "tensor_core": tensor_core(ops),
        "global_loads": sum(op.startswith("LDG") for op in ops),
        "shared_stores": sum(op.startswith("STS") for op in ops),
        "local_accesses": sum(op.startswith(("LDL", "STL")) for op in ops),  # spilled registers
    }


def compile_toy_loop(fn, pointers: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4) -> dict:
    """Registers, shared-memory conversions and context-loop SASS of an offline probe's toy kernel for sm_90a.

    fn's arguments are `pointers` (name: Triton pointer type, 16-byte aligned), one i32 `n_tiles` and `constexprs`.
    """
    names = fn.arg_names
    signature = {**pointers, "n_tiles": "i32", **dict.fromkeys(constexprs, "constexpr")}
    values = {(names.index(k),): v for k, v in constexprs.items()}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    kernel = triton.compile(ASTSource(fn, signature, values, aligned), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": 1})  # fmt: skip
    return {
        **ptxas_report(kernel.asm["ptx"], "sm_90a"),
        "shared_memory_conversions": kernel.asm["ttgir"].count("ttg.local_alloc"),
        "context_loop_sass": context_loop_sass(kernel.asm["cubin"]),
    }


def launch_ints(head_dim: int, num_heads: int, num_kv_heads: int, split: bool) -> dict[str, int]:
    """The integer arguments of a vLLM decode launch: query/output contiguous, key/value views of the fused
    qkv projection, a 33K-token block table of 16-token pages, the backend's split-K workspace."""
    qkv = (num_heads + 2 * num_kv_heads) * head_dim
    splits = decode_tiles.MAX_SPLITS  # the workspace's width
    ws = (num_heads * splits * head_dim, splits * head_dim, head_dim) if split else (0, 0, 0)
    stats = (num_heads * splits, splits, 1) if split else (0, 0, 0)
    strides = (num_heads * head_dim, head_dim, 1, qkv, head_dim, 1, qkv, head_dim, 1, num_heads * head_dim, head_dim, 1,
               2064, *ws, *stats, head_dim, 1)  # fmt: skip
    names = decode._attention_kernel.arg_names
    return dict(zip(names[names.index("stride_qt") : names.index("stride_r1") + 1], strides, strict=True))


def runtime_signature(
    meta: dict, ints: dict[str, int], fn=decode._attention_kernel, pointers: dict[str, str] = POINTERS
) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as Triton's launcher derives them from real arguments: pointers
    16-byte aligned, ints equal to 1 become constants and multiples of 16 are marked divisible. Without this
    the offline compile differs from the GPU's own (on the H200 the 168-register decode kernel spilled 0 bytes,
    the unspecialised offline compile 40)."""
    names = fn.arg_names
    fixed = dict(meta)
    signature, attrs = {}, {}
    for i, n in enumerate(names):
        if n in meta:
            signature[n] = "constexpr"
        elif n in ints and n not in fn.do_not_specialize:
            kind, attr = native_specialize_impl(BaseBackend, ints[n], False, True, True)
            signature[n] = kind
            if kind == "constexpr":
                fixed[n] = ints[n]
            elif attr:
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        else:
            signature[n] = pointers.get(n, "i32")
            if signature[n].startswith("*"):
                attrs[(i,)] = BaseBackend.parse_attr("D")
    return signature, {(names.index(k),): v for k, v in fixed.items()}, attrs


def compile_attention(
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    num_splits: int,
    change: dict,
    key_offset: bool = False,
    store_new: bool = False,
    sinks: int = 0,
    recent: int = 0,
    config: TQConfig | None = None,
    max_query_len: int = 1,
) -> dict:
    """Compile _attention_kernel as paged_attention would launch it for a bf16 decode batch with num_splits
    splits (16 sequences of 8 KV heads take 3; one sequence 32, which selects the wide tiles), with token-major
    values (TQConfig(fp8_values=False); the default at head_dim 128 is the fp8_values cases') or `config`;
    max_query_len > 1: speculative-decoding queries, or a prefill chunk's varlen tile once past the decode tile's."""
    split = num_splits > 1
    key = triton.next_power_of_2(head_dim)
    default = decode_tiles.TILES[key]
    decode_tiles.TILES[key] = dataclasses.replace(default, **change)
    try:
        codec = KVCodec(config or TQConfig(fp8_values=False), num_kv_heads, head_dim)
        meta = decode_tiles.attention_meta(codec, num_heads, torch.bfloat16, True, max_query_len, 16, not split,
                                      num_splits,
                                      key_offset=key_offset, store_new=store_new, sinks=sinks,
                                      recent=recent)  # fmt: skip
        launch = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
        signature, constexprs, attrs = runtime_signature(meta, launch_ints(head_dim, num_heads, num_kv_heads, split))
        source = ASTSource(decode._attention_kernel, signature, constexprs, attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch)
    finally:
        decode_tiles.TILES[key] = default
    report = ptxas_report(kernel.asm["ptx"], "sm_90a")
    warps = launch["num_warps"]
    per_thread = -(-report["registers"] // REGISTER_GRANULE) * REGISTER_GRANULE
    by_regs = REGISTERS_PER_SM // max(1, per_thread * 32 * warps)
    return {
        "head_dim": head_dim, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "split_k": split,
        "num_splits": num_splits, "key_offset": key_offset, "store_new": store_new, "sinks": sinks,
        "recent": recent, "fp8_values": codec.layout.v_coordinate_major, "fp8_value_products": meta["FP8_VALUES"],
        "fp8_key_scores": meta["FP8_KEYS"], "max_query_len": max_query_len, "block_n": meta["BLOCK_N"],
        "swap_ab": meta["SWAP_AB"], "maxnreg": launch.get("maxnreg"),
        "tiles": dataclasses.asdict(dataclasses.replace(default, **change)), **report,
        "shared_bytes": kernel.metadata.shared,
        "programs_per_sm_by_registers": min(by_regs, MAX_WARPS_PER_SM // warps),
        "convert_layout_ops": kernel.asm["ttgir"].count("ttg.convert_layout"),
        "mma": "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync",
        "context_loop_sass": context_loop_sass(kernel.asm["cubin"]),
    }  # fmt: skip


def compile_reduce(
    block_d: int, plain: bool = False, change: dict | None = None, num_splits: int = 3, recent: int = 0
) -> dict:
    """The split-K reduce as paged_attention launches it for bf16 output at one padded head_dim; `plain` when the
    split programs stored un-rotated partials (`Tiles.unrotated_min_splits`); `change` alters the tiles; `recent`:
    the last reader of a window of that many tokens (writer programs where `Tiles.window_writer_in_reduce`)."""
    default = decode_tiles.TILES[block_d]
    decode_tiles.TILES[block_d] = dataclasses.replace(default, **(change or {}))
    try:
        meta = decode_tiles.reduce_meta(32, block_d, block_d, plain, tl.float16, "tf32", num_splits, False, recent)
    finally:
        decode_tiles.TILES[block_d] = default
    if meta["WRITE_RECENT"]:
        meta |= {"BLOCK_SIZE": 16, "WRITER_ROT_CHUNK": recent_module.WRITER_ROT_CHUNK}
    options = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
    fn = decode_reduce._reduce_splits_kernel
    pointers = dict.fromkeys(("ws_acc_ptr", "ws_max_ptr", "ws_sum_ptr", "rot_ptr"), "*fp32")
    pointers |= {"out_ptr": "*bf16", "qsl_ptr": "*i32", "k_ptr": "*bf16", "v_ptr": "*bf16", "recent_kv_ptr": "*bf16"}
    pointers |= dict.fromkeys(("block_table_ptr", "seq_lens_ptr", "recent_tag_ptr"), "*i32")
    signature = {n: "constexpr" if n in meta else pointers.get(n, "i32") for n in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in meta.items()}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    return {"kernel": "reduce", "block_d": block_d, "plain": plain, "change": change or {}, "num_splits": num_splits,
            "recent_writer": meta["WRITE_RECENT"], "rows": meta["BLOCK_R"],
            "step_splits": meta["STEP_SPLITS"], "rot_chunk": meta["ROT_CHUNK"], "rot_ahead": meta["ROT_AHEAD"],
            **ptxas_report(kernel.asm["ptx"], "sm_90a")}  # fmt: skip


def compile_store(
    launch: store.StoreLaunch, key_offset: bool = False, head_dim: int = 128, window: bool = False
) -> dict:
    """Compile _store_kv_kernel as store_kv launches it with `launch` for bf16 K/V (views of a fused qkv of 32
    query and 8 KV heads) and count its SASS: the whole kernel, which has no loop over tiles. window: as a decode
    step's store after the attention that writes the exact window (store_kv's recent)."""
    codec = KVCodec(TQConfig(), 8, head_dim)
    meta = store.store_meta(codec, launch, 16, key_offset, pdl=True, after_attention=window, window=window)
    qkv = 48 * head_dim
    ints = {"stride_key_t": qkv, "stride_key_h": head_dim, "stride_value_t": qkv, "stride_value_h": head_dim,
            "stride_rot_0": head_dim, "stride_rot_1": 1}  # fmt: skip
    fn = store._store_kv_kernel
    fp32_tables = dict.fromkeys(("k_cent_ptr", "v_cent_ptr"), "*fp32")  # the store's codebooks stay fp32
    window_table = {"window_kv_ptr": "*bf16", "window_tag_ptr": "*i32"}
    signature, constexprs, attrs = runtime_signature(meta, ints, fn, POINTERS | fp32_tables | window_table)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": launch.num_warps})  # fmt: skip
    sass = disassemble(kernel.asm["cubin"])
    ops = [m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)]
    return {"kernel": "store", "launch": launch._asdict(), "key_offset": key_offset, "window": window,
            **ptxas_report(kernel.asm["ptx"], "sm_90a"), "shared_bytes": kernel.metadata.shared,
            "sass_instructions": len(ops), "fp32_fma": ops.count("FFMA"),
            "tensor_core": sum(op.startswith(TENSOR_CORE_OPS) for op in ops),
            "compares_and_selects": sum(ops.count(o) for o in ("FSETP", "FSEL", "SEL")),
            "atomics": sum(op in ("RED", "REDG", "ATOM", "ATOMG") for op in ops),
            "shuffles": ops.count("SHFL")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    wide = decode_tiles.choose_num_splits(1, 8, decode_tiles.MAX_SPLITS, H200_SMS)  # one sequence's launch
    cases = [(128, 32, 8, 3, {}), (128, 32, 8, 1, {}), (128, 32, 8, wide, {}), (64, 9, 3, 3, {}), (256, 8, 1, 3, {})]
    cases += [
        (128, 32, 8, 3, c)
        for c in (
            {"maxnreg": None},
            {"maxnreg": 128},
            {"swap_ab": False, "maxnreg": None},
            {"swap_ab": False, "maxnreg": 128},
            {"block_n": 32},
            {"unrotated_min_splits": 2},
            {"prerotate_q_min_splits": None},
            {"k_fragment": False},
            {"lut_pairs": True},
            {"k_fragment": False, "lut_pairs": True},
            {"v_fragment": False},
        )  # fmt: skip
    ]
    cases += [(128, 32, 8, wide, {"v_fragment": False})]
    cases += [(128, 32, 8, wide, {"prerotate_q_min_splits": None})]
    cases += [(128, 32, 8, 3, {}, True), (128, 32, 8, 1, {}, True)]  # with calibrated key offsets
    cases += [(128, 32, 8, 3, {}, False, True), (128, 32, 8, wide, {}, True, True)]  # with the fused store
    cases += [(128, 32, 8, wide, {}, False, True)]  # the one-sequence engine step: store programs in the launch
    cases += [(128, 32, 8, wide, {"publish_q": True}, False, True)]  # ... whose store programs rotate the queries
    cases += [(128, 32, 8, 48, {"wide_block_n": None}, False, True)]  # ... in 48 splits of capped 64-token tiles
    cases += [(128, 32, 8, 3, {"tail_merge_min_splits": 2})]
    cases += [(128, 32, 8, n, {}, False, False, 4) for n in (1, 3, wide)]  # with 4 exact sinks (kernels/sinks.py)
    cases += [(128, 32, 8, n, {}, False, True, 0, 32) for n in (3, wide)]  # with 32 exact recent tokens (recent.py)
    # fp8 keys: the queries' halves by two MMAs at 3 splits and in rows when wide (the defaults), each the other way,
    # and rounded once
    fp8 = {"fp8_keys": True}
    cases += [(128, 32, 8, 3, {"fp8_keys": False})]  # fp16 keys, whichever the defaults are
    for form, splits in (
        ({}, (3, wide)),
        ({"fp8_halves_in_rows_min_splits": 1}, (3,)),
        ({"fp8_halves_in_rows_min_splits": None}, (wide,)),
        ({"fp8_query_halves": False}, (3, wide)),
    ):
        cases += [(128, 32, 8, n, fp8 | form) + ((False, True) if n == wide else ()) for n in splits]
        cases += [(64, 9, 3, 3, fp8 | form)] if 3 in splits else []
    # coordinate-major values in fp8 (TQConfig.fp8_values): the 16-sequence tile at its 128-register cap (4 splits,
    # 4 programs an SM), at the default 168, and the one-sequence engine step
    fp8_values = TQConfig(fp8_values=True)
    cases += [(128, 32, 8, 4, {}, False, False, 0, 0, fp8_values)]
    cases += [(128, 32, 8, 3, {"fp8_values_maxnreg": None}, False, False, 0, 0, fp8_values)]
    cases += [(128, 32, 8, wide, {}, False, True, 0, 0, fp8_values)]
    # ... with speculative-decoding queries and in a prefill chunk's varlen tile, at SmolLM2's head_dim 64, and at
    # 256, whose 16-token tiles are too short for an e4m3 dot's K side and gather the values instead
    cases += [(128, 32, 8, 3, {}, False, False, 0, 0, fp8_values, q_len) for q_len in (4, 64)]
    cases += [(64, 9, 3, 3, {}, False, False, 0, 0, fp8_values), (256, 32, 8, 3, {}, False, False, 0, 0, fp8_values)]
    # ... beside the exact window, with its keys scored in fp16 (TQConfig's default there) or fp8 (fp8_key_scores=True),
    # and with sinks too
    fp8_beside = TQConfig(fp8_values=True, fp8_key_scores=True)
    cases += [(128, 32, 8, n, {}, False, False, 0, 32, c) for c in (fp8_values, fp8_beside) for n in (4, wide)]
    cases += [(128, 32, 8, 4, {}, False, False, 4, 32, fp8_beside)]
    rows, seen = [], set()
    for case in cases:
        bound = inspect.signature(compile_attention).bind(*case)
        bound.apply_defaults()
        tiles = decode_tiles.TILES[triton.next_power_of_2(bound.arguments["head_dim"])]
        bound.arguments["change"] = dataclasses.asdict(dataclasses.replace(tiles, **bound.arguments["change"]))
        same = json.dumps(bound.arguments, sort_keys=True, default=repr)
        if same in seen:  # a variant that the defaults now equal: one row for one kernel
            continue
        seen.add(same)
        rows.append(compile_attention(*case))
        r = rows[-1]
        label = str(case[4] or "default") if not r["key_offset"] else "key offset"
        label += " + fused store" if r["store_new"] else ""
        label += f" + {r['sinks']} sinks" if r["sinks"] else ""
        label += f" + {r['recent']} recent" if r["recent"] else ""
        label += (
            (" + fp8 values" if r["fp8_value_products"] else " + coordinate-major values") if r["fp8_values"] else ""
        )
        label += f" + {r['max_query_len']}-token queries" if r["max_query_len"] > 1 else ""
        label += " + fp8 key scores" if r["fp8_key_scores"] and (r["sinks"] or r["recent"] or r["key_offset"]) else ""
        print(f"d={r['head_dim']} splits={r['num_splits']} {label}: {r['registers']} regs, "
              f"{r['spill_store_bytes']} B spilled, {r['programs_per_sm_by_registers']} programs/SM, "
              f"{r['convert_layout_ops']} layout conversions, {r['mma']}, context loop "
              f"{r['context_loop_sass'].get('instructions')} SASS instructions a tile", flush=True)  # fmt: skip
    reduce_rows = [compile_reduce(block_d, plain, num_splits=n) for block_d in sorted(decode_tiles.TILES)
                   for plain, n in ((False, 3), (False, wide), (True, wide))]  # fmt: skip
    reduce_rows += [compile_reduce(block_d, False, {"reduce_rows": n}) for block_d in sorted(decode_tiles.TILES)
                    for n in (1, 4)]  # fmt: skip
    in_reduce = {"window_writer_in_reduce": True}  # the recent window's writer programs in the reduce launch
    reduce_rows += [compile_reduce(128, plain, in_reduce, n, 32) for plain, n in ((False, 3), (True, wide))]
    reduce_rows += [compile_reduce(128, False, {"reduce_rot_ahead": True}, wide)]  # all of R ahead of the partials
    for r in reduce_rows:
        how = "plain sum" if r["plain"] else "all of R loaded ahead" if r["rot_ahead"] else (
            f"R in {r['rot_chunk']}-column slices")  # fmt: skip
        how += "" if r["plain"] or r["rows"] >= decode_reduce.REDUCE_BLOCK_R else " by multiply-adds"
        how += f", {r['recent_writer']}-token window writer" if r["recent_writer"] else ""
        print(f"reduce BLOCK_D={r['block_d']} at {r['num_splits']} splits ({r['rows']} rows, "
              f"{r['step_splits']} splits a step, {how}): "
              f"{r['registers']} regs, {r['spill_store_bytes']} B spilled", flush=True)  # fmt: skip
    prefill = store._launch_params(store.LARGE_BATCH_TOKENS, 8)
    store_rows = [compile_store(store._launch_params(1, 8)), compile_store(prefill)]
    store_rows += [compile_store(prefill._replace(**c)) for c in LARGE_STORE_VARIANTS]  # the ones the H200 times
    store_rows += [compile_store(prefill, key_offset=True), compile_store(store._launch_params(1, 8), window=True)]
    for r in store_rows:
        label = " + key offset" * r["key_offset"] + " + exact window" * r["window"]
        print(f"store {r['launch']}{label}: {r['registers']} regs, "
              f"{r['spill_store_bytes']} B spilled, {r['sass_instructions']} SASS instructions ({r['fp32_fma']} FFMA, "
              f"{r['tensor_core']} HMMA, {r['compares_and_selects']} compares and selects, {r['atomics']} atomics, "
              f"{r['shuffles']} shuffles)", flush=True)  # fmt: skip
    if args.out:
        result = {"benchmark": "kernel_resources", "target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                  "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "command": " ".join([sys.executable, *sys.argv]), "rows": rows, "reduce": reduce_rows,
                  "store": store_rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
