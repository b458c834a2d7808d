"""Where decode time goes: the paged-attention kernel next to kernels that do only part of its work.

Each stage kernel walks the same packed pages through the same block table with the same split-K grid as
kernels.decode, and does a growing share of the real inner loop:

    read     K and V index words + scales of every context token (the bytes the real kernel must read)
    unpack   + split the words into codebook indices (kernels.page.split_words, incl. its reshape)
    planar   + split the words with one shift per 4-bit plane and no reshape (an alternative unpack)
    gather   + look every index up in the codebook and scale it (what the tensor cores then consume)
    lookup   the same values from the byte-permute lookups in registers (kernels/lut.py), as the kernel does
    attention  the production kernel (dots, online softmax, split-K reduce, rotations)

The gap between two rows is what that step costs. Bandwidth is context bytes / time, next to a copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from turboquant_vllm.kernels.decode_tiles import choose_num_splits
from turboquant_vllm.kernels.lut import lut_decode_words
from turboquant_vllm.kernels.page import context_tile, split_words, tile_pages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import MAX_SPLITS, Caches, Shape, bench_ours, copy_bandwidth, gbps, run_header, time_ms  # noqa: E402

STAGES = {"read": 0, "unpack": 1, "planar": 2, "gather": 3, "lookup": 4}


@triton.jit
def _stage_kernel(
    cache_ptr, bt_ptr, seq_lens_ptr, k_cent_ptr, v_cent_ptr, lut_ptr, sink_ptr, num_splits,
    stride_bt,
    STAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, PAGE_BYTES: tl.constexpr,
    RUN_BYTES: tl.constexpr, K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    V_COORD: tl.constexpr, INDEX_ALIGN: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx_len = tl.load(seq_lens_ptr + seq) - 1
    n_tiles = tl.cdiv(ctx_len, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(tile_lo, tile_hi):
        live, kw, k_scale, vw, v_scale = context_tile(  # the attention kernel's own loads
            tile, ctx_len, tile_pages(tile, ctx_len, bt_row, BLOCK_N, BLOCK_SIZE), cache_ptr, kh, BLOCK_N,
            BLOCK_SIZE, HEAD_DIM, BLOCK_D, K_BITS, V_BITS, PAGE_BYTES, RUN_BYTES, K_INDEX_OFFSET, K_INDEX_BYTES,
            K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET, INDEX_ALIGN)  # fmt: skip
        if STAGE == 0:
            acc += tl.sum((kw ^ vw).to(tl.float32), 1) + k_scale + v_scale
        elif STAGE == 4:
            kc = lut_decode_words(kw, lut_ptr, BLOCK_N, BLOCK_D).to(tl.float32) * k_scale[:, None]
            vc = lut_decode_words(vw, lut_ptr + 4, BLOCK_N, BLOCK_D).to(tl.float32) * v_scale[:, None]
            acc += tl.sum(kc + vc, 1)
        elif STAGE == 2:
            for plane in tl.static_range(8):
                kc = tl.load(k_cent_ptr + ((kw >> (4 * plane)) & 15))
                vc = tl.load(v_cent_ptr + ((vw >> (4 * plane)) & 15))
                acc += tl.sum(kc, 1) * k_scale + tl.sum(vc, 1) * v_scale
        else:
            k_idx = split_words(kw, K_BITS, BLOCK_D, BLOCK_N)
            v_idx = split_words(vw, V_BITS, BLOCK_D, BLOCK_N)
            if STAGE == 1:
                acc += tl.sum((k_idx ^ v_idx).to(tl.float32), 1) + k_scale + v_scale
            else:
                kc = tl.load(k_cent_ptr + k_idx) * k_scale[:, None]
                vc = tl.load(v_cent_ptr + v_idx) * v_scale[:, None]
                acc += tl.sum(kc + vc, 1)
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + split
    tl.store(sink_ptr + pid, tl.sum(acc, 0))


def bench_stage(caches: Caches, shape: Shape, table: torch.Tensor, stage: str, rep: int, block_n: int,
                num_warps: int) -> dict:  # fmt: skip
    codec, b = caches.codec, shape.batch
    lay = codec.layout
    props = torch.cuda.get_device_properties(0)
    splits = choose_num_splits(b, shape.hkv, MAX_SPLITS, props.multi_processor_count, shape.d)
    seq_lens = torch.full((b,), shape.context, dtype=torch.int32, device="cuda")
    sink = torch.empty(b * shape.hkv * splits, dtype=torch.float32, device="cuda")
    cache = caches.ours

    def run() -> None:
        _stage_kernel[(b, shape.hkv, splits)](
            cache, table, seq_lens, codec.key.centroids, codec.value.centroids, codec.lut, sink, splits,
            table.stride(0), STAGE=STAGES[stage], BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(shape.d), **lay.kernel_constants(shape.block_size),
            INDEX_ALIGN=lay.index_alignment(shape.block_size), num_warps=num_warps,
        )  # fmt: skip

    ms, timer = time_ms(run, rep)
    read = b * (shape.context - 1) * lay.bytes_per_token
    return {"ms": ms, "timer": timer, "num_splits": splits, "gbps": gbps(read, ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rep", type=int, default=25)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ns = argparse.Namespace(num_kv_heads=8, head_dim=128, block_size=16, contexts=[args.context])
    copy = copy_bandwidth(1.0, args.rep)
    print(f"copy: {copy['gbps_read']:.0f} GB/s one-way", flush=True)
    rows = []
    for batch in args.batches:
        caches = Caches(ns, batch)
        shape = Shape(batch, args.context, 32, 8, 128, 16)
        table = caches.table(shape)
        for stage in STAGES:
            for block_n in (64, 128):
                for warps in (4, 8):
                    res = bench_stage(caches, shape, table, stage, args.rep, block_n, warps)
                    rows.append({"batch": batch, "stage": stage, "block_n": block_n, "num_warps": warps, **res})
                    print(f"B={batch} {stage:8s} n={block_n} w={warps}: {res['ms'] * 1e3:8.1f} us "
                          f"{res['gbps']:6.0f} GB/s", flush=True)  # fmt: skip
        res = bench_ours(caches, shape, table, args.rep)
        res.pop("_out")
        rows.append({"batch": batch, "stage": "attention", **res})
        print(f"B={batch} attention: {res['ms'] * 1e3:8.1f} us {res['gbps']:6.0f} GB/s", flush=True)
        del caches
    result = {
        **run_header("profile_decode"),
        "shape": {"context": args.context, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "bits": "4/4"},
        "copy": copy,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
