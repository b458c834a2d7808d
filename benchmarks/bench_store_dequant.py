"""Store and dequantise throughput on CUDA, next to a plain device-to-device copy of the same bytes."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import store
from turboquant_vllm.kernels.dequant import dequantize_kv
from turboquant_vllm.kernels.store import store_kv

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 16384, 32768, 65536])
    p.add_argument("--bits", nargs="+", default=["4/4", "3/3", "2/2"], help="k_bits/v_bits pairs")
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--num-q-heads", type=int, default=32, help="K/V are views of a fused qkv tensor, as in vLLM")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms (eager fallback only)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--no-store-variants", dest="store_variants", action="store_false",
                   help="time only the default store launch (not SMALL_/LARGE_STORE_VARIANTS)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: one size, 4/4 only, short timings")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.bits, args.warmup, args.rep = [4096], ["4/4"], 5, 20
    return args


def paged_slots(num_tokens: int, block_size: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    """Slots of one long sequence laid over randomly permuted blocks, like a vLLM block table."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(num_blocks, generator=g)
    pos = torch.arange(num_tokens)
    return (blocks[pos // block_size] * block_size + pos % block_size).to(device)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


EAGER_TIMINGS: list[str] = []  # calls that could not be captured in a CUDA graph (timed with launch overhead)


def bench(fn, args: argparse.Namespace) -> float:
    """Mean ms per call inside a CUDA graph, as vLLM replays decode steps: an eager Triton launch costs more host
    time than a one-token store takes on the GPU, so eager timing measured the launcher, not the kernel."""
    fn()
    torch.cuda.synchronize()
    try:
        return float(do_bench_cudagraph(fn, rep=args.rep))
    except Exception as err:  # noqa: BLE001 - a capture failure only changes how the call is timed
        torch.cuda.synchronize()
        EAGER_TIMINGS.append(repr(err)[:200])
        return float(do_bench(fn, warmup=args.warmup, rep=args.rep))


def bench_copy(nbytes: int, args: argparse.Namespace) -> dict:
    """torch copy_ between two device buffers; GB/s counts bytes moved (read + written)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), args)
    return {"bytes": nbytes, "ms": ms, "gbps_moved": gbps(2 * nbytes, ms)}


SMALL_STORE_VARIANTS = [
    {"block_k": 16},
    {"num_warps": 8},
    {"block_k": 16, "num_warps": 8},
    {"contract_last": True},  # store.CONTRACT_LAST: the broadcast rotation contracts within warps
    {"contract_last": True, "block_k": 64},  # which fits 64 columns of R a step unspilled (offline)
    {"num_warps": 2},  # offline: 166 registers, 1,368 instructions, 35 barriers (default: 111, 1,016, 23)
    {"num_warps": 1, "block_k": 16},  # one warp: 156 registers, 1,560 instructions, 3 barriers
]
LARGE_STORE_VARIANTS = [  # prefill-sized launches, changes to the default (32 tokens a program, split tf32, search)
    {"block_t": 16, "precision": "ieee", "bucket_search": False},  # the default before 2026-12-02e
    {"block_t": 16, "precision": "tf32x3", "bucket_search": False},
    {"block_t": 16, "bucket_search": False},
    {"block_t": 16},
    {"bucket_search": False},
    {"block_k": 64},
    {"block_t": 64, "num_warps": 8},  # wgmma (offline)
    {"merge_value_groups": False},  # coordinate-major values (fp8_values) by two atomics a nibble, as before 2026-12-05
]


def store_variants(run, num_tokens: int, args: argparse.Namespace) -> list[dict]:
    """The store timed with other launch shapes (store._launch_params's fields) and, for decode-sized batches,
    the broadcast rotation's other contraction (store.CONTRACT_LAST)."""
    default_params, default_contract = store._launch_params, store.CONTRACT_LAST
    small = num_tokens < store.LARGE_BATCH_TOKENS
    rows = []
    for change in SMALL_STORE_VARIANTS if small else LARGE_STORE_VARIANTS:
        fields = {k: v for k, v in change.items() if k != "contract_last"}
        launch = default_params(num_tokens, args.num_kv_heads)._replace(**fields)
        store._launch_params = lambda n, h, p=launch: p
        store.CONTRACT_LAST = change.get("contract_last", default_contract)
        try:
            rows.append({**change, "ms": bench(run, args)})
        finally:
            store._launch_params, store.CONTRACT_LAST = default_params, default_contract
    return rows


def make_inputs(codec: KVCodec, num_tokens: int, args: argparse.Namespace):
    h, d = codec.num_kv_heads, codec.head_dim
    qkv = torch.randn(num_tokens, args.num_q_heads + 2 * h, d, dtype=DTYPES[args.dtype], device="cuda")
    key, value = qkv[:, args.num_q_heads : args.num_q_heads + h], qkv[:, args.num_q_heads + h :]
    num_blocks = triton.cdiv(num_tokens, args.block_size)
    cache = codec.new_cache(num_blocks, args.block_size, "cuda")
    return key, value, cache, paged_slots(num_tokens, args.block_size, num_blocks, key.device)


def bench_case(k_bits: int, v_bits: int, num_tokens: int, args: argparse.Namespace) -> dict:
    """Store (haar and hadamard) and dequantise (rotated and original basis) one shape."""
    h, d = args.num_kv_heads, args.head_dim
    codec = KVCodec(TQConfig(k_bits=k_bits, v_bits=v_bits), h, d, "cuda")
    key, value, cache, slots = make_inputs(codec, num_tokens, args)
    cache_bytes = num_tokens * codec.layout.bytes_per_token
    input_bytes = 2 * num_tokens * h * d * key.element_size()
    store_ms = bench(lambda: store_kv(codec, key, value, cache, slots), args)
    row = {
        "k_bits": k_bits,
        "v_bits": v_bits,
        "num_tokens": num_tokens,
        "num_kv_heads": h,
        "head_dim": d,
        "bytes_per_token": codec.layout.bytes_per_token,
        "cache_bytes": cache_bytes,
        "input_bytes": input_bytes,
        "store": {
            "ms": store_ms,
            "cache_gbps": gbps(cache_bytes, store_ms),
            "input_gbps": gbps(input_bytes, store_ms),
            "total_gbps": gbps(cache_bytes + input_bytes, store_ms),
        },
    }
    if args.store_variants:
        row["store_variants"] = store_variants(lambda: store_kv(codec, key, value, cache, slots), num_tokens, args)
    hadamard = KVCodec(TQConfig(k_bits=k_bits, v_bits=v_bits, rotation="hadamard"), h, d, "cuda")
    had_ms = bench(lambda: store_kv(hadamard, key, value, cache, slots), args)
    row["store_hadamard"] = {"ms": had_ms, "cache_gbps": gbps(cache_bytes, had_ms)}

    out_k = torch.empty(num_tokens, h, d, dtype=torch.bfloat16, device="cuda")
    out_v = torch.empty_like(out_k)
    out_bytes = 2 * out_k.numel() * out_k.element_size()
    for rotated in (True, False):
        ms = bench(lambda r=rotated: dequantize_kv(codec, cache, slots, rotated=r, out_k=out_k, out_v=out_v), args)
        row["dequant_rotated" if rotated else "dequant_original"] = {
            "ms": ms,
            "cache_gbps": gbps(cache_bytes, ms),
            "output_bytes": out_bytes,
            "total_gbps": gbps(cache_bytes + out_bytes, ms),
        }
    row["copy_cache_bytes"] = bench_copy(cache_bytes, args)
    row["copy_input_bytes"] = bench_copy(input_bytes, args)
    return row


def variant_label(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items() if k != "ms")


def report(row: dict) -> str:
    s, hs, dr, do = row["store"], row["store_hadamard"], row["dequant_rotated"], row["dequant_original"]
    c = row["copy_cache_bytes"]
    return (
        f"{row['k_bits']}/{row['v_bits']} T={row['num_tokens']:>6} | store {s['ms'] * 1e3:7.1f} us "
        + "".join(f"({variant_label(v)} {v['ms'] * 1e3:.1f}) " for v in row.get("store_variants", []))
        + f"{s['cache_gbps']:6.0f} GB/s cache, {s['total_gbps']:6.0f} GB/s in+out (hadamard {hs['ms'] * 1e3:7.1f} us) "
        f"| dequant rot {dr['ms'] * 1e3:7.1f} us {dr['cache_gbps']:6.0f} GB/s cache, {dr['total_gbps']:6.0f} in+out; "
        f"orig (+ GEMM by R) {do['ms'] * 1e3:7.1f} us "
        f"| copy {c['bytes'] / 1e6:.1f} MB {c['ms'] * 1e3:6.1f} us "
        f"{c['gbps_moved']:6.0f} GB/s moved"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_store_dequant needs a CUDA GPU (the Triton kernels are timed on device); none found.")
        return 2
    bits = [tuple(int(b) for b in pair.split("/")) for pair in args.bits]
    rows = []
    for k_bits, v_bits in bits:
        for num_tokens in args.tokens:
            rows.append(bench_case(k_bits, v_bits, num_tokens, args))
            print(report(rows[-1]), flush=True)
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "benchmark": "store_dequant",
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "block_size": args.block_size,
        "num_q_heads": args.num_q_heads,
        "timer": "CUDA graph replay (triton.testing.do_bench_cudagraph)",
        "eager_timings": EAGER_TIMINGS,
        "results": rows,
    }
    out = args.out or RESULTS / f"store_dequant_{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
