"""Offline probe: does splitting a decode tile's tokens among the warps, each warp with its own online softmax,
take the cross-warp traffic out of the context loop?

In today's kernel a 64-token tile is one wgmma M side spread over 4 warps: each tile's row max crosses warps
(shared memory and a barrier) and P goes through shared memory to the P.V wgmma, so every tile waits on its
slowest warp (docs/decode-tuning.md, "Where the 16 x 32K launch's time goes"). Here the tile becomes a batch of 4
slices of 16 tokens, one per warp (a 3-D `tl.dot`, which Triton lowers to mma.sync with the batch on the warps):
each warp keeps its own max, sum and accumulator for its rows, and the 4 are merged once after the loop, as
split-K partials are. Toy loops over 64-token tiles (4-bit K and V words, per-token scales, the byte-permute
lookup, 16 query rows), compiled for sm_90a without a GPU:
- cta: today's shape (scores and output transposed, one softmax per tile for the whole program);
- warp: the batched form, scores and output transposed as in cta;
- warp_rows: the batched form with query rows on the MMA's M side (FlashAttention-2's order within a warp);
- warp_rows_k_fragment, warp_k_fragment: the two batched forms with the key columns relabelled as `k_fragment`
  relabels them for wgmma (fragment.fragment_columns), the query's the same way.
By default only the compiled code is compared; `--time` runs the forms on a GPU, each launch a grid of programs
over tiles of their own (by default the 16 x 32K and 16 x 4K launches' 384 programs of 171 and 21 tiles), timed in
a CUDA graph, each form's output checked against the cta form's. tests/test_probe_warp_softmax.py checks each form
against fp32 torch on the CPU (with a codebook gather in place of the lookup, which the interpreter cannot run).

    python benchmarks/probe_warp_softmax.py
    python benchmarks/probe_warp_softmax.py --time --out benchmarks/results/probe_warp_softmax_h200_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_resources  # noqa: E402  (a sibling script, not a package)

from turboquant_vllm import TQConfig  # noqa: E402
from turboquant_vllm.codec import KVCodec  # noqa: E402
from turboquant_vllm.kernels.fragment import fragment_columns  # noqa: E402
from turboquant_vllm.kernels.lut import lut_decode_words, lut_tables  # noqa: E402
from turboquant_vllm.kernels.page import split_words  # noqa: E402

TILE = 64  # tokens a tile
ROWS = 16  # query rows (a GQA group padded to the MMA's N)
DIM = 128
WORDS = DIM // 8  # int32 words of 4-bit indices a token
WARPS = 4


@triton.jit
def _tile(ptr, t, lut_ptr, cent_ptr, LUT: tl.constexpr, TILE: tl.constexpr, DIM: tl.constexpr, WORDS: tl.constexpr):
    """fp16 centroids [TILE, DIM] of tile t's 4-bit words: the byte-permute lookup, or (LUT=False, for the CPU
    interpreter, which cannot run PTX) a gather from the fp16 codebook."""
    words = tl.load(ptr + t * TILE * WORDS + tl.arange(0, TILE)[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
    if LUT:
        return lut_decode_words(words, lut_ptr, TILE, DIM)
    else:
        return tl.load(cent_ptr + split_words(words, 4, DIM, TILE))


@triton.jit
def _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT: tl.constexpr, K_FRAG: tl.constexpr,
                 TILE: tl.constexpr, DIM: tl.constexpr, WORDS: tl.constexpr, WARPS: tl.constexpr):  # fmt: skip
    """Tile t as WARPS slices of TILE // WARPS tokens: K [WARPS, SLICE, DIM] (columns relabelled by
    fragment_columns if K_FRAG), V likewise in page order, and their scales [WARPS, SLICE]."""
    SLICE: tl.constexpr = TILE // WARPS
    k = _tile(k_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
    if K_FRAG:
        k = fragment_columns(k, TILE, DIM)
    v = _tile(v_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
    ks = tl.load(ks_ptr + t * TILE + tl.arange(0, TILE))
    vs = tl.load(vs_ptr + t * TILE + tl.arange(0, TILE))
    return (tl.reshape(k, (WARPS, SLICE, DIM)), tl.reshape(v, (WARPS, SLICE, DIM)), tl.reshape(ks, (WARPS, SLICE)),
            tl.reshape(vs, (WARPS, SLICE)))  # fmt: skip


@triton.jit
def _probe_kernel(k_ptr, v_ptr, ks_ptr, vs_ptr, q_ptr, lut_ptr, cent_ptr, out_ptr, n_tiles,
                  WARP_SPLIT: tl.constexpr, LUT: tl.constexpr, TILE: tl.constexpr, ROWS: tl.constexpr,
                  DIM: tl.constexpr, WORDS: tl.constexpr, WARPS: tl.constexpr):  # fmt: skip
    """out [ROWS, DIM] = softmax(q K^T) V over n_tiles * TILE tokens, q in log2 units (exp2 softmax).
    Program p reads its own n_tiles tiles (the p-th block of the K/V words and scales) and writes out[p]."""
    pid = tl.program_id(0)
    k_ptr += pid * n_tiles * TILE * WORDS
    v_ptr += pid * n_tiles * TILE * WORDS
    ks_ptr += pid * n_tiles * TILE
    vs_ptr += pid * n_tiles * TILE
    out_ptr += pid * ROWS * DIM
    dim = tl.arange(0, DIM)
    q_t = tl.load(q_ptr + tl.arange(0, ROWS)[None, :] * DIM + dim[:, None]).to(tl.float16)  # [DIM, ROWS]
    if WARP_SPLIT == 2 or WARP_SPLIT == 3:  # rows on M: P leaves the score MMA in the layout P.V takes it in
        K_FRAG: tl.constexpr = WARP_SPLIT == 3  # key columns relabelled for the mma.sync B fragment
        q = tl.trans(q_t)
        if K_FRAG:
            q = fragment_columns(q, ROWS, DIM)
        q3 = tl.broadcast_to(q[None, :, :], (WARPS, ROWS, DIM))
        m3 = tl.full([WARPS, ROWS], float("-inf"), tl.float32)
        l3 = tl.zeros([WARPS, ROWS], tl.float32)
        acc3 = tl.zeros([WARPS, ROWS, DIM], tl.float32)
        for t in range(n_tiles):
            k3, v3, ks, vs = _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT, K_FRAG, TILE, DIM,
                                          WORDS, WARPS)  # fmt: skip
            s = tl.dot(q3, tl.permute(k3, (0, 2, 1))) * ks[:, None, :]  # [WARPS, ROWS, SLICE tokens]
            m_new = tl.maximum(m3, tl.max(s, 2))
            p = tl.exp2(s - m_new[:, :, None])
            alpha = tl.exp2(m3 - m_new)
            l3 = l3 * alpha + tl.sum(p, 2)
            pv = (p * vs[:, None, :]).to(tl.float16)
            acc3 = acc3 * alpha[:, :, None] + tl.dot(pv, v3)
            m3 = m_new
        m = tl.max(m3, 0)
        w = tl.exp2(m3 - m[None, :])
        acc_t = tl.trans(tl.sum(acc3 * w[:, :, None], 0))
        l_i = tl.sum(l3 * w, 0)
    elif WARP_SPLIT == 1 or WARP_SPLIT == 4:
        K_FRAG: tl.constexpr = WARP_SPLIT == 4  # key columns relabelled for the mma.sync A fragment
        if K_FRAG:
            q_t = tl.trans(fragment_columns(tl.trans(q_t), ROWS, DIM))
        q3 = tl.broadcast_to(q_t[None, :, :], (WARPS, DIM, ROWS))
        m3 = tl.full([WARPS, ROWS], float("-inf"), tl.float32)
        l3 = tl.zeros([WARPS, ROWS], tl.float32)
        acc3 = tl.zeros([WARPS, DIM, ROWS], tl.float32)
        for t in range(n_tiles):
            k3, v3, ks, vs = _warp_slices(k_ptr, v_ptr, ks_ptr, vs_ptr, t, lut_ptr, cent_ptr, LUT, K_FRAG, TILE, DIM,
                                          WORDS, WARPS)  # fmt: skip
            s = tl.dot(k3, q3) * ks[:, :, None]  # [WARPS, SLICE tokens, ROWS]: each warp its own tokens
            m_new = tl.maximum(m3, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None, :])
            alpha = tl.exp2(m3 - m_new)
            l3 = l3 * alpha + tl.sum(p, 1)
            pv = (p * vs[:, :, None]).to(tl.float16)
            acc3 = acc3 * alpha[:, None, :] + tl.dot(tl.permute(v3, (0, 2, 1)), pv)
            m3 = m_new
        m = tl.max(m3, 0)  # the warps' partials merged once, as split-K partials are
        w = tl.exp2(m3 - m[None, :])
        acc_t = tl.sum(acc3 * w[:, None, :], 0)
        l_i = tl.sum(l3 * w, 0)
    else:
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc_t = tl.zeros([DIM, ROWS], tl.float32)
        for t in range(n_tiles):
            k = _tile(k_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
            v = _tile(v_ptr, t, lut_ptr, cent_ptr, LUT, TILE, DIM, WORDS)
            ks = tl.load(ks_ptr + t * TILE + tl.arange(0, TILE))
            vs = tl.load(vs_ptr + t * TILE + tl.arange(0, TILE))
            s = tl.dot(k, q_t) * ks[:, None]  # [TILE tokens, ROWS]: the tile's tokens across all warps
            m_new = tl.maximum(m_i, tl.max(s, 0))
            p = tl.exp2(s - m_new[None, :])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            pv = (p * vs[:, None]).to(tl.float16)
            acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), pv)
            m_i = m_new
    out = acc_t / l_i[None, :]
    tl.store(out_ptr + tl.arange(0, ROWS)[None, :] * DIM + dim[:, None], out)


FORMS = {"cta": 0, "warp": 1, "warp_rows": 2, "warp_rows_k_fragment": 3, "warp_k_fragment": 4}
CONSTANTS = {"TILE": TILE, "ROWS": ROWS, "DIM": DIM, "WORDS": WORDS, "WARPS": WARPS}


def compile_probe(form: str) -> dict:
    pointers = {"k_ptr": "*i32", "v_ptr": "*i32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "q_ptr": "*fp32",
                "lut_ptr": "*i32", "cent_ptr": "*fp16", "out_ptr": "*fp32"}  # fmt: skip
    constexprs = {"WARP_SPLIT": FORMS[form], "LUT": True, **CONSTANTS}
    return {"form": form, **kernel_resources.compile_toy_loop(_probe_kernel, pointers, constexprs, WARPS)}


def probe_inputs(programs: int, n_tiles: int, device: str, seed: int = 0) -> dict:
    """Random 4-bit K/V words and scales for `programs` programs of n_tiles tiles each, a query, the codebook
    (fp16) and its lookup tables: the toy kernel's arguments, by name."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = programs * n_tiles * TILE
    centroids = KVCodec(TQConfig(), 1, DIM).key.centroids.to(torch.float16)
    lut = lut_tables(centroids)
    assert lut is not None, "the 4-bit codebook is symmetric in fp16, so the lookup tables exist"
    words = torch.randint(-(2**31), 2**31 - 1, (2, tokens, WORDS), generator=g, dtype=torch.int64).to(torch.int32)
    scales = torch.rand(2, tokens, generator=g) * 0.5 + 0.5
    args = {"k_ptr": words[0], "v_ptr": words[1], "ks_ptr": scales[0], "vs_ptr": scales[1],
            "q_ptr": torch.randn(ROWS, DIM, generator=g) * 2, "lut_ptr": lut, "cent_ptr": centroids}  # fmt: skip
    return {name: t.to(device) for name, t in args.items()}


