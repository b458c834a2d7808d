"""Addresses inside a packed page (layout.py), shared by the store, dequantise and attention kernels, and the
attention kernel's reads of a tile of cached tokens."""

from __future__ import annotations

import triton
import triton.language as tl

from turboquant_vllm.kernels.fragment import (
    fp8_fragment_columns,
    fragment_columns,
    fragment_rows,
    fragment_tokens,
    value_fragment_tile,
)
from turboquant_vllm.kernels.lut import decode_lut, lut_decode_words, lut_fp8_words, lut_planes

# int32 offset of the values' e4m3 byte tables in KVCodec.lut (after K's and V's fp16 tables and K's e4m3 one)
V_FP8_TABLE = tl.constexpr(10)


@triton.jit
def token_fields(
    cache_ptr, block, t, head,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
):  # fmt: skip
    """Pointers to token t of page `block`, KV head `head`: (K index bytes, K scale, V index bytes, V scale).

    block and t are int64 tensors of one shape (any tokens); the scale pointers are fp32.
    """
    run = cache_ptr + block * PAGE_BYTES + head * RUN_BYTES
    k_index = run + K_INDEX_OFFSET + t * K_INDEX_BYTES
    k_scale = (run + K_SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + t
    v_index = run + V_INDEX_OFFSET + t * V_INDEX_BYTES
    v_scale = (run + V_SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + t
    return k_index, k_scale, v_index, v_scale


@triton.jit
def value_field(cache_ptr, block, head, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
                V_INDEX_OFFSET: tl.constexpr):  # fmt: skip
    """Pointer to the V index field of page `block`, KV head `head` (any shape): where coordinate-major values
    (layout.py) start, coordinate 0's run of block_size // 2 bytes first."""
    return cache_ptr + block * PAGE_BYTES + head * RUN_BYTES + V_INDEX_OFFSET


@triton.jit
def coordinate_words(run_v_ptr, t, live, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """int32 pointers [ROWS, BLOCK_D] to the coordinate-major V words (layout.py) that hold token t ([ROWS], slot in
    its page) of each coordinate, the nibble's shift [ROWS, 1] and the mask of live tokens' real coordinates.
    run_v_ptr [ROWS]: value_field of the token's page and head."""
    dim = tl.arange(0, BLOCK_D)
    byte = run_v_ptr[:, None] + dim[None, :] * (BLOCK_SIZE // 2) + ((t % BLOCK_SIZE) // 8 * 4)[:, None]
    mask = live[:, None] & (dim < HEAD_DIM)[None, :]
    return byte.to(tl.pointer_type(tl.int32)), ((t % 8) * 4)[:, None], mask


@triton.jit
def coordinate_indices(run_v_ptr, t, live, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """4-bit V indices int32 [ROWS, BLOCK_D] of tokens t from coordinate-major pages (0 where not live or padded)."""
    word, shift, mask = coordinate_words(run_v_ptr, t, live, HEAD_DIM, BLOCK_D, BLOCK_SIZE)
    return (tl.load(word, mask=mask, other=0) >> shift) & 15


@triton.jit
def store_coordinate_indices(run_v_ptr, t, idx, live, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """Write 4-bit V indices idx [ROWS, BLOCK_D] of tokens t into coordinate-major pages. A word holds 8 tokens of a
    coordinate, which other programs of the launch may be writing, so each nibble is cleared and set by atomics."""
    word, shift, mask = coordinate_words(run_v_ptr, t, live, HEAD_DIM, BLOCK_D, BLOCK_SIZE)
    tl.atomic_and(word, ~(15 << shift), mask=mask, sem="relaxed")
    tl.atomic_or(word, idx << shift, mask=mask, sem="relaxed")


@triton.jit
def _rows_from(x, OFFSET: tl.constexpr, ROWS: tl.constexpr):
    """x [ROWS, N] with row r taking x's row r + OFFSET (zeros past either end): a row shift by select-and-sum."""
    r = tl.arange(0, ROWS)
    pick = r[None, :] == r[:, None] + OFFSET  # [to, from]
    return tl.sum(tl.where(pick[:, :, None], x[None, :, :], 0), axis=1)


@triton.jit
def _column(x, COL: tl.constexpr):
    """Column COL of x [ROWS, 8] as [ROWS]."""
    return tl.sum(tl.where(tl.arange(0, 8)[None, :] == COL, x, 0), axis=1)


@triton.jit
def store_coordinate_groups(
    cache_ptr, block, t, head, idx, live,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr, V_INDEX_OFFSET: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """store_coordinate_indices for BLOCK_T tokens (a multiple of 8) that mostly come in runs of consecutive slots,
    as a prefill chunk's do, with far fewer atomics.

    A row of 8 batch tokens whose slots run on from its first one's (a run: it touches one word of each
    coordinate, or two across an 8-slot group boundary) is merged into those words. A word that the row fills, or
    that it and the row before fill together, is written by a plain store: no other program holds its slots. The
    words a run shares with other programs (the program's first and last) take two atomics each, and tokens of
    rows that are not runs (sequence ends, skipped slots) one nibble at a time, as store_coordinate_indices."""
    ROWS: tl.constexpr = BLOCK_T // 8
    GROUPS: tl.constexpr = BLOCK_SIZE // 8  # 8-slot groups a page: a group is one word of each coordinate
    j = tl.arange(0, 8)
    row_t = tl.reshape(t, (ROWS, 8))
    row_block = tl.reshape(block, (ROWS, 8))
    t_a, block_a = _column(row_t, 0), _column(row_block, 0)  # each row's first token
    nib = row_t % 8
    grp = row_block * GROUPS + row_t // 8
    first = t_a % 8
    grp_a = block_a * GROUPS + t_a // 8
    grp_b = _column(grp, 7)
    in_b = j[None, :] >= 8 - first[:, None]  # past the row's group boundary
    follows = (nib == (first[:, None] + j[None, :]) % 8) & (grp == tl.where(in_b, grp_b[:, None], grp_a[:, None]))
    run = tl.sum((follows & tl.reshape(live, (ROWS, 8))).to(tl.int32), axis=1) == 8

    # A run's 8 nibbles are distinct, so one sum merges it; the part past the boundary holds the nibbles below
    # the first token's. keep_*: what an atomic and leaves of a shared word, as whole [ROWS, BLOCK_D] tensors
    # (Triton's interpreter gives an atomic a broadcast [1, 1] operand unbroadcast; on a GPU the zeros fold away).
    merged = tl.sum(tl.reshape(idx, (ROWS, 8, BLOCK_D)) << (nib * 4).to(tl.int32)[:, :, None], axis=1)
    low = ((1 << (first * 4)) - 1).to(tl.int32)[:, None]
    bits_a = merged & ~low
    bits_b = merged & low
    zeros = tl.zeros([ROWS, BLOCK_D], tl.int32)
    keep_a = low + zeros
    keep_b = ~low + zeros
    # Row r completes the word that row r - 1 began when both are runs of the same offset into consecutive groups.
    end = tl.where(run & (first > 0), grp_b * 8 + first, -1)
    joins = run & (first > 0) & (tl.sum(_rows_from(end[:, None], -1, ROWS), axis=1) == grp_a * 8 + first)
    word_a = bits_a | tl.where(joins[:, None], _rows_from(bits_b, -1, ROWS), 0)
    full_a = run & ((first == 0) | joins)
    taken_b = tl.sum(_rows_from(joins[:, None].to(tl.int32), 1, ROWS), axis=1) > 0

    run_a = value_field(cache_ptr, block_a, head, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)
    ptr, _, mask = coordinate_words(run_a, t_a, full_a, HEAD_DIM, BLOCK_D, BLOCK_SIZE)
    tl.store(ptr, word_a, mask=mask)
    shared_a = run & ~full_a
    if tl.max(shared_a.to(tl.int32), axis=0) > 0:  # the branches skip whole launches' worth of masked atomics
        ptr, _, mask = coordinate_words(run_a, t_a, shared_a, HEAD_DIM, BLOCK_D, BLOCK_SIZE)
        tl.atomic_and(ptr, keep_a, mask=mask, sem="relaxed")
        tl.atomic_or(ptr, bits_a, mask=mask, sem="relaxed")
    shared_b = run & (first > 0) & ~taken_b
    if tl.max(shared_b.to(tl.int32), axis=0) > 0:
        t_b = _column(row_t, 7)  # each row's last token
        run_b = value_field(cache_ptr, _column(row_block, 7), head, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)
        ptr, _, mask = coordinate_words(run_b, t_b, shared_b, HEAD_DIM, BLOCK_D, BLOCK_SIZE)
        tl.atomic_and(ptr, keep_b, mask=mask, sem="relaxed")
        tl.atomic_or(ptr, bits_b, mask=mask, sem="relaxed")
    loose = live & ~tl.reshape(tl.broadcast_to(run[:, None], (ROWS, 8)), (BLOCK_T,))
    if tl.max(loose.to(tl.int32), axis=0) > 0:
        run_v = value_field(cache_ptr, block, head, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)
        store_coordinate_indices(run_v, t, idx, loose, HEAD_DIM, BLOCK_D, BLOCK_SIZE)


@triton.jit
def index_words(row_ptr, live, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                ALIGN: tl.constexpr):  # fmt: skip
    """Packed indices of one head in each row as int32 words [ROWS, BLOCK_D // 8], 8 coordinates per word.

    8 coordinates fill exactly BITS bytes, read as one little-endian word (int32 for 4-bit,
    uint16 for 2-bit: field offsets keep them aligned; three bytes for 3-bit). Rows start on ALIGN
    bytes (PageLayout.index_alignment) and their words are contiguous, so 4- and 2-bit rows are read
    with vector loads; the mask is per row unless head_dim is padded, which keeps that possible.
    """
    GROUPS: tl.constexpr = BLOCK_D // 8
    grp = tl.arange(0, GROUPS)
    mask = live[:, None] if HEAD_DIM == BLOCK_D else live[:, None] & (grp < HEAD_DIM // 8)[None, :]
    if BITS == 4:
        base = tl.multiple_of(row_ptr.to(tl.pointer_type(tl.int32)), ALIGN)
        word = tl.load(base[:, None] + grp[None, :], mask=mask, other=0)
    elif BITS == 2:
        base = tl.multiple_of(row_ptr.to(tl.pointer_type(tl.uint16)), ALIGN)
        word = tl.load(base[:, None] + grp[None, :], mask=mask, other=0).to(tl.int32)
    else:
        ptr = row_ptr[:, None] + (grp * BITS)[None, :]
        word = tl.load(ptr, mask=mask, other=0).to(tl.int32)
        word = word | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int32) << 8)
        word = word | (tl.load(ptr + 2, mask=mask, other=0).to(tl.int32) << 16)
    return word


@triton.jit
def split_words(word, BITS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Codebook indices int32 [ROWS, BLOCK_D] in coordinate order: one shift per coordinate."""
    shifts = tl.arange(0, 8) * BITS
    idx = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(idx, (ROWS, BLOCK_D))


@triton.jit
def key_tile(
    k_words, lut_ptr, k_cent_ptr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_BITS: tl.constexpr,
    OP_DTYPE: tl.constexpr, K_LUT: tl.constexpr, LUT_PAIRS: tl.constexpr, K_FRAGMENT: tl.constexpr,
    FP8_KEYS: tl.constexpr,
):  # fmt: skip
    """A tile's keys [BLOCK_N, BLOCK_D] as the score MMA takes them: centroids by register lookup (K_LUT) or
    codebook gather, in OP_DTYPE, or e4m3 with FP8_KEYS (lut.lut_fp8_words; the gather table then holds those
    values); with K_FRAGMENT their columns relabelled for the A fragment (fragment.py)."""
    if FP8_KEYS:  # one return at the end: Triton types every return of a function alike
        if K_LUT:
            k = lut_fp8_words(k_words, lut_ptr + 8, BLOCK_N, BLOCK_D)
        else:
            k = tl.load(k_cent_ptr + split_words(k_words, K_BITS, BLOCK_D, BLOCK_N)).to(tl.float8e4nv)
        if K_FRAGMENT:
            k = fp8_fragment_columns(k, BLOCK_N, BLOCK_D)
    else:
        if K_LUT:
            k = decode_lut(k_words, lut_ptr, BLOCK_N, BLOCK_D, LUT_PAIRS)
        else:
            k = tl.load(k_cent_ptr + split_words(k_words, K_BITS, BLOCK_D, BLOCK_N)).to(OP_DTYPE)
        if K_FRAGMENT:
            k = fragment_columns(k, BLOCK_N, BLOCK_D)
    return k


@triton.jit
def value_tile(
    v_words, lut_ptr, v_cent_ptr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, V_BITS: tl.constexpr,
    OP_DTYPE: tl.constexpr, V_LUT: tl.constexpr, LUT_PAIRS: tl.constexpr, V_FRAGMENT: tl.constexpr,
    V_COORD: tl.constexpr = False, FP8_VALUES: tl.constexpr = False, K_FRAGMENT: tl.constexpr = False,
    V_FP8_FRAGMENT: tl.constexpr = False,
):  # fmt: skip
    """A tile's values in OP_DTYPE: V [BLOCK_N, BLOCK_D] from page-order words, or with V_FRAGMENT V^T [128,
    BLOCK_N] decoded straight into the A fragment's order from value_fragment_words' (fragment.py).

    With V_COORD the words are coordinate_tile_words' (V^T), or with V_FP8_FRAGMENT coordinate_fragment_words':
    with FP8_VALUES V^T [BLOCK_D, BLOCK_N] as e4m3 bytes (the values' e4m3 table; under the interpreter a gather
    from v_cent_ptr, which then holds those values), its token columns in fp8_fragment_columns' order with
    K_FRAGMENT (value_fragment_tile_fp8's); otherwise V in the keys' token order for the 16/32-bit products."""
    if V_COORD:  # one return at the end (key_tile)
        ROWS: tl.constexpr = 128 if V_FP8_FRAGMENT else BLOCK_D
        COLS: tl.constexpr = 8 * v_words.shape[1]  # nibbles a row
        if FP8_VALUES:
            if V_LUT:
                v = lut_fp8_words(v_words, lut_ptr + V_FP8_TABLE, ROWS, COLS)
            else:
                v = tl.load(v_cent_ptr + split_words(v_words, 4, COLS, ROWS)).to(tl.float8e4nv)
            if V_FP8_FRAGMENT:
                v = value_fragment_tile_fp8(v, BLOCK_N)
            elif K_FRAGMENT:
                v = fp8_fragment_columns(v, BLOCK_D, BLOCK_N)
        else:
            if V_LUT:
                vt = lut_decode_words(v_words, lut_ptr + 4, BLOCK_D, BLOCK_N)
            else:
                vt = tl.load(v_cent_ptr + split_words(v_words, 4, BLOCK_N, BLOCK_D))
            v = tl.trans(vt.to(OP_DTYPE))
            if K_FRAGMENT:
                v = fragment_tokens(v, BLOCK_N, BLOCK_D)
    elif V_FRAGMENT:
        if V_LUT:
            c0, c1, c2, c3, c4, c5, c6, c7 = lut_planes(v_words, lut_ptr + 4)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = centroid_planes(v_words, v_cent_ptr)
        v = value_fragment_tile(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_N).to(OP_DTYPE)
    elif V_LUT:
        v = decode_lut(v_words, lut_ptr + 4, BLOCK_N, BLOCK_D, LUT_PAIRS)
    else:
        v = tl.load(v_cent_ptr + split_words(v_words, V_BITS, BLOCK_D, BLOCK_N)).to(OP_DTYPE)
    return v


@triton.jit
def coordinate_tile_words(
    tile, ctx_len, block, cache_ptr, kh,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr, V_INDEX_OFFSET: tl.constexpr,
):  # fmt: skip
    """int32 [BLOCK_D, BLOCK_N // 8]: a tile's coordinate-major V words (layout.py), V^T with 8 tokens a word: word
    w of row j holds tokens 8w .. 8w + 7 of the tile (nibble i: token 8w + i), coordinate j. block: the tile's page
    ids (tile_pages); a word's 8 tokens share a page. 0 for words past ctx_len and rows past HEAD_DIM."""
    word_page = tl.max(tl.reshape(block, (BLOCK_N // 8, 8)), axis=1)  # 0 past ctx_len, else the page
    pos = tile * BLOCK_N + 8 * tl.arange(0, BLOCK_N // 8)
    dim = tl.arange(0, BLOCK_D)
    run = value_field(cache_ptr, word_page, kh, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET) + (pos % BLOCK_SIZE) // 2
    ptr = run[None, :] + (dim * (BLOCK_SIZE // 2))[:, None]
    mask = (dim < HEAD_DIM)[:, None] & (pos < ctx_len)[None, :]
    return tl.load(ptr.to(tl.pointer_type(tl.int32)), mask=mask, other=0)


@triton.jit
def coordinate_fragment_words(
    tile, ctx_len, bt_row, cache_ptr, kh,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr,
):  # fmt: skip
    """int32 [128 lanes, 4 * (BLOCK_N // 32)]: the coordinate-major V words (head_dim 128, 4 warps) that thread
    L = 32w + 4q + l looks up for the fp8 value product's A fragment (value_fragment_tile_fp8): coordinates
    64b + 16w + 8a + q, and of each the two words (tokens (BLOCK_N // 4) l + 8 kb .. + 7) of its share of the
    tile; column (2b + a) * KB + kb, KB = BLOCK_N // 32. 0 for words past ctx_len."""
    KB: tl.constexpr = BLOCK_N // 32
    lane = tl.arange(0, 128)
    warp, quad, pair = lane // 32, (lane // 4) % 8, lane % 4  # w, q, l of the docstring
    n = tl.arange(0, 4 * KB)
    b, a, kb = n // (2 * KB), (n // KB) % 2, n % KB
    coord = 64 * b[None, :] + (16 * warp + quad)[:, None] + 8 * a[None, :]  # [128, 4 KB]
    pos = tile * BLOCK_N + (BLOCK_N // 4) * pair[:, None] + 8 * kb[None, :]  # the word's first token
    live = pos < ctx_len
    page = tl.load(bt_row + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
    run = value_field(cache_ptr, page, kh, PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)
    ptr = run + coord * (BLOCK_SIZE // 2) + (pos % BLOCK_SIZE) // 2
    return tl.load(ptr.to(tl.pointer_type(tl.int32)), mask=live, other=0)


@triton.jit
def value_fragment_tile_fp8(e, BLOCK_N: tl.constexpr):
    """V^T [128, BLOCK_N] e4m3 in the A fragment's order from the lookups e [128 lanes, 32 * KB] of
    coordinate_fragment_words (column 8n + 4h + i: nibble 4h + i of word n). Row 64b + 16w + 8a + q is that
    coordinate; column 32 kb + 16 h + 4 l + i the tile's token (BLOCK_N // 4) l + 8 kb + 4 h + i, which is
    fp8_fragment_columns' order of the tile's tokens (fragment.fp8_fragment_rows_from_tokens orders P so)."""
    KB: tl.constexpr = BLOCK_N // 32
    x = tl.reshape(e, (4, 8, 4, 2, 2, KB, 2, 4))  # w, q, l | b, a, kb, h, i
    return tl.reshape(tl.permute(x, (3, 0, 4, 1, 5, 6, 2, 7)), (128, BLOCK_N))  # (b w a q) x (kb h l i)


@triton.jit
def value_fragment_words(
    tile, ctx_len, bt_row, cache_ptr, kh,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr,
):  # fmt: skip
    """int32 [128 lanes, BLOCK_N // 8]: the 4-bit V indices thread L = 32w + 4q + l decodes for the value tile in the
    A fragment's order (fragment.value_fragment_tile; head_dim 128, block_size a multiple of 16).

    Thread L reads bytes 2(8w + q) and + 1 of each token of its BLOCK_N // 64 groups of 16 tokens (group g starts at
    token 16(l + 4g) of the tile, inside one page), and joins tokens 2k and 2k + 1 into one word (nibble 4e + i =
    coordinate 4(8w + q) + i of token 2k + e). Tokens past ctx_len read arbitrary indices (see below).
    """
    GROUPS: tl.constexpr = BLOCK_N // 64
    lane = tl.arange(0, 128)
    first = tile * BLOCK_N + 16 * ((lane % 4)[:, None] + 4 * tl.arange(0, GROUPS)[None, :])  # [128, GROUPS]
    page = tl.load(bt_row + first // BLOCK_SIZE, mask=first < ctx_len, other=0).to(tl.int64)
    run = cache_ptr + page * PAGE_BYTES + kh * RUN_BYTES + V_INDEX_OFFSET + (first % BLOCK_SIZE) * V_INDEX_BYTES
    t = tl.arange(0, 16)[None, None, :]
    ptr = tl.reshape(run[:, :, None] + t * V_INDEX_BYTES + 2 * (lane // 4)[:, None, None], (128, BLOCK_N // 4))
    # Unmasked: a group past ctx_len reads page 0, and a token past it within a page reads that page's bytes, so the
    # loads stay in the cache; those tokens' probabilities are 0 and every decoded index is a finite centroid.
    x = tl.load(ptr.to(tl.pointer_type(tl.uint16))).to(tl.int32)  # lanes first, as the probe found
    lo, hi = tl.split(tl.reshape(x, (128, BLOCK_N // 8, 2)))
    return lo | (hi << 16)


@triton.jit
def centroid_planes(words, cent_ptr):
    """The codebook gather of each nibble of 4-bit int32 words (any shape), as 8 tensors (nibble n in the n-th):
    lut.lut_planes for the CPU interpreter, which cannot run PTX."""
    return (
        tl.load(cent_ptr + (words & 15)), tl.load(cent_ptr + ((words >> 4) & 15)),
        tl.load(cent_ptr + ((words >> 8) & 15)), tl.load(cent_ptr + ((words >> 12) & 15)),
        tl.load(cent_ptr + ((words >> 16) & 15)), tl.load(cent_ptr + ((words >> 20) & 15)),
        tl.load(cent_ptr + ((words >> 24) & 15)), tl.load(cent_ptr + ((words >> 28) & 15)),
    )  # fmt: skip


@triton.jit
def tile_pages(tile, ctx_len, bt_row, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Page ids int64 [BLOCK_N] of one tile's token positions, read from the block table row (0 past ctx_len).

    A load of its own so the attention loop can issue it a tile earlier than the page reads that need it.
    """
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < ctx_len, other=0).to(tl.int64)


@triton.jit
def context_tile(
    tile, ctx_len, block, cache_ptr, kh,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, PAGE_BYTES: tl.constexpr, RUN_BYTES: tl.constexpr,
    K_INDEX_OFFSET: tl.constexpr, K_INDEX_BYTES: tl.constexpr, K_SCALE_OFFSET: tl.constexpr,
    V_INDEX_OFFSET: tl.constexpr, V_INDEX_BYTES: tl.constexpr, V_SCALE_OFFSET: tl.constexpr,
    INDEX_ALIGN: tl.constexpr, FRAGMENT: tl.constexpr = False, bt_row=None, V_FRAGMENT: tl.constexpr = False,
    V_COORD: tl.constexpr = False, V_FP8_FRAGMENT: tl.constexpr = False,
):  # fmt: skip
    """Issue the loads of one BLOCK_N tile of cached tokens: K/V index words and scales (0 past ctx_len).

    block holds the tile's page ids (tile_pages). Within a page this KV head's tokens are contiguous per field,
    so the tile reads whole runs. With FRAGMENT the tile's tokens come in fragment_tokens' order: the words are
    reordered after their load, the per-token vectors loaded in that order (their pages read again from bt_row).
    With V_FRAGMENT the V words are value_fragment_words' instead, with V_COORD coordinate_tile_words' (with
    V_FP8_FRAGMENT coordinate_fragment_words').
    """
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    live = pos < ctx_len
    k_index, k_scale_ptr, v_index, v_scale_ptr = token_fields(
        cache_ptr, block, (pos % BLOCK_SIZE).to(tl.int64), kh, PAGE_BYTES, RUN_BYTES,
        K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET)  # fmt: skip
    k_words = index_words(k_index, live, K_BITS, HEAD_DIM, BLOCK_D, INDEX_ALIGN)
    if V_FP8_FRAGMENT:
        v_words = coordinate_fragment_words(tile, ctx_len, bt_row, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, PAGE_BYTES,
                                            RUN_BYTES, V_INDEX_OFFSET)  # fmt: skip
    elif V_COORD:
        v_words = coordinate_tile_words(tile, ctx_len, block, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D,
                                        PAGE_BYTES, RUN_BYTES, V_INDEX_OFFSET)  # fmt: skip
    elif V_FRAGMENT:
        v_words = value_fragment_words(tile, ctx_len, bt_row, cache_ptr, kh, BLOCK_N, BLOCK_SIZE, PAGE_BYTES,
                                       RUN_BYTES, V_INDEX_OFFSET, V_INDEX_BYTES)  # fmt: skip
    else:
        v_words = index_words(v_index, live, V_BITS, HEAD_DIM, BLOCK_D, INDEX_ALIGN)
    if FRAGMENT:
        k_words = fragment_tokens(k_words, BLOCK_N, BLOCK_D // 8)
        if not V_FRAGMENT and not V_COORD:
            v_words = fragment_tokens(v_words, BLOCK_N, BLOCK_D // 8)
        pos = tile * BLOCK_N + fragment_rows(BLOCK_N)
        live = pos < ctx_len
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        _, k_scale_ptr, _, v_scale_ptr = token_fields(
            cache_ptr, block, (pos % BLOCK_SIZE).to(tl.int64), kh, PAGE_BYTES, RUN_BYTES,
            K_INDEX_OFFSET, K_INDEX_BYTES, K_SCALE_OFFSET, V_INDEX_OFFSET, V_INDEX_BYTES, V_SCALE_OFFSET)  # fmt: skip
    k_scale = tl.load(k_scale_ptr, mask=live, other=0.0)
    v_scale = tl.load(v_scale_ptr, mask=live, other=0.0)
    return live, k_words, k_scale, v_words, v_scale
