"""Is a decode step's MLP GEMM slower next to our attention kernel? The same GEMM after kernels of several kinds.

In the engine at 32K x 1 (timeline_report_launches_32k1_h200_2026-12-03h.json), the Llama-8B gate/up GEMM
([1, 4096] x [4096, 28672] bf16) takes 54-58 us in about half its launches and 59-65 us in the others next to our
attention, and 55-58 us in 96% next to FA3 over fp8; the slow launches are independent of the layer and of
each other. This probe replays 32 "layers" of [neighbour, GEMM] in one CUDA graph, each layer with its own weight
(no layer's weight is in L2 when its GEMM starts), and times every GEMM launch, for neighbours of each kind:

- none: the GEMMs back to back (the GEMM's own spread);
- sleep: a spin about as long as the attention (the gap alone, little power drawn);
- copy: a memory-bound copy about that long (over a buffer too large for L2);
- read: a sum over as many bytes as the copy reads (no writes); fill: 1 MB written (a few small writes);
- matmul: a compute-bound bf16 matmul about that long (power drawn by the SMs);
- ours: our decode attention at 32K x 1 with the fused store, the engine's neighbour; ours_no_store: the same
  without the step's K/V store (what the store's writes add); ours_no_pdl: launched without programmatic dependent
  launch (FA3's launches do not use it); ours_spin_tail: followed by a one-block spin as long as FA3's combine;
  ours_fenced: after a one-element fill launched without PDL, so the next layer's first kernel cannot start while
  the GEMM before it runs (is it the early launch after the GEMM, or the one before it, that slows the GEMM?);
- fa3_fp8: vLLM's FA3 over fp8 pages at that context (the fp8 engine's neighbour; needs vLLM).

On the H200 (probe_gemm_neighbours_*_h200_2026-12-03h.json, ..._all_h200_2026-12-04a.json) two humps 4-6 us apart
follow `ours` (at 1K, 4K and 32K alike), `fa3_fp8` and `copy`; one hump `none`, `sleep`, `read` (42 MB read) and
`fill` (1 MB written); `matmul` one hump, shifted 2-8 us; at a steady 1980-MHz SM clock with no throttle reason. Next
to the GEMM, FA3 over fp8 slows it as much as ours does, so adjacency alone does not give the engine's difference.
`--o-proj` puts the engine's o_proj GEMM and a plain RMS norm between the neighbour and gate/up, in the engine's order.
`--whole-layer` adds the rest of a decoder layer: after gate/up the SiLU-and-mul, then the next layer's down
projection, norm, qkv projection and a rotary-sized elementwise launch ahead of the neighbour, so that, as in the
engine, the kernel right before the attention is not a GEMM (without it, the previous layer's gate/up is).
With it (..._whole_all_h200_2026-12-04c.json) FA3 over fp8 slows gate/up as much as ours (59.0 against 59.3 us, none
57.5), and neither the store, PDL nor a fence moves ours. `--pages-per-layer` gives each layer's attention pages of its
own, as the engine's layers have (by default all layers read one set).
Board power per arm comes from NVML (gpu_telemetry.py) over a longer unprofiled window.

    python benchmarks/probe_gemm_neighbours.py --out benchmarks/results/probe_gemm_neighbours_h200_<date>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_decode import Caches, Shape, fa3_step, ours_step, run_header  # this script's folder is on sys.path
from engine_steps import kernel_spans
from gpu_telemetry import GpuTelemetry
from timeline_report import layer_pattern

from turboquant_vllm.kernels import pdl

NEIGHBOURS = ("none", "sleep", "copy", "read", "fill", "matmul",
              "ours", "ours_no_store", "ours_no_pdl", "ours_spin_tail", "ours_fenced", "fa3_fp8")  # fmt: skip
SM_MHZ = 1980  # the H200's top SM clock: spin cycles a microsecond
FA3_COMBINE_US = 3.5  # FA3's split combine at 32K x 1 on the H200 (probe_gemm_neighbours_oproj_h200_2026-12-04b.json)


def without_pdl(run: Callable[[], None]) -> None:
    """run() with our kernels launched without programmatic dependent launch; the switch is restored after."""
    enabled, pdl.ENABLED = pdl.ENABLED, False
    try:
        run()
    finally:
        pdl.ENABLED = enabled


def layer_steps(make: Callable[[], Callable[[], None]], layers: int, own: bool) -> Callable[[int], None]:
    """Layer i's attention step: make() once for all layers, or once a layer (own pages, as in the engine)."""
    steps = [make() for _ in range(layers if own else 1)]
    return lambda i: steps[i if own else 0]()


