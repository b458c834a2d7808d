"""The A-fragment orders of a decode tile (kernels/fragment.py): what each helper reorders, checked by value."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from turboquant_vllm.kernels import fragment


@triton.jit
def _tokens_kernel(src_ptr, rows_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    x = fragment.fragment_tokens(tl.load(src_ptr + r[:, None] * COLS + c[None, :]), ROWS, COLS)
    tl.store(out_ptr + r[:, None] * COLS + c[None, :], x)
    tl.store(rows_ptr + r, fragment.fragment_rows(ROWS))


@pytest.mark.parametrize("rows", [64, 128])
def test_token_order_matches_the_rows_loaded_in_it(device, rows):
    """context_tile reorders the words by fragment_tokens and loads the scales at fragment_rows: the same order."""
    src = torch.arange(rows * 4, dtype=torch.int32, device=device).view(rows, 4)
    out = torch.empty_like(src)
    order = torch.empty(rows, dtype=torch.int32, device=device)
    _tokens_kernel[(1,)](src, order, out, ROWS=rows, COLS=4)
    assert sorted(order.tolist()) == list(range(rows))  # a permutation of the tile's tokens
    assert order.tolist() != list(range(rows))
    torch.testing.assert_close(out, src[order.long()], rtol=0, atol=0)
    i = torch.arange(rows)  # row bits (5, 4, 3) of the load become (4, 3, 5)
    want = (i & ~63) | ((i >> 3) & 1) << 5 | ((i >> 5) & 1) << 4 | ((i >> 4) & 1) << 3 | (i & 7)
    assert order.cpu().tolist() == want.tolist()


@triton.jit
def _columns_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_D)
    x = fragment.fragment_columns(tl.load(src_ptr + r[:, None] * BLOCK_D + c[None, :]), ROWS, BLOCK_D)
    tl.store(out_ptr + r[:, None] * BLOCK_D + c[None, :], x)


@pytest.mark.parametrize("block_d", [64, 128])
def test_column_order_follows_the_fragment(device, block_d):
    """Column 32w + 16ph + 8pl + 2l + e holds coordinate 8(Wl + w) + 4ph + 2pl + e: lane l's words, pairs intact."""
    src = torch.arange(2 * block_d, dtype=torch.float32, device=device).view(2, block_d)
    out = torch.empty_like(src)
    _columns_kernel[(1,)](src, out, ROWS=2, BLOCK_D=block_d)
    w_count = block_d // 32
    want = torch.empty(block_d, dtype=torch.long)
    for lane in range(4):
        for w in range(w_count):
            for ph in range(2):
                for pl in range(2):
                    for e in range(2):
                        want[32 * w + 16 * ph + 8 * pl + 2 * lane + e] = 8 * (w_count * lane + w) + 4 * ph + 2 * pl + e
    torch.testing.assert_close(out.cpu(), src.cpu()[:, want], rtol=0, atol=0)
    # a dot product over the reordered axis is unchanged when the query is reordered the same way (summed in
    # fp64: in fp32 the two summation orders differ by rounding)
    q = torch.randn(block_d, generator=torch.Generator().manual_seed(block_d)).to(device)
    q_out = torch.empty(2, block_d, device=device)
    _columns_kernel[(1,)](q.expand(2, block_d).contiguous(), q_out, ROWS=2, BLOCK_D=block_d)
    torch.testing.assert_close(out.double() @ q_out[0].double(), src.double() @ q.double())


@triton.jit
def _values_order_kernel(src_ptr, back_ptr, probs_ptr, cols_ptr, ROWS: tl.constexpr):
    r = tl.arange(0, ROWS)
    x = tl.load(src_ptr + r[:, None] + tl.arange(0, 1)[None, :])  # [ROWS, 1]: the tile's token ids
    in_fragment = fragment.fragment_tokens(x, ROWS, 1)
    tl.store(back_ptr + r[:, None], fragment.unfragment_tokens(in_fragment, ROWS, 1))
    tl.store(probs_ptr + r[:, None], fragment.fp8_fragment_rows_from_tokens(in_fragment, ROWS, 1))
    tl.store(cols_ptr + r[None, :], fragment.fp8_fragment_columns(tl.trans(x), 1, ROWS))


@pytest.mark.parametrize("rows", [64, 128])
def test_probabilities_follow_the_fp8_value_columns(device, rows):
    """With coordinate-major values (TQConfig.fp8_values) V^T's token columns are relabelled by fp8_fragment_columns
    and the probabilities arrive in fragment_tokens' order: fp8_fragment_rows_from_tokens must give row j the token
    of column j, and unfragment_tokens must undo fragment_tokens."""
    tokens = torch.arange(rows, dtype=torch.int32, device=device)
    back, probs, cols = (torch.empty_like(tokens) for _ in range(3))
    _values_order_kernel[(1,)](tokens, back, probs, cols, ROWS=rows)
    assert back.tolist() == tokens.tolist()
    assert sorted(cols.tolist()) == tokens.tolist() and cols.tolist() != tokens.tolist()
    assert probs.tolist() == cols.tolist()