def time_probe(form: str, inputs: dict, programs: int, n_tiles: int, rep: int) -> tuple[dict, torch.Tensor]:
    """One form's launch of `programs` programs on the GPU, timed in a CUDA graph: us, packed bytes read a second
    (136 bytes a token: 2 x 64 bytes of words, 2 fp32 scales), the compiled registers; and its output."""
    out = torch.empty(programs, ROWS, DIM, device="cuda")

    def launch():
        return _probe_kernel[(programs,)](*inputs.values(), out, n_tiles, WARP_SPLIT=FORMS[form], LUT=True,
                                          num_warps=WARPS, **CONSTANTS)  # fmt: skip

    kernel = launch()
    torch.cuda.synchronize()
    ms = float(triton.testing.do_bench_cudagraph(launch, rep=rep))
    nbytes = programs * n_tiles * TILE * (2 * WORDS * 4 + 2 * 4)
    row = {"form": form, "programs": programs, "tiles_a_program": n_tiles, "us": ms * 1e3,
           "us_a_tile_round": ms * 1e3 / n_tiles, "packed_tb_per_s": nbytes / ms / 1e9,
           "registers": kernel.n_regs, "spills": kernel.n_spills}  # fmt: skip
    return row, out.clone()


def time_forms(shapes: list[tuple[int, int]], rep: int) -> list[dict]:
    """Every form at each (programs, tiles a program); each form's output checked against the cta form's."""
    rows = []
    for programs, n_tiles in shapes:
        inputs = probe_inputs(programs, n_tiles, "cuda")
        reference = None
        for form in FORMS:
            row, out = time_probe(form, inputs, programs, n_tiles, rep)
            if reference is None:
                reference = out
            row["max_rel_diff_vs_cta"] = float((out - reference).abs().max() / reference.abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inputs
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", action="store_true", help="time the forms on the GPU instead of compiling offline")
    p.add_argument(
        "--shapes",
        default="384x171,384x21",
        help="PROGRAMSxTILES launches to time (default: 16 x 32K and 16 x 4K at 3 splits, 8 KV heads)",
    )
    p.add_argument("--rep", type=int, default=200, help="do_bench_cudagraph repetition time, ms")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.time:
        result = {"probe": "warp_softmax", "target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                  "rows": [compile_probe(form) for form in FORMS]}  # fmt: skip
    elif not torch.cuda.is_available():
        print("--time needs a CUDA GPU; none found.")
        return 2
    else:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        result = {"probe": "warp_softmax", "target": torch.cuda.get_device_name(), "triton": triton.__version__,
                  "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "command": shlex.join([sys.executable, *sys.argv]), "rows": time_forms(shapes, args.rep)}  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