def neighbour_kernels(
    kind: str, layers: int, target_us: float, context: int, own_pages: bool = False
) -> Callable[[int], None] | None:
    """A callable run ahead of layer i's GEMM, about target_us long on an H200 (None: no neighbour).
    own_pages: the attention neighbours read pages of their own in every layer, not one set shared by all."""
    if kind == "none":
        return None
    if kind == "sleep":
        cycles = int(target_us * SM_MHZ)
        return lambda i: torch.cuda._sleep(cycles)
    chunk = int(target_us * 1e-6 * 3.0e12 / 2)  # a copy's read + write at ~3 TB/s
    if kind == "copy":
        src = torch.randint(0, 256, (layers, chunk), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return lambda i: dst[i].copy_(src[i])
    if kind == "read":
        src = torch.randn(layers, chunk // 4, device="cuda")
        total = torch.empty((), device="cuda")
        return lambda i: torch.sum(src[i], dim=0, out=total)
    if kind == "fill":
        buf = torch.empty(layers, 2**18, device="cuda")
        return lambda i: buf[i].fill_(float(i))
    if kind == "matmul":
        n = 2048  # 2 n^3 flops: ~25 us at ~700 TFLOP/s
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        c = torch.empty_like(a)
        return lambda i: torch.mm(a, a, out=c)
    if kind.startswith("ours") or kind == "fa3_fp8":
        args = SimpleNamespace(num_kv_heads=8, head_dim=128, block_size=16, contexts=[context])
        shape = Shape(1, context, 32, 8, 128, 16)
        store = "none" if kind == "ours_no_store" else "fused"

        def step() -> Callable[[], None]:
            caches = Caches(args, 1)
            table = caches.table(shape)
            if kind == "fa3_fp8":
                return fa3_step(caches, shape, table, fp8=True)
            return ours_step(caches, shape, table, store=store)[0]

        run = layer_steps(step, layers, own_pages)
        if kind == "fa3_fp8":
            return run
        if kind == "ours_no_pdl":
            return lambda i: without_pdl(lambda: run(i))
        if kind == "ours_fenced":
            fence = torch.zeros(1, device="cuda")
            return lambda i: (fence.fill_(float(i)), run(i))
        if kind == "ours_spin_tail":
            tail_cycles = int(FA3_COMBINE_US * SM_MHZ)
            return lambda i: (run(i), torch.cuda._sleep(tail_cycles))
        return run
    raise ValueError(f"neighbour must be one of {NEIGHBOURS}, got {kind!r}")


def layer_weights(layers: int, rows: int, cols: int) -> list[torch.Tensor]:
    """One bf16 [rows, cols] weight a layer, so none is in L2 when its GEMM starts."""
    return [torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(layers)]


def whole_layer_buffers(args: argparse.Namespace) -> SimpleNamespace:
    """--whole-layer's weights (layer_weights) and activations."""
    return SimpleNamespace(
        down=layer_weights(args.layers, args.hidden, args.intermediate),
        qkv=layer_weights(args.layers, args.qkv, args.hidden),
        act=torch.randn(1, args.intermediate, dtype=torch.bfloat16, device="cuda"),
        h=torch.empty(1, args.hidden, dtype=torch.bfloat16, device="cuda"),
        qkv_out=torch.empty(1, args.qkv, dtype=torch.bfloat16, device="cuda"),
        hidden=args.hidden,
    )


def ahead_of_attention(bufs: SimpleNamespace, i: int, norm_weight: torch.Tensor) -> None:
    """What the engine runs between a layer's MLP and the next layer's attention: the down projection, the norm,
    the qkv projection and the rotary embedding (here one elementwise launch over the qkv output in place)."""
    torch.mm(bufs.act, bufs.down[i].t(), out=bufs.h)
    normed = torch.nn.functional.rms_norm(bufs.h, (bufs.hidden,), norm_weight)
    torch.mm(normed, bufs.qkv[i].t(), out=bufs.qkv_out)
    bufs.qkv_out.mul_(1.0)


def replay_spans(graph: torch.cuda.CUDAGraph, replays: int) -> list[tuple[str, float, float]]:
    """The kernels of `replays` replays of graph under torch.profiler, as (name, start us, end us) in start order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return kernel_spans(prof)


def split_launches(
    spans: list[tuple[str, float, float]], names: set[str], replays: int, layers: int
) -> tuple[list[list[float]], dict[str, float]]:
    """(name, start, end) spans of `replays` graph replays of `layers` layers: the gate/up GEMM's device us, one list
    a replay, and the other kernels' mean us by name.

    A layer's gate/up is its last launch named in `names`: with --o-proj, cuBLAS may run the o_proj GEMM with the
    same kernel, and that launch then counts among the others."""
    matched: list[float] = []
    others: dict[str, list[float]] = {}
    for name, start, end in spans:
        (matched if name in names else others.setdefault(name[:80], [])).append(end - start)
    per_layer = len(matched) // (replays * layers)
    if per_layer < 1 or len(matched) != per_layer * replays * layers:
        raise ValueError(f"{len(matched)} GEMM launches do not split into {replays} replays of {layers} layers")
    gemm = matched[per_layer - 1 :: per_layer]
    for earlier in range(per_layer - 1):
        others.setdefault("earlier launches of gate/up's kernel", []).extend(matched[earlier::per_layer])
    rows = [[round(us, 2) for us in gemm[r * layers : (r + 1) * layers]] for r in range(replays)]
    return rows, {name: statistics.fmean(us) for name, us in others.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neighbours", nargs="+", default=list(NEIGHBOURS), choices=NEIGHBOURS)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336, help="gate and up: 2x this many output columns")
    p.add_argument("--target-us", type=float, default=28.0, help="about how long each neighbour runs")
    p.add_argument("--context", type=int, default=32768, help="tokens of the `ours` neighbour's sequence")
    p.add_argument("--replays", type=int, default=20, help="profiled graph replays an arm")
    p.add_argument("--power-replays", type=int, default=200, help="unprofiled replays an arm, NVML sampling")
    p.add_argument(
        "--o-proj",
        action="store_true",
        help="a layer runs o_proj ([1, hidden] x [hidden, hidden], its own weight) and a plain RMS norm (the engine "
        "fuses the residual add into it) between the neighbour and gate/up, in the engine's order",
    )
    p.add_argument(
        "--whole-layer",
        action="store_true",
        help="also SiLU-and-mul after gate/up and down, norm, qkv and a rotary stand-in ahead of the neighbour, each "
        "GEMM with its own weights (implies --o-proj)",
    )
    p.add_argument("--qkv", type=int, default=6144, help="qkv projection's output columns: (32 + 2 x 8) heads x 128")
    p.add_argument(
        "--pages-per-layer",
        action="store_true",
        help="each layer's attention reads its own pages, as in the engine (by default all layers share one set)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.o_proj = args.o_proj or args.whole_layer
    if not torch.cuda.is_available():
        print("probe_gemm_neighbours needs a CUDA GPU; none found.")
        return 2

    weights = layer_weights(args.layers, 2 * args.intermediate, args.hidden)
    x = torch.randn(1, args.hidden, dtype=torch.bfloat16, device="cuda")
    ys = [torch.empty(1, 2 * args.intermediate, dtype=torch.bfloat16, device="cuda") for _ in range(args.layers)]
    wo = layer_weights(args.layers if args.o_proj else 0, args.hidden, args.hidden)
    norm_weight = torch.ones(args.hidden, dtype=torch.bfloat16, device="cuda")
    h = torch.empty_like(x)
    around = whole_layer_buffers(args) if args.whole_layer else None

    def capture(neighbour: Callable[[int], None] | None, o_proj: bool = args.o_proj) -> torch.cuda.CUDAGraph:
        whole = around if o_proj else None  # the names graph runs gate/up alone

        def layers() -> None:
            for i in range(args.layers):
                if whole is not None:
                    ahead_of_attention(whole, i, norm_weight)
                if neighbour is not None:
                    neighbour(i)
                gate_up_in = x
                if o_proj:
                    torch.mm(x, wo[i].t(), out=h)
                    gate_up_in = torch.nn.functional.rms_norm(h, (args.hidden,), norm_weight)
                torch.mm(gate_up_in, weights[i].t(), out=ys[i])
                if whole is not None:
                    gate, up = ys[i].chunk(2, dim=-1)
                    torch.mul(torch.nn.functional.silu(gate), up, out=whole.act)

        layers()  # compile and pick cuBLAS kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layers()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        return graph

    gate_up_only = replay_spans(capture(None, o_proj=False), 1)
    if len(gate_up_only) != args.layers:  # split_launches counts one launch a layer
        raise SystemExit(f"gate/up ran as {len(gate_up_only)} launches for {args.layers} layers; the probe times one")
    names = {name for name, _, _ in gate_up_only}
    gpu = GpuTelemetry.start()
    arms = {}
    for kind in args.neighbours:
        try:
            graph = capture(neighbour_kernels(kind, args.layers, args.target_us, args.context, args.pages_per_layer))
        except ImportError as err:  # fa3_fp8 without vLLM
            arms[kind] = {"error": str(err)}
            print(f"{kind:7} skipped: {err}", flush=True)
            continue
        with gpu.phase(kind):
            for _ in range(args.power_replays):
                graph.replay()
            torch.cuda.synchronize()
        rows, others = split_launches(replay_spans(graph, args.replays), names, args.replays, args.layers)
        arms[kind] = {"gemm": layer_pattern(rows), "neighbour_us": others}
        g = arms[kind]["gemm"]
        print(f"{kind:7} gemm {g['mean_us']:.2f} us, layers' means +- {g['between_layers_stdev_us']:.2f}, a layer's "
              f"+- {g['within_layer_stdev_us']:.2f}; {g['us_histogram']}; neighbours {others}", flush=True)  # fmt: skip
        del graph
    power = {phase["phase"]: phase for phase in gpu.stop()["phases"]}
    for kind, arm in arms.items():
        arm["telemetry"] = power.get(kind)
    result = {
        **run_header("probe_gemm_neighbours"),
        "gemm_kernels": sorted(names),
        "shape": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "o_proj": args.o_proj,
            "whole_layer": args.whole_layer,
            "qkv": args.qkv if args.whole_layer else None,
            "pages_per_layer": args.pages_per_layer,
        },
        "arms": arms,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
