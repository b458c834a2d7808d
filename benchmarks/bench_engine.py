"""vLLM engine table: KV capacity and TPOT for bf16, fp8, vLLM's turboquant_4bit_nc and ours (CUSTOM).

Dummy-weight Llama-3.1-8B shape, CUDA graphs on, prefix caching off.
TPOT per batch of `seqs` prompts of `context` tokens, 129 tokens each. Default (--tpot two-runs, the issue's
definition): (time to generate 129 tokens - time to generate 1) / 128, which prefills every prompt twice.
--tpot metrics: one run, vLLM's per-request timestamps, mean over requests of (last token - first token) / 128;
cheaper, but when 16 prompts arrive together the early requests' decode steps also carry the later requests'
prefill chunks, so at 16 sequences it reads high (bf16 4K x 16: 11.3 ms on 2026-11-30; the issue's two-run
figure is 7.22).
Before timing, a warm-up batch runs chunked prefill over cached context, mixed and pure decode batches of every
size up to max_num_seqs, so no kernel is compiled inside a timed run.
--repeats N times each shape N times and reports the median (every sample kept): at 16 sequences one two-run TPOT
moves by a few tenths of a ms between runs (4K x 16, ours 7.57-7.97 over three runs on 2026-12-01), since the two
runs' 64K-token prefills differ by more than a decode step.
--profile CONTEXTxSEQS times pure decode steps of that batch (every prompt past its prefill), lists the GPU kernels
of as many more per step (torch.profiler, engine in-process) and times as many after them again: where a decode
step's time goes, and whether the wall time before the profiled steps was a steady state; "timeline" lists one
profiled step's kernels in order (device us and the idle time ahead of each): which layer's launch is slow.
--trace-steps CONTEXTxSEQS steps that batch's 129-token and 1-token runs by hand and times every step (with the
number of requests still prefilling and of those decoding, and the prompt chunks each step ran): where the two
runs' difference goes, mixed steps (decodes riding along later prompts' prefill chunks) or the pure decode steps
after them; with --trace-kernels each run's mixed steps are also profiled, their GPU kernels' totals listed.
--tiles JSON changes our kernel's d=128 launch shapes (fields of decode_tiles.Tiles, e.g. '{"publish_q": true}') for
an A/B of two settings in the engine; the engine core then runs in-process so the change reaches its kernels, and
the other arm should pass --tiles '{}' to run the same way. A JSON list runs every mode once per element, in order
(e.g. '[{"live_splits": false}, {}, {"live_splits": false}, {}]': alternating arms in one call, so drift within a
lease falls on both); each row keeps its arm as `tiles_change`.
--no-pdl launches our kernels without programmatic dependent launch (kernels/pdl.py), engine core in-process as with
--tiles (give the other arm --tiles '{}'): PDL shortens our step's chain but changes what the next layer's GEMMs see.
--telemetry samples the GPU's SM clock, power, temperature and clock-event reasons (NVML, gpu_telemetry.py) through
every timed run, profile window and traced run: whether two windows of the same steps ran at the same clock.
Each mode runs in its own process (a fresh GPU); results go to benchmarks/results/engine_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_steps import exact_tokens, profile_decode_steps, trace_steps  # noqa: E402  (sibling scripts)
from gpu_telemetry import GpuTelemetry  # noqa: E402

if TYPE_CHECKING:
    from turboquant_vllm.kernels.decode_tiles import Tiles

R32_FP8 = {"recent_tokens": 32, "fp8_key_scores": True, "fp8_values": True}
MODES = {
    "bf16": dict(attention_backend="FLASH_ATTN"),
    "fp8": dict(attention_backend="FLASH_ATTN", kv_cache_dtype="fp8"),
    "tq_native": dict(kv_cache_dtype="turboquant_4bit_nc"),
    "ours": dict(attention_backend="CUSTOM"),
    "ours_s4": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"sink_tokens": 4}}),
    "ours_r32": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"recent_tokens": 32}}),
    "ours_fp8v": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"fp8_values": True}}),
    "ours_fp16v": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"fp8_values": False}}),
    # the window with both fp8 products (by default a window keeps fp16 scores and token-major values)
    "ours_r32_fp8": dict(attention_backend="CUSTOM", additional_config={"turboquant": R32_FP8}),
}
SHAPES = "4096x1,4096x16,32768x1,32768x16"
RESULTS = Path(__file__).parent / "results"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [(int(c), int(n)) for c, n in (s.split("x") for s in text.split(",") if s)]


def run_mode(
    mode: str,
    shapes: list[tuple[int, int]],
    max_model_len: int,
    gpu_util: float,
    tpot: str,
    profile: tuple[int, int] | None = None,
    repeats: int = 1,
    tiles: Tiles | None = None,
    trace: tuple[int, int] | None = None,
    trace_kernels: bool = False,
    telemetry: bool = False,
    no_pdl: bool = False,
) -> dict:
    import os

    if profile or trace or tiles is not None or no_pdl:  # the profiler / the change must reach the engine's kernels
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if no_pdl:
        from turboquant_vllm.kernels import pdl

        pdl.ENABLED = False
    if tiles is not None:  # --tiles, already checked by tiles_with
        from turboquant_vllm.kernels import decode_tiles

        decode_tiles.TILES[128] = tiles
    from vllm import LLM

    from turboquant_vllm.eval.dummy_model import write_llama_config

    model_dir = write_llama_config(Path(tempfile.mkdtemp()) / "llama8b")
    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        gpu_memory_utilization=gpu_util,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        max_num_seqs=16,
        seed=0,
        disable_log_stats=False,  # keeps per-request timestamps in RequestOutput.metrics
        **MODES[mode],
    )
    startup_s = time.perf_counter() - start
    gpu = GpuTelemetry.start() if telemetry else GpuTelemetry.off()
    cache = llm.llm_engine.vllm_config.cache_config
    row = {
        "mode": mode,
        "engine_kwargs": MODES[mode],
        "startup_s": startup_s,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "kv_capacity_tokens": cache.num_gpu_blocks * cache.block_size,
        "tpot": [],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "tpot"}), flush=True)

    def timed(prompts, max_tokens: int) -> tuple[float, float | None]:
        """Wall seconds, and the mean per-request decode seconds per token from vLLM's timestamps."""
        t0 = time.perf_counter()
        with gpu.phase(f"{len(prompts[0])}x{len(prompts)} t{max_tokens}"):
            out = llm.generate([{"prompt_token_ids": p} for p in prompts], exact_tokens(max_tokens), use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in out)
        spans = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (max_tokens - 1)
                 for o in out if o.metrics is not None and o.metrics.first_token_ts > 0 and max_tokens > 1]  # fmt: skip
        return elapsed, (sum(spans) / len(spans) if spans and len(spans) == len(out) else None)

    import random

    rng = random.Random(0)

    def prompts_of(context: int, seqs: int) -> list[list[int]]:
        return [[rng.randrange(1000, 100000) for _ in range(context)] for _ in range(seqs)]

    # Warm-up: 16 x 2000 tokens overflow one step's token budget, so prompts are split across steps (prefill
    # over cached context), decodes run next to prefills, and the decode batch grows through every size.
    timed(prompts_of(2000, 16), 8)
    timed(prompts_of(100, 1), 2)  # a step of 33-255 tokens: the store kernel's mid-size launch shape
    row["warmup_s"] = time.perf_counter() - start - startup_s
    for context, seqs in shapes:
        prompts = prompts_of(context, seqs)
        entry = {"context": context, "seqs": seqs, **tpot_entry(timed, prompts, tpot, repeats)}
        row["tpot"].append(entry)
        print(json.dumps(entry), flush=True)
    if profile:
        row["profile"] = profile_decode_steps(llm, prompts_of(*profile), phase=gpu.phase)
        print(json.dumps(row["profile"]), flush=True)
    if trace:
        prompts = prompts_of(*trace)
        row["step_trace"] = {"context": trace[0], "seqs": trace[1],
                             **{f"t{n}": trace_steps(llm, prompts, n, trace_kernels, phase=gpu.phase)
                                for n in (129, 1)}}  # fmt: skip
        print(json.dumps(row["step_trace"])[:3000], flush=True)
    if telemetry:
        row["telemetry"] = gpu.stop()
    return row


