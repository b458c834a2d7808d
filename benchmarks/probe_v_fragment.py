"""Offline probe for docs/design-v-fragment.md: can a V^T tile decoded in the A fragment's order reach wgmma from
registers, or does Triton still route it through shared memory?

Two toy loops over 64-token tiles compute acc += V^T . P (V^T from 4-bit words by the byte-permute lookup, P from
memory), compiled for sm_90a without a GPU:
- page order: each token's 16 index words together (today's pages), then a transpose;
- fragment order: the proposed V field (word 2 * (32w + 4q + l) + b of a page holds dim 64b + 16w + 8a + q at
  tokens 8h + 2l + e as nibble 4h + 2a + e), relabelled into V^T by reshapes and permutes only;
- relabelled page order: today's pages read by the attention kernel's own `Tiles.v_fragment` helpers
  (page.value_fragment_words, fragment.value_fragment_tile): each thread reads 2 bytes (4 coordinates, relabelled
  as its fragment's dims) of each of its 16 tokens, the u16 pairs of tokens 2k and 2k + 1 joined into one word.
The values are not checked (same words, different meanings); only the compiled code is compared.

    python benchmarks/probe_v_fragment.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_resources  # noqa: E402  (a sibling script, not a package)

from turboquant_vllm.kernels.fragment import value_fragment_tile  # noqa: E402
from turboquant_vllm.kernels.lut import lut_decode_words, lut_planes  # noqa: E402
from turboquant_vllm.kernels.page import value_fragment_words  # noqa: E402


@triton.jit
def _probe_kernel(v_ptr, bt_ptr, p_ptr, lut_ptr, out_ptr, n_tiles, ORDER: tl.constexpr):
    acc = tl.zeros([128, 16], tl.float32)
    for t in range(n_tiles):
        p = tl.load(p_ptr + t * 1024 + tl.arange(0, 64)[:, None] * 16 + tl.arange(0, 16)[None, :])
        if ORDER == 1:
            col = tl.max_contiguous(tl.multiple_of(tl.arange(0, 256), 2), 2)  # a thread's 8 bytes a page
            words = tl.load(v_ptr + t * 1024 + tl.arange(0, 4)[:, None] * 256 + col[None, :])
            c0, c1, c2, c3, c4, c5, c6, c7 = lut_planes(tl.reshape(words, (4, 128, 2)), lut_ptr)  # nibble 4h+2a+e
            x = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
            x = tl.reshape(x, (4, 4, 8, 4, 2, 2, 2, 2))  # page j, w, q, l, b | e, a, h
            vt = tl.reshape(tl.permute(x, (4, 1, 6, 2, 0, 7, 3, 5)), (128, 64))  # dims (b w a q) x tokens (j h l e)
        elif ORDER == 2:  # the attention kernel's own helpers (Tiles.v_fragment), pages in table order
            words = value_fragment_words(t, n_tiles * 64, bt_ptr, v_ptr.to(tl.pointer_type(tl.uint8)), 0, 64, 16,
                                         1024, 0, 0, 64)  # fmt: skip
            c0, c1, c2, c3, c4, c5, c6, c7 = lut_planes(words, lut_ptr)
            vt = value_fragment_tile(c0, c1, c2, c3, c4, c5, c6, c7, 64)
        else:
            words = tl.load(v_ptr + t * 1024 + tl.arange(0, 64)[:, None] * 16 + tl.arange(0, 16)[None, :])
            vt = tl.trans(lut_decode_words(words, lut_ptr, 64, 128))
        acc = tl.dot(vt, p, acc)
    tl.store(out_ptr + tl.arange(0, 128)[:, None] * 16 + tl.arange(0, 16)[None, :], acc)


ORDERS = ("page", "fragment", "relabelled page")


def compile_probe(order: str) -> dict:
    pointers = {"v_ptr": "*i32", "bt_ptr": "*i32", "p_ptr": "*fp16", "lut_ptr": "*i32", "out_ptr": "*fp32"}
    return {"v_order": order,
            **kernel_resources.compile_toy_loop(_probe_kernel, pointers, {"ORDER": ORDERS.index(order)})}  # fmt: skip


def main() -> int:
    rows = [compile_probe(order) for order in ORDERS]
    print(json.dumps({"probe": "v_fragment", "target": "sm_90a (compiled, not run)", "triton": triton.__version__,
                      "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
