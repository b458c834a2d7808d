"""Decode attention time on CUDA: our packed-page kernel next to FA3 bf16/fp8, vLLM's TurboQuant and a copy.

Llama-3.1-8B-like shapes (32 q heads, 8 KV heads, head_dim 128, 16-token pages), one query token per
sequence, contexts 1K..128K, batch 1 and 16. Every kernel is timed inside a CUDA graph when possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from decode_variants import LAUNCH_KEYS, SWITCHES, VARIANTS, applies  # this script's folder is on sys.path
from triton.testing import do_bench

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode, decode_tiles, pdl
from turboquant_vllm.kernels import store as store_kernel
from turboquant_vllm.kernels.decode import paged_attention
from turboquant_vllm.kernels.decode_tiles import MAX_SPLITS, choose_split_grid
from turboquant_vllm.kernels.recent import SEGMENT, RecentTable, recent_entries, write_recent
from turboquant_vllm.kernels.sinks import SinkTable, table_entries, write_sinks
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.kernels.workspace import AttentionWorkspace

RESULTS = Path(__file__).resolve().parent / "results"
FP8_VALUES_CHOICES = {"auto": None, "on": True, "off": False}  # --fp8-values: TQConfig.fp8_values
VLLM_TQ_PRESET = "turboquant_4bit_nc"  # 4-bit Lloyd-Max keys, 4-bit uniform values: the closest vLLM mode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contexts", type=int, nargs="+", default=[2**k for k in range(10, 18)])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rep", type=int, default=25, help="timing repetition budget, ms")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the device copy reference")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile / split-count sweep of our kernel")
    p.add_argument(
        "--sweep-contexts",
        type=int,
        nargs="+",
        default=[4096, 32768],
        help="contexts of the sweep (short ones show fixed per-launch costs, long ones throughput)",
    )
    p.add_argument(
        "--sweep-keys",
        nargs="+",
        default=None,
        help="only sweep variants that change these tile fields (and skip the split-count sweep); `store` times a "
        "separate store_kv against the fused store",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: two contexts, short timings, no sweep")
    p.add_argument(
        "--fp8-values",
        choices=("auto", "on", "off"),
        default="auto",
        help="ours with TQConfig(fp8_values=None/True/False): coordinate-major value pages and an fp8 P.V product "
        "(auto: on at head_dim 128)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/decode_<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.rep, args.no_sweep, args.copy_gib = [1024, 32768], 10, True, 0.5
    return args


def time_ms(fn: Callable[[], object], rep: int) -> tuple[float, str]:
    """Mean ms per call: inside a CUDA graph (no launch overhead) if fn can be captured, else plain do_bench."""
    fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep)), "cudagraph"
    except Exception:  # noqa: BLE001 - any capture failure just means "time it eagerly"
        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=10, rep=rep)), "eager"


def run_header(benchmark: str, started: datetime.datetime | None = None) -> dict:
    """What a result file says about its run: which script, when, the exact command, GPU and versions."""
    started = started or datetime.datetime.now(datetime.UTC)
    return {"benchmark": benchmark, "date": started.isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def copy_bandwidth(gib: float, rep: int) -> dict:
    n = int(gib * 2**30)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=10, rep=max(rep, 50)))
    return {"bytes": n, "ms": ms, "gbps_read_plus_write": gbps(2 * n, ms), "gbps_read": gbps(n, ms)}


@dataclasses.dataclass
class Shape:
    batch: int
    context: int  # tokens per sequence, the new one included
    hq: int
    hkv: int
    d: int
    block_size: int

    @property
    def blocks_per_seq(self) -> int:
        return triton.cdiv(self.context, self.block_size)


class Caches:
    """One set of caches per batch size, sized for the longest context; shorter ones use a random subset."""

    def __init__(self, args: argparse.Namespace, batch: int) -> None:
        self.args = args
        hkv, d, bs = args.num_kv_heads, args.head_dim, args.block_size
        self.num_blocks = batch * triton.cdiv(max(args.contexts), bs) + 1
        self.codec = KVCodec(
            TQConfig(k_bits=4, v_bits=4, fp8_values=FP8_VALUES_CHOICES[args.fp8_values]), hkv, d, "cuda"
        )
        lay = self.codec.layout
        self.ours = torch.randint(0, 256, (self.num_blocks, bs, lay.bytes_per_token), dtype=torch.uint8, device="cuda")
        runs = self.ours.view(self.num_blocks, hkv, -1)
        fields = lay.fields(bs)
        for off in (fields.k_scale, fields.v_scale):  # finite scales, so softmax sees real numbers
            scales = torch.rand(self.num_blocks, hkv, bs, device="cuda") + 0.5
            runs[:, :, off : off + 4 * bs] = scales.view(torch.uint8).view(self.num_blocks, hkv, 4 * bs)
        self.kv_bf16 = torch.randn(2, self.num_blocks, bs, hkv, d, dtype=torch.bfloat16, device="cuda")
        self.kv_fp8 = self.kv_bf16.to(torch.float8_e4m3fn)
        self.vllm_tq = None

    def table(self, shape: Shape) -> torch.Tensor:
        perm = torch.randperm(self.num_blocks - 1, device="cuda")[: shape.batch * shape.blocks_per_seq]
        return perm.view(shape.batch, shape.blocks_per_seq).to(torch.int32)


def bench_ours(caches: Caches, shape: Shape, table: torch.Tensor, rep: int, **step: object) -> dict:
    """Our decode step (ours_step's keywords) timed, with the bytes it reads."""
    run, info = ours_step(caches, shape, table, **step)  # type: ignore[arg-type]
    ms, timer = time_ms(run, rep)
    read = info["live"] * (shape.context - 1) * caches.codec.layout.bytes_per_token
    return {"ms": ms, "timer": timer, **info, "bytes_read": read, "gbps": gbps(read, ms)}


def ours_step(
    caches: Caches,
    shape: Shape,
    table: torch.Tensor,
    num_splits: int | None = None,
    store: str = "none",
    sinks: int = 0,
    recent: int = 0,
    writers: bool = True,
    live: int | None = None,
) -> tuple[Callable[[], None], dict]:
    """Our decode attention as a callable to time or capture, with its split grid and output.

    store="separate" adds store_kv of the step's K/V before it, "fused" hands the store
    to paged_attention (store_slots: in its launch or right after), as a decode step in vLLM needs either way.
    sinks: every sequence's first `sinks` tokens exact (kernels/sinks.py), plus the writer launch a vLLM step ends
    with (it writes nothing here: every position is past the sinks).
    recent: every sequence's newest `recent` context tokens exact (kernels/recent.py), plus the writer launch of the
    step's new token.
    writers: False leaves the sinks' and recent tokens' writer launches out, to time the attention's share alone.
    live: only the first `live` sequences have a query; the rest are padding rows (no query, no context), as in a
    CUDA graph vLLM replays for a smaller batch; the grid is choose_split_grid's for the whole batch."""
    codec, b = caches.codec, shape.batch
    torch.manual_seed(0)  # the same q/k/v for every call, so sweep variants can be compared for equality
    q = torch.randn(b, shape.hq, shape.d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, shape.hkv, shape.d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    live = b if live is None else min(live, b)
    seq_lens = torch.full((b,), shape.context, dtype=torch.int32, device="cuda")
    seq_lens[live:] = 0
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda").clamp_(max=live)
    props = torch.cuda.get_device_properties(0)
    fp8_values = decode_tiles.fp8_value_tiles(codec, q.device)
    splits, split_slots = choose_split_grid(b, shape.hkv, MAX_SPLITS, props.multi_processor_count, shape.d,
                                            fp8_values)  # fmt: skip
    if num_splits:
        splits, split_slots = num_splits, 0
    ws = AttentionWorkspace.allocate(b, shape.hq, shape.d, max(splits, 2), "cuda")
    last = shape.context - 1  # the new token's position: its slot is written, never read
    slots = table[:, last // shape.block_size].long() * shape.block_size + last % shape.block_size
    slots[live:] = -1
    sink_table = None
    if sinks:
        sink_table = SinkTable.allocate(table_entries(b), sinks, shape.hkv, shape.d, torch.bfloat16, "cuda")
        sink_table.kv.normal_()
        first = table[:, 0].long()
        sink_table.tags[first % sink_table.entries] = first[:, None].int()
    recent_table = None
    if recent:
        recent_table = RecentTable.allocate(recent_entries(b, recent), recent, shape.hkv, shape.d, torch.bfloat16,
                                            "cuda")  # fmt: skip
        recent_table.kv.normal_()
        pos = torch.arange(last - recent, last, device="cuda")
        held = table[:, pos // shape.block_size].long() * shape.block_size + pos % shape.block_size  # [b, recent]
        recent_table.tags[held // SEGMENT % recent_table.entries, held % SEGMENT] = (held // SEGMENT)[..., None].int()

    def run() -> None:
        if store == "separate":
            store_kv(codec, k, v, caches.ours, slots)
        wrote = paged_attention(codec, q, k, v, caches.ours, table, seq_lens, qsl, shape.d**-0.5, out,
                                max_query_len=1, num_splits=splits, split_slots=split_slots, workspace=ws,
                                store_slots=slots if store == "fused" else None, sinks=sink_table,
                                recent=recent_table, write_recent=writers)  # fmt: skip
        if sink_table is not None and writers:
            write_sinks(sink_table, codec.rotation, k, v, table, seq_lens, qsl)
        if recent_table is not None and writers and not wrote:
            write_recent(recent_table, codec.rotation, k, v, table, seq_lens, qsl, shape.block_size)

    return run, {"num_splits": splits, "split_slots": split_slots, "live": live, "_out": out[:live]}


def bench_fa3(caches: Caches, shape: Shape, table: torch.Tensor, rep: int, fp8: bool) -> dict:
    ms, timer = time_ms(fa3_step(caches, shape, table, fp8), rep)
    kv = caches.kv_fp8 if fp8 else caches.kv_bf16
    read = shape.batch * shape.context * shape.hkv * shape.d * 2 * kv.element_size()
    return {"ms": ms, "timer": timer, "bytes_read": read, "gbps": gbps(read, ms)}


def fa3_step(caches: Caches, shape: Shape, table: torch.Tensor, fp8: bool) -> Callable[[], None]:
    """vLLM's FA3 decode over the bf16 or fp8 pages, as a callable to time or capture."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    b = shape.batch
    kv = caches.kv_fp8 if fp8 else caches.kv_bf16
    q = torch.randn(b, shape.hq, shape.d, dtype=torch.bfloat16, device="cuda")
    if fp8:
        q = q.to(torch.float8_e4m3fn)
    out = torch.empty(b, shape.hq, shape.d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((b,), shape.context, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    descale = torch.ones(b, shape.hkv, dtype=torch.float32, device="cuda") if fp8 else None

    def run() -> None:
        flash_attn_varlen_func(q=q, k=kv[0], v=kv[1], max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=shape.context,
                               seqused_k=seq_lens, softmax_scale=shape.d**-0.5, causal=True, block_table=table,
                               out=out, fa_version=3, q_descale=descale, k_descale=descale,
                               v_descale=descale)  # fmt: skip

    return run


def bench_vllm_tq(caches: Caches, shape: Shape, table: torch.Tensor, rep: int) -> dict:
    """vLLM 0.26's own TurboQuant decode (triton_turboquant_decode_attention), preset turboquant_4bit_nc."""
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention

    cfg = TurboQuantConfig.from_cache_dtype(VLLM_TQ_PRESET, shape.d)
    slot = cfg.slot_size_aligned
    if caches.vllm_tq is None:  # [num_blocks, block_size, Hk, slot]; fp16 norm/scale/zero fields made finite
        c = torch.randint(0, 256, (caches.num_blocks, shape.block_size, shape.hkv, slot), dtype=torch.uint8,
                          device="cuda")  # fmt: skip
        halves = c.view(torch.float16)
        for byte in (cfg.key_packed_size - 2, cfg.key_packed_size + cfg.value_packed_size - 4,
                     cfg.key_packed_size + cfg.value_packed_size - 2):  # fmt: skip
            halves[..., byte // 2] = 0.5
        caches.vllm_tq = c
    b = shape.batch
    q = torch.randn(b, shape.hq, shape.d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((b,), shape.context, dtype=torch.int32, device="cuda")
    h = torch.linalg.qr(torch.randn(shape.d, shape.d, device="cuda"))[0].contiguous()
    pit = h.T.contiguous()
    centroids = get_centroids(shape.d, cfg.centroid_bits).to("cuda", torch.float32)
    splits = MAX_SPLITS
    mid = torch.empty(b, shape.hq, splits, shape.d + 1, dtype=torch.float32, device="cuda")
    out = torch.empty(b, shape.hq, shape.d, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(b, shape.hq, dtype=torch.float32, device="cuda")

    def run() -> None:
        triton_turboquant_decode_attention(
            query=q, kv_cache=caches.vllm_tq, block_table=table, seq_lens=seq_lens, Pi=h, centroids=centroids,
            scale=shape.d**-0.5, mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
            value_quant_bits=cfg.effective_value_quant_bits, key_fp8=cfg.key_fp8,
            norm_correction=cfg.norm_correction, PiT=pit, mid_o_buf=mid, output_buf=out, lse_buf=lse,
            max_num_kv_splits=splits,
        )  # fmt: skip

    ms, timer = time_ms(run, rep)
    read = b * shape.context * shape.hkv * slot
    return {"ms": ms, "timer": timer, "num_splits": splits, "bytes_read": read, "gbps": gbps(read, ms)}


def guarded(fn: Callable[..., dict], *args: object, **kwargs: object) -> dict:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a missing or failing baseline must not stop the table
        return {"error": f"{type(err).__name__}: {str(err)[:300]}", "trace": traceback.format_exc(limit=3)[-600:]}


def sanity_check() -> dict:
    """Our kernel against the torch reference on one small mixed batch (guards the timings' meaning)."""
    from turboquant_vllm.kernels.reference import paged_attention_ref, store_ref

    g = torch.Generator().manual_seed(0)
    codec_cpu = KVCodec(TQConfig(), 8, 128)
    codec = KVCodec(TQConfig(), 8, 128, "cuda")
    seq_lens, q_lens, bs = [3000, 700, 50], [1, 1, 40], 16
    nb = sum(triton.cdiv(s, bs) for s in seq_lens)
    cache = codec_cpu.new_cache(nb, bs)
    table = torch.randperm(nb, generator=g).to(torch.int32)
    rows, used = [], 0
    for n, ql in zip(seq_lens, q_lens, strict=True):
        nbs = triton.cdiv(n, bs)
        row = torch.zeros(max(triton.cdiv(x, bs) for x in seq_lens), dtype=torch.int32)
        row[:nbs] = table[used : used + nbs]
        used += nbs
        rows.append(row)
        pos = torch.arange(n - ql)
        store_ref(codec_cpu, torch.randn(n - ql, 8, 128, generator=g), torch.randn(n - ql, 8, 128, generator=g),
                  cache, row.long()[pos // bs] * bs + pos % bs)  # fmt: skip
    bt = torch.stack(rows)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, h, 128, generator=g).to(torch.bfloat16) for h in (32, 8, 8))
    sl, qsl = torch.tensor(seq_lens, dtype=torch.int32), torch.tensor([0, 1, 2, 42], dtype=torch.int32)
    want = paged_attention_ref(codec_cpu, q, k, v, cache, bt, sl, qsl, 128**-0.5)
    result = {}
    for splits in (1, 8):
        out = torch.empty(t, 32, 128, dtype=torch.bfloat16, device="cuda")
        paged_attention(codec, q.cuda(), k.cuda(), v.cuda(), cache.cuda(), bt.cuda(), sl.cuda(), qsl.cuda(),
                        128**-0.5, out, max_query_len=40, num_splits=splits)  # fmt: skip
        err = (out.float().cpu() - want).abs().max().item() / want.abs().max().item()
        result[f"splits_{splits}_rel_err"] = err
    return result


def sweep(caches_by_batch: dict[int, Caches], args: argparse.Namespace) -> list[dict]:
    """Alternative tile configs and split counts at one long context: evidence for the defaults."""
    rows = []
    key = triton.next_power_of_2(args.head_dim)
    default = decode_tiles.TILES[key]
    switch_defaults = {k: getattr(*where) for k, where in SWITCHES.items()}
    variants = list(VARIANTS)
    if args.sweep_keys:
        variants = [v for v in variants if not v or set(v) & set(args.sweep_keys)]
    contexts = [c for c in args.sweep_contexts if c <= max(args.contexts)]  # the caches hold max(contexts) tokens
    for (batch, caches), ctx in itertools.product(caches_by_batch.items(), contexts):
        shape = Shape(batch, ctx, args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size)
        table = caches.table(shape)
        ref = None
        for change in variants:
            if not applies(change, batch):
                continue
            launch = {k: change[k] for k in LAUNCH_KEYS if k in change}
            fields = {k: v for k, v in change.items() if k not in launch and k not in SWITCHES}
            decode_tiles.TILES[key] = dataclasses.replace(default, **fields)
            for name, (module, attr) in SWITCHES.items():
                setattr(module, attr, change.get(name, switch_defaults[name]))
            res = guarded(bench_ours, caches, shape, table, args.rep, **launch)
            for name, (module, attr) in SWITCHES.items():
                setattr(module, attr, switch_defaults[name])
            out = res.pop("_out", None)
            if out is not None:  # every variant must compute what the default computes
                ref = out.float() if ref is None else ref
                rows_ref = ref[: out.shape[0]]  # a padded batch computes its live rows only
                res["max_rel_diff_vs_default"] = ((out.float() - rows_ref).abs().max() / rows_ref.abs().max()).item()
            rows.append({"batch": batch, "context": ctx, "change": change,
                         "tiles": dataclasses.asdict(decode_tiles.TILES[key]), **res})  # fmt: skip
            print(f"sweep B={batch} ctx={ctx} {change or 'default'}: {fmt(res)}", flush=True)
        decode_tiles.TILES[key] = default
        for store in () if args.sweep_keys and "store" not in args.sweep_keys else ("separate", "fused"):
            res = guarded(bench_ours, caches, shape, table, args.rep, store=store)
            res.pop("_out", None)
            rows.append({"batch": batch, "context": ctx, "store": store, **res})
            print(f"sweep B={batch} ctx={ctx} store {store}: {fmt(res)}", flush=True)
        for splits in () if args.sweep_keys else (2, 4, 8, 16, 32, 64):  # >= WIDE_MIN_SPLITS take the wide tiles
            res = guarded(bench_ours, caches, shape, table, args.rep, num_splits=splits)
            res.pop("_out", None)
            rows.append({"batch": batch, "context": ctx, "forced_splits": splits, **res})
            print(f"sweep B={batch} ctx={ctx} splits={splits}: {fmt(res)}", flush=True)
    return rows


def compiled_variants() -> list[dict]:
    """Registers and spills of each attention-kernel variant this run compiled, from the driver: the GPU's own
    compile specialises on the launch's arguments, which kernel_resources.py (offline) cannot reproduce."""
    names = decode._attention_kernel.arg_names
    wanted = ("BLOCK_M", "BLOCK_N", "SWAP_AB", "FUSED", "HAS_KEY_OFFSET", "K_LUT", "FP8_KEYS")
    rows = []
    for kernel_cache, *_ in decode._attention_kernel.device_caches.values():
        for kernel in kernel_cache.values():
            kernel._init_handles()
            consts = {names[i[0]]: v for i, v in getattr(kernel.src, "constants", {}).items() if len(i) == 1}
            rows.append({
                **{k: consts[k] for k in wanted if k in consts},
                "num_warps": kernel.metadata.num_warps, "maxnreg": getattr(kernel.metadata, "maxnreg", None),
                "registers": kernel.n_regs, "spills": kernel.n_spills, "shared_bytes": kernel.metadata.shared,
            })  # fmt: skip
            print(f"compiled {rows[-1]}")
    return rows


def fmt(res: dict) -> str:
    if "error" in res:
        return f"ERROR {res['error'][:120]}"
    diff = f" diff {res['max_rel_diff_vs_default']:.1e}" if "max_rel_diff_vs_default" in res else ""
    return f"{res['ms'] * 1e3:9.1f} us {res['gbps']:7.0f} GB/s ({res['timer']}){diff}"


def plot(rows: list[dict], copy: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for mode in ("ours_tq4", "fa3_bf16", "fa3_fp8", "vllm_tq4"):
            pts = [(r["context"], r[mode]) for r in rows if r["batch"] == batch and "ms" in r.get(mode, {})]
            if not pts:
                continue
            x = [p[0] for p in pts]
            axes[0][col].plot(x, [p[1]["ms"] * 1e3 for p in pts], marker="o", label=mode)
            axes[1][col].plot(x, [p[1]["gbps"] for p in pts], marker="o", label=mode)
        axes[1][col].axhline(copy["gbps_read_plus_write"], color="gray", ls="--", label="copy_ read+write")
        axes[1][col].axhline(copy["gbps_read"], color="gray", ls=":", label="copy_ read only")
        for row, ylabel in ((0, "time per call (us)"), (1, "cache bytes read / time (GB/s)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context tokens per sequence")
            ax.set_ylabel(ylabel)
            ax.set_title(f"decode, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (it times the Triton kernels on device); none found.")
        return 2
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001
        vllm_version = None
    now = datetime.datetime.now(datetime.UTC)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} vllm {vllm_version}")
    copy = copy_bandwidth(args.copy_gib, args.rep)
    print(f"copy_ {copy['bytes'] / 2**30:.1f} GiB: {copy['gbps_read_plus_write']:.0f} GB/s read+write, "
          f"{copy['gbps_read']:.0f} GB/s read")  # fmt: skip
    sanity = guarded(sanity_check)
    print(f"sanity vs reference: {sanity}")

    rows, caches_by_batch = [], {}
    for batch in args.batches:
        caches = caches_by_batch[batch] = Caches(args, batch)
        for ctx in args.contexts:
            shape = Shape(batch, ctx, args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size)
            table = caches.table(shape)
            ours = guarded(bench_ours, caches, shape, table, args.rep)
            ours.pop("_out", None)
            row = {"batch": batch, "context": ctx, "ours_tq4": ours}
            if vllm_version is not None:
                row["fa3_bf16"] = guarded(bench_fa3, caches, shape, table, args.rep, fp8=False)
                row["fa3_fp8"] = guarded(bench_fa3, caches, shape, table, args.rep, fp8=True)
                row["vllm_tq4"] = guarded(bench_vllm_tq, caches, shape, table, args.rep)
            rows.append(row)
            print(f"B={batch:3d} ctx={ctx:7d} | " + " | ".join(f"{m} {fmt(r)}" for m, r in row.items()
                                                               if isinstance(r, dict)), flush=True)  # fmt: skip
    sweep_rows = [] if args.no_sweep else sweep(caches_by_batch, args)
    del caches_by_batch

    result = {
        **run_header("decode", now),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "vllm": vllm_version,
        "shape": {
            "num_q_heads": args.num_q_heads,
            "num_kv_heads": args.num_kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "dtype": "bf16",
            "q_len": 1,
        },
        "notes": {
            "ours_tq4": f"paged_attention, TQConfig(4, 4, fp8_values={args.fp8_values}); bytes_read = packed rows of "
            "all context tokens",
            "fa3_bf16": "vllm_flash_attn.flash_attn_varlen_func(fa_version=3), paged bf16 K/V",
            "fa3_fp8": "the same with e4m3 q/K/V and unit descales",
            "vllm_tq4": f"vLLM triton_turboquant_decode_attention, preset {VLLM_TQ_PRESET}, 32 splits",
            "gbps": "bytes_read / time; compare with copy.gbps_read (one-way) and gbps_read_plus_write",
        },
        "copy": copy,
        "sanity": sanity,
        "results": rows,
        "sweep": sweep_rows,
        "decode_tiles": {str(k): dataclasses.asdict(v) for k, v in decode_tiles.TILES.items()},
        "kernel_switches": {"pdl": pdl.ENABLED, "store_contract_last": store_kernel.CONTRACT_LAST},
        "compiled": guarded(lambda: {"variants": compiled_variants()}),
        "log2_contexts": [math.log2(c) for c in args.contexts],
    }
    out = args.out or RESULTS / f"decode_{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    try:
        plot(rows, copy, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except Exception as err:  # noqa: BLE001 - the JSON is the record; the plot is a convenience
        print(f"plot failed: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