def tile_arms(text: str | None) -> list[dict | None]:
    """--tiles as the arms to run: None (the defaults, engine core in its own process), one change, or a list."""
    if text is None:
        return [None]
    arms = json.loads(text)
    arms = arms if isinstance(arms, list) else [arms]
    for arm in arms:
        if not isinstance(arm, dict):
            raise SystemExit(f"--tiles: each arm is a JSON object of Tiles fields, not {arm!r}")
        tiles_with(arm)  # checked before any engine starts
    return arms


def tiles_with(change: dict) -> Tiles:
    """decode_tiles.TILES[128] with the fields in `change` replaced; unknown fields are an error."""
    from turboquant_vllm.kernels.decode_tiles import TILES

    unknown = set(change) - {f.name for f in dataclasses.fields(TILES[128])}
    if unknown:
        raise SystemExit(f"--tiles: no such Tiles field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(TILES[128], **change)


def timed_tpot(timed, prompts: list[list[int]], tpot: str) -> dict:
    """One TPOT sample of a batch: 129 tokens, then (two-runs) 1 token; timed(prompts, n) -> (s, per-token s)."""
    t129, per_token = timed(prompts, 129)
    sample = {"t129_s": t129}
    if per_token is not None:  # vLLM's own timestamps leave the prefill out: less spread than two-runs
        sample["tpot_metrics_ms"] = per_token * 1e3
    if tpot == "two-runs" or per_token is None:
        t1, _ = timed(prompts, 1)
        sample.update(t1_s=t1, tpot_ms=(t129 - t1) / 128 * 1e3, tpot_method="two-runs")
    else:
        sample.update(tpot_ms=per_token * 1e3, tpot_method="metrics")
    return sample


def tpot_entry(timed, prompts: list[list[int]], tpot: str, repeats: int) -> dict:
    """A shape's row: its first sample's fields, with repeats > 1 every sample and the median TPOTs."""
    samples = [timed_tpot(timed, prompts, tpot) for _ in range(repeats)]
    entry = dict(samples[0])
    if repeats > 1:
        entry["samples"] = samples
        for key in ("tpot_ms", "tpot_metrics_ms"):
            if all(key in s for s in samples):
                entry[key] = statistics.median(s[key] for s in samples)
    return entry


def printed_rows(stdout: str) -> list[dict]:
    """The TPOT rows a mode printed (one JSON object per line), e.g. before it timed out."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"context"')]


def merge_results(results: list[dict], paths: list[Path]) -> dict:
    """One result holding every mode of several runs (e.g. a mode given its own call), each run's provenance kept.

    A mode that timed out keeps its error and the rows it had printed (recovered from its output tail).
    """
    merged = {k: v for k, v in results[0].items() if k not in ("modes", "command", "date")}
    merged["runs"] = [{"file": p.name, "command": r.get("command"), "date": r.get("date")} for p, r in
                      zip(paths, results, strict=True)]  # fmt: skip
    merged["modes"] = []
    for path, result in zip(paths, results, strict=True):
        for mode in result["modes"]:
            if not mode.get("tpot") and "partial" in mode:
                mode = {**mode, "tpot": printed_rows(mode["partial"])}
            label = mode.get("label", mode["mode"])  # an arm of --tiles keeps its own label
            if any(m.get("label", m["mode"]) == label for m in merged["modes"]):  # a rerun: its own line in the plot
                mode = {**mode, "label": f"{label} ({path.stem})"}
            merged["modes"].append(mode)
    return merged


def tpot_lines(result: dict, base: str = "bf16") -> dict[int, dict[str, list[tuple[int, float, float | None]]]]:
    """Per sequence count, per mode (or arm label): (context, TPOT ms, TPOT / `base`'s TPOT at that shape or None)."""
    rows = [(m.get("label", m["mode"]), t) for m in result["modes"] for t in m.get("tpot", [])]
    base_ms = {(t["seqs"], t["context"]): t["tpot_ms"] for label, t in rows if label == base}
    lines: dict[int, dict[str, list]] = {}
    for label, t in rows:
        ref = base_ms.get((t["seqs"], t["context"]))
        point = (t["context"], t["tpot_ms"], t["tpot_ms"] / ref if ref else None)
        lines.setdefault(t["seqs"], {}).setdefault(label, []).append(point)
    return {n: {label: sorted(pts) for label, pts in modes.items()} for n, modes in sorted(lines.items())}


def plot(result: dict, path: Path) -> None:
    """TPOT against context, one column per sequence count, one line per mode (skipped without matplotlib).

    TPOT is on a log axis (vLLM's TurboQuant runs several times the others' TPOT); with a bf16 line a second row
    shows each mode's TPOT divided by bf16's at the same shape.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"no matplotlib: no {path.name}; run `python {Path(__file__).name} --plot JSON` where it is installed")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    lines = tpot_lines(result)
    if not lines:
        return
    relative = any(r is not None for modes in lines.values() for pts in modes.values() for _, _, r in pts)
    fig, axes = plt.subplots(1 + relative, len(lines), figsize=(6 * len(lines), 4.5 + 3 * relative), squeeze=False)
    for col, (n, modes) in enumerate(lines.items()):
        top = axes[0][col]
        for label, pts in modes.items():
            top.plot([c for c, _, _ in pts], [ms for _, ms, _ in pts], marker="o", label=label)
            rel = [(c, r) for c, _, r in pts if r is not None]
            if rel:
                axes[1][col].plot([c for c, _ in rel], [r for _, r in rel], marker="o", label=label)
        top.set_yscale("log")
        top.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        top.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        top.yaxis.set_minor_formatter(NullFormatter())
        top.set_ylabel("TPOT (ms, log scale)")
        top.set_title(f"{n} sequence(s), {result.get('gpu') or 'GPU'}")
        top.legend(fontsize=8)
        shown = [top]
        if relative and axes[1][col].has_data():
            axes[1][col].set_ylabel("TPOT / bf16 TPOT")
            axes[1][col].axhline(1.0, color="grey", linewidth=0.8)
            axes[1][col].set_ylim(0.8, 1.3)  # vLLM's TurboQuant leaves the frame; its TPOT is in the row above
            shown.append(axes[1][col])
        elif relative:
            axes[1][col].set_visible(False)  # no bf16 run at this sequence count
        for ax in shown:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context tokens per sequence")
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--shapes", default=SHAPES, help="comma list of CONTEXTxSEQS")
    parser.add_argument("--max-model-len", type=int, default=33024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--timeout", type=int, default=420, help="seconds per mode")
    parser.add_argument("--tpot", choices=("metrics", "two-runs"), default="two-runs")
    parser.add_argument("--repeats", type=int, default=1, help="TPOT samples per shape; the median is reported")
    parser.add_argument("--profile", help="CONTEXTxSEQS: after the timings, time and profile its pure decode steps")
    parser.add_argument("--trace-steps", help="CONTEXTxSEQS: time every step of its 129- and 1-token runs")
    parser.add_argument("--trace-kernels", action="store_true", help="with --trace-steps: each run's GPU kernels")
    parser.add_argument("--telemetry", action="store_true", help="sample SM clock, power, temperature (NVML)")
    parser.add_argument("--tiles", help="JSON of decode_tiles.Tiles fields to change at d=128 (engine in-process)")
    parser.add_argument("--no-pdl", action="store_true", help="our kernels without programmatic dependent launch")
    parser.add_argument("--out", type=Path, default=RESULTS / f"engine_{date.today()}.json")
    parser.add_argument("--plot", type=Path, nargs="+",
                        help="only draw: merge the modes of these result JSONs into --out (JSON + PNG)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot:
        merged = merge_results([json.loads(path.read_text()) for path in args.plot], args.plot)
        args.out.write_text(json.dumps(merged, indent=1))
        plot(merged, args.out.with_suffix(".png"))
        return
    shapes = parse_shapes(args.shapes)
    profile = parse_shapes(args.profile)[0] if args.profile else None
    trace = parse_shapes(args.trace_steps)[0] if args.trace_steps else None
    arms = tile_arms(args.tiles)

    if args.child:
        tiles = None if arms[0] is None else tiles_with(arms[0])
        row = run_mode(args.child, shapes, args.max_model_len, args.gpu_memory_utilization, args.tpot, profile,
                       args.repeats, tiles, trace, args.trace_kernels, args.telemetry, args.no_pdl)  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
        return

    from turboquant_vllm.eval.child import run_child
    from turboquant_vllm.eval.provenance import provenance
    from turboquant_vllm.kernels import pdl, store

    result = {
        "benchmark": "engine",
        "baseline": "bf16 FLASH_ATTN (FA3) on the same engine settings",
        "model": "dummy-weight Llama-3.1-8B shape (32 layers, 8 KV heads, head_dim 128)",
        "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        **provenance(sys.argv),
        "decode_tiles_d128": dataclasses.asdict(tiles_with({})),  # our kernel's default launch shapes at d=128
        "tiles_change": arms if len(arms) > 1 else arms[0],  # --tiles (None: defaults, engine core in its process)
        "kernel_switches": {"pdl": pdl.ENABLED and not args.no_pdl, "store_contract_last": store.CONTRACT_LAST},
        "modes": [],
    }
    for a, arm, mode in [(a, arm, mode) for a, arm in enumerate(arms) for mode in args.modes.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--shapes",
            args.shapes,
            "--max-model-len",
            str(args.max_model_len),
            "--gpu-memory-utilization",
            str(args.gpu_memory_utilization),
            "--tpot",
            args.tpot,
            "--repeats",
            str(args.repeats),
            *(["--profile", args.profile] if args.profile else []),
            *(["--trace-steps", args.trace_steps] if args.trace_steps else []),
            *(["--trace-kernels"] if args.trace_kernels else []),
            *(["--telemetry"] if args.telemetry else []),
            *(["--tiles", json.dumps(arm)] if arm is not None else []),
            *(["--no-pdl"] if args.no_pdl else []),
        ]
        child = run_child(cmd, args.timeout)
        arm_tag = f"_arm{a}" if len(arms) > 1 else ""
        child.save_log(args.out, mode + arm_tag)  # the engine's own log, e.g. JIT warnings
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            result["modes"].append(json.loads(lines[-1][7:]))
        elif child.timed_out:
            timeout = f"timeout after {args.timeout}s"
            rows = printed_rows(child.stdout)  # the shapes it finished before the timeout
            result["modes"].append({"mode": mode, "error": timeout, "tpot": rows, "partial": child.stdout[-3000:]})
        else:
            result["modes"].append({"mode": mode, "error": (child.stderr or child.stdout)[-3000:]})
        if len(arms) > 1:
            result["modes"][-1].update(tiles_change=arm, label=f"{mode} {json.dumps(arm)}")
        print(json.dumps(result["modes"][-1])[:2000], flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
