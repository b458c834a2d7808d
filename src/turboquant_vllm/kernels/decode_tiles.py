"""Launch configuration of the paged attention and split-K reduce kernels (kernels/decode.py).

Tile shapes per padded head_dim (docs/decode-tuning.md has the H200 measurement behind each choice), and the
compile-time parameters both the launcher and the offline compile checks (benchmarks/kernel_resources.py) derive
from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels.decode_reduce import (
    MAX_LIVE_SEQS,
    REDUCE_BLOCK_R,
    REDUCE_NUM_WARPS,
    REDUCE_PLAIN_ROWS,
    REDUCE_STEP_ELEMENTS,
)
from turboquant_vllm.kernels.pdl import capability, pdl_option
from turboquant_vllm.kernels.recent import window_tile
from turboquant_vllm.kernels.sinks import SINK_TILE
from turboquant_vllm.kernels.store import one_token_store_meta
from turboquant_vllm.quantizer import TINY_NORM

ROT_CHUNK = 16  # columns of R per rotation step: keeps R slices small in registers
INTERPRETER_ROT_CHUNK = 32  # fewer steps under the CPU interpreter, still several per head
FP8_DOT_MIN_K = 32  # tl.dot takes e4m3 operands only with a K side of 32 or more (P.V's K: the tile's tokens)


@dataclass(frozen=True)
class Tiles:
    """Launch shape for one padded head_dim; nothing here depends on sequence lengths."""

    block_n: int  # cached context tokens per inner step
    decode_m: int  # (query token x group) rows per program when every q_len fits one tile
    varlen_m: int  # rows per program once a prefill chunk is in the batch
    num_warps: int
    num_stages: int = 2  # software pipelining of the context loop's loads
    maxnreg: int | None = None  # register cap of swapped decode launches with block_n tiles (see attention_meta)
    prefetch: bool = True  # load tile t+1 while computing tile t
    pages_ahead: bool = True  # read tile t+2's block-table entries while tile t+1's pages load (with prefetch)
    tile_row_sum: bool = True  # keep softmax sums per position and add them up across warps once, after the loop
    wide_block_n: int | None = None  # block_n once a launch has >= WIDE_MIN_SPLITS splits (see below)
    wide_num_warps: int | None = None  # num_warps of those wide launches (None: num_warps)
    wide_maxnreg: int | None = None  # register cap of swapped wide launches (None: uncapped)
    rot_chunk: int = ROT_CHUNK  # columns of R per step where the attention launch rotates (new V, queries, output)
    wide_rot_chunk: int | None = None  # rot_chunk of wide launches (None: rot_chunk)
    lut: bool = True  # 4-bit lookups by byte permute in registers on the GPU (kernels/lut.py)
    lut_pairs: bool = False  # the lookups' fp16 pairs kept in one register each (lut_decode_pairs)
    k_fragment: bool = False  # swapped tiles: keys decoded in the wgmma fragment's order (kernels/fragment.py)
    v_fragment: bool = False  # with k_fragment: values too (head_dim 128, 4-bit V; docs/design-v-fragment.md)
    swap_ab: bool = False  # decode tiles: K.q^T and V^T.p^T, the tile's tokens (not padded query rows) on the M side
    reduce_splits: int = 8  # splits the split-K reduce reads per step ([16 rows, this, BLOCK_D] fp32 in registers)
    reduce_rot_chunk: int = ROT_CHUNK  # columns of R per un-rotation step in the reduce (BLOCK_D: one dot)
    # Launches with at least this many splits have each split program normalise and un-rotate its own output,
    # so the reduce is a plain weighted sum of reduce_plain_rows rows a program with no R (None: never).
    unrotated_min_splits: int | None = None
    reduce_plain_rows: int = REDUCE_PLAIN_ROWS
    reduce_rows: int = REDUCE_BLOCK_R  # rows a program of the un-rotating reduce (below 16: no dot, see reduce_meta)
    # Reduce programs that un-rotate without a dot load all of R before the partials (R is never written by the
    # attention launch, so with PDL ahead of its wait): one L2 round trip less on the step's critical path, where
    # [rows, BLOCK_D, BLOCK_D] fits one dot-free step (REDUCE_STEP_ELEMENTS: one row at d=128).
    reduce_rot_ahead: bool = False
    wide_reduce_rows: int | None = None  # reduce_rows once a launch has >= WIDE_MIN_SPLITS splits (None: the same)
    # Launches with at least this many splits rotate the step's queries once, in a launch of their own, instead of
    # in every split program (None: never).
    prerotate_q_min_splits: int | None = None
    # Launches with at least this many splits, short of WIDE_MIN_SPLITS, merge their partials in the split program
    # that finishes last (a ticket per program row in the workspace) instead of in a reduce launch (None: never);
    # that program reads tail_merge_splits splits a step. Wide launches keep the reduce: one program merging 32
    # splits was slower than 32 one-row reduce programs (docs/decode-tuning.md).
    tail_merge_min_splits: int | None = None
    tail_merge_splits: int = 4
    # Launches with at least this many splits also store the step's new K/V (paged_attention store_slots), so the
    # vLLM backend skips its store launch for those tokens (None: never).
    fused_store_min_splits: int | None = None
    # Where a launch has store programs and pre-rotated queries, the store programs rotate the queries and hand them
    # to the split programs through a ticket in the workspace, instead of a rotation launch ahead of the attention.
    publish_q: bool = False
    # Capped split-K launches count the sequences that have query rows and split those finer when a CUDA graph's
    # padding leaves part of the wave idle (choose_split_grid, docs/decode-tuning.md "Padded batches").
    live_splits: bool = True
    # Decode programs of the block_n tile (wide_block_n's) one SM holds at once (registers): choose_num_splits fills
    # one wave of them, store programs included (None: about two 4-warp programs an SM, the other head dims' rule).
    resident_programs: int | None = None
    wide_resident_programs: int = 2
    # Keys decoded as e4m3 bytes and scored by an fp8 MMA, the queries rounded to e4m3 (kernels/lut.py; 4-bit keys,
    # unswapped or k_fragment tiles; beside key offsets, sinks or an exact window only where TQConfig.fp8_key_scores
    # is True; a device with e4m3 MMAs, fp8_mma_usable): fewer instructions a tile for rounding error in scores.
    fp8_keys: bool = False
    # Decode steps that have a split-K reduce launch write the exact recent window's rows (kernels/recent.py) from
    # programs of that launch instead of a writer launch of their own (paged_attention's write_recent). Slower on the
    # H200 at every shape timed (1 x 4K 26.7 -> 29.7 us with the window; docs/design-exact-window.md).
    window_writer_in_reduce: bool = False
    # Pure decode steps store their K/V after the attention (paged_attention's store_slots; a store the attention
    # launch would make moves out) and write the window's rows from that store launch, which has R k and R v at hand,
    # instead of a writer launch that rotates them again (store.store_kv's recent). On the H200 the window's step took
    # 21.6 instead of 29.1 us at 1 x 4K, 67.2 instead of 78.3 at 16 x 4K (decode_sweep_window_in_store_h200_2026-12-05).
    window_writer_in_store: bool = True
    # With fp8_keys: the queries as two e4m3 halves (their rounding and its rounded remainder), scored by a second fp8
    # MMA into the same accumulator, so the scores keep only the keys' rounding (offline 628 -> 637 instructions a
    # 3-split tile; benchmarks/probe_fp8_scores.py for what each rounding costs on SmolLM2's real tensors).
    fp8_query_halves: bool = True
    # With fp8_query_halves, launches of at least this many splits (None: never) score both halves in one MMA where
    # a decode tile's real query rows fit in its top half (group x max_query_len <= decode_m / 2): the remainders
    # take the padding rows (kernels/fragment.py). One MMA's latency a tile instead of two chained, for the softmax
    # Triton then runs in two equivalent layouts (offline 687 instructions a 3-split tile instead of 637): on the H200
    # 1 x 32K 33.4 -> 31.7 us, but 16 x 32K 337.8 -> 379.9 (decode_sweep_fp8_halves_in_rows_h200_2026-12-03d.json).
    fp8_halves_in_rows_min_splits: int | None = None
    # With coordinate-major values (TQConfig.fp8_values) the capped decode tile needs fewer registers (e4m3 V^T in
    # its A fragment): this register cap and this many programs an SM for it (None: maxnreg, resident_programs).
    fp8_values_maxnreg: int | None = None
    fp8_values_resident_programs: int | None = None

    def resident(self, fp8_values: bool) -> int | None:
        """Capped decode programs an SM (resident_programs, or fp8_values_resident_programs for fp8_values' pages)."""
        if fp8_values and self.fp8_values_resident_programs:
            return self.fp8_values_resident_programs
        return self.resident_programs


# Why each default, in one line (the H200 measurements behind them, and what lost, are in docs/decode-tuning.md):
# - 4 warps, no software pipelining, 64-token tiles: several small programs per SM hide latency best.
# - Swapped operands (wgmma) under a 168-register cap: 3 programs per SM for the 64-token decode tile.
# - Wide launches (>= WIDE_MIN_SPLITS splits: one sequence) take 128-token tiles, uncapped: more bytes in flight per
#   program when only ~2 programs share an SM.
# - A batch of 2-16 sequences splits until its capped programs fill one wave, 3 an SM; one sequence until its wide
#   programs fill one wave, 2 an SM (32 splits).
# - The reduce un-rotates with all of R in one dot at 3 splits, one row a program by multiply-adds at 32.
# - The step's queries are rotated once, in a launch of their own; one-sequence launches also store the new K/V.
# - Block-table entries a tile ahead, softmax sums per position until the loop ends.
# - Keys and values decoded in the A fragment's order: no shared-memory round trip for their tiles (kernels/fragment.py)
# - R in 64-column slices where the launch rotates (the last split's tail waits on each slice's L2 read).
# - 4-bit keys scored by an fp8 MMA at d=128 (where the device has one and TQConfig.fp8_key_scores allows), the
#   queries as two e4m3 halves: wide launches in one MMA, capped ones in two.
WIDE_MIN_SPLITS = 32
MAX_SPLITS = 32  # split-K width the vLLM backend's workspace holds (and the benchmarks size theirs to)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")  # keys of attention_meta that are compile options
# fmt: off
TILES = {
    32: Tiles(64, 16, 64, 4, num_stages=1, reduce_splits=32, reduce_rot_chunk=32),
    64: Tiles(64, 16, 64, 4, num_stages=1, reduce_splits=16, reduce_rot_chunk=64),
    128: Tiles(
        64, 16, 64, 4, num_stages=1, wide_block_n=128, swap_ab=True, maxnreg=168, resident_programs=3,
        reduce_splits=2, reduce_rot_chunk=128, wide_reduce_rows=1, prerotate_q_min_splits=2,
        fused_store_min_splits=WIDE_MIN_SPLITS, rot_chunk=64, k_fragment=True, v_fragment=True,
        fp8_keys=True, fp8_halves_in_rows_min_splits=WIDE_MIN_SPLITS, fp8_values_maxnreg=128,
        fp8_values_resident_programs=4,
    ),
    256: Tiles(16, 16, 32, 8, num_stages=1, reduce_splits=2),
    512: Tiles(16, 16, 16, 8, num_stages=1, reduce_splits=1),
}
# fmt: on


def reduce_meta(
    num_heads: int,
    head_dim: int,
    block_d: int,
    plain: bool,
    op_dtype: tl.dtype,
    prec: str,
    num_splits: int = 2,
    pdl: bool = False,
    recent_tokens: int = 0,
) -> dict[str, Any]:
    """Compile-time parameters and launch options of _reduce_splits_kernel (shared with compile checks).

    recent_tokens: the exact window's, where this launch may write its rows (the step's last reader of the table);
    WRITE_RECENT is then that, or 0 unless Tiles.window_writer_in_reduce.

    plain: the split programs stored normalised, un-rotated partials, so the reduce is a weighted sum with no
    16-row dot: fewer rows a program, more splits a step. Otherwise tiles.reduce_rows (wide_reduce_rows for a
    launch of >= WIDE_MIN_SPLITS splits) picks the un-rotation: a dot for 16-row programs, fp32 multiply-adds for
    fewer rows (more programs, each reading R once).
    """
    tiles = TILES[block_d]
    wide = tiles.wide_reduce_rows is not None and num_splits >= WIDE_MIN_SPLITS
    block_r = tiles.reduce_plain_rows if plain else tiles.wide_reduce_rows if wide else tiles.reduce_rows
    by_dot = not plain and block_r >= REDUCE_BLOCK_R
    per_step = max(1, REDUCE_STEP_ELEMENTS // (block_r * block_d))  # splits (or R columns) a dot-free step takes
    step_splits = tiles.reduce_splits if by_dot else min(MAX_SPLITS, per_step)
    rot_chunk = tiles.reduce_rot_chunk if by_dot else min(block_d, max(1, per_step // 2))  # R slice + product
    rot_ahead = tiles.reduce_rot_ahead and not plain and not by_dot and block_r * block_d * block_d <= (
        REDUCE_STEP_ELEMENTS)  # fmt: skip
    return dict(
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, STEP_SPLITS=step_splits,
        ROTATED=not plain, UNROTATE_BY_DOT=by_dot, ROT_CHUNK=rot_chunk, ROT_AHEAD=rot_ahead, OP_DTYPE=op_dtype,
        PREC=prec, PDL=pdl,
        LIVE_SPLITS=live_split_tiles(head_dim, num_splits),
        WRITE_RECENT=recent_tokens if tiles.window_writer_in_reduce else 0,
        num_warps=REDUCE_NUM_WARPS, **pdl_option(pdl),
    )  # fmt: skip


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_splits: int, num_sms: int, head_dim: int = 128, fp8_values: bool = False
) -> int:
    """Splits per sequence so a decode batch's programs fill the SMs: one wave of Tiles.resident_programs an SM
    (wide_resident_programs where the launch takes the wide tiles; store programs included) where the tiles say how
    many fit, else about two 4-warp programs' worth an SM.

    One split when (sequence, KV head) programs alone already fill the SMs that way: splitting then
    only adds workspace traffic. Sequence lengths are deliberately ignored so the choice is made on
    the host without reading device tensors. fp8_values: the kernel takes the fp8 P.V product (coordinate-major
    pages, TQConfig.fp8_values, on a device with e4m3 dots), whose tile has its own Tiles.resident.
    """
    tiles = TILES[triton.next_power_of_2(head_dim)]
    per_sm = max(1, 4 // tiles.num_warps)  # narrower programs: more of them
    programs = max(1, num_seqs) * max(1, num_kv_heads)
    if programs >= num_sms * per_sm or max_splits <= 1:
        return 1
    if tiles.resident(fp8_values) is None:
        return max(1, min(max_splits, triton.cdiv(2 * num_sms * per_sm, programs)))

    def one_wave(resident: int) -> int:
        slots = resident * num_sms
        splits = min(max_splits, slots // programs)
        if at_least(tiles.fused_store_min_splits, splits):  # one store program per (sequence, KV head) joins
            splits = min(max_splits, (slots - programs) // programs)
        return splits

    splits = one_wave(tiles.resident(fp8_values))
    if tiles.wide_block_n is not None and splits >= WIDE_MIN_SPLITS:  # such launches take the wide tiles
        wide = one_wave(tiles.wide_resident_programs)
        splits = wide if wide >= WIDE_MIN_SPLITS else WIDE_MIN_SPLITS - 1  # too few for a wave: stay capped
    return max(1, splits)


def choose_split_grid(
    num_seqs: int, num_kv_heads: int, max_splits: int, num_sms: int, head_dim: int = 128, fp8_values: bool = False
) -> tuple[int, int]:
    """(num_splits, split_slots) for paged_attention: choose_num_splits's grid, grown so that the same launch also
    fills a wave for fewer live sequences, with the slots each launch shares among its live ones (live_splits).

    vLLM replays the CUDA graph of the next captured batch size, padding the batch with rows that have no query;
    with choose_num_splits's split count alone, 12 live sequences in the 16-sequence graph would each walk the
    same share of their context as 16 do, leaving a quarter of the wave idle. The grid is sized for a batch just
    over half live (captured sizes double up to 8 and are at least 8 apart after), capped tiles only; batches that
    do not split, one sequence and the other head dims' rule keep (choose_num_splits, 0).
    """
    static = choose_num_splits(num_seqs, num_kv_heads, max_splits, num_sms, head_dim, fp8_values)
    if not (live_split_tiles(head_dim, static) and 2 <= num_seqs <= MAX_LIVE_SEQS):
        return static, 0
    fewest_live = num_seqs // 2 + 1
    grid = min(choose_num_splits(fewest_live, num_kv_heads, max_splits, num_sms, head_dim, fp8_values),
               WIDE_MIN_SPLITS - 1)  # fmt: skip
    resident = TILES[triton.next_power_of_2(head_dim)].resident(fp8_values)
    return max(grid, static), resident * num_sms // num_kv_heads


def live_split_tiles(head_dim: int, num_splits: int) -> bool:
    """Whether launches of num_splits count their live sequences (split_slots): capped split-K launches of tiles
    with resident_programs, the only ones whose split rule fills a wave exactly. The others (and the wide
    one-sequence launches) compile without the count and its registers."""
    tiles = TILES[triton.next_power_of_2(head_dim)]
    return tiles.live_splits and tiles.resident_programs is not None and 1 < num_splits < WIDE_MIN_SPLITS


def live_splits(live_seqs: int, num_splits: int, split_slots: int) -> int:
    """Host twin of decode_reduce.live_splits: the splits each live sequence of a launch gets."""
    if split_slots == 0:
        return num_splits
    return min(max(split_slots // max(live_seqs, 1), 1), num_splits)


def fp8_mma_usable(device: torch.device) -> bool:
    """Whether e4m3 tensor-core dots compile for `device`: compute capability 8.9+ (Ada, Hopper and later); the CPU
    interpreter emulates them."""
    return device.type != "cuda" or capability(device.index or 0) >= (8, 9)


def fp8_value_tiles(codec: KVCodec, device: torch.device) -> bool:
    """Whether decode launches over `codec`'s pages on `device` take the fp8 P.V tile (choose_num_splits'
    fp8_values): coordinate-major values (TQConfig.fp8_values) and e4m3 dots."""
    return codec.layout.v_coordinate_major and fp8_mma_usable(device)


def attention_meta(
    codec: KVCodec,
    num_heads: int,
    query_dtype: torch.dtype,
    on_gpu: bool,
    max_query_len: int,
    block_size: int,
    fused: bool,
    num_splits: int = 1,
    key_offset: bool = False,
    store_new: bool = False,
    pdl: bool = False,
    sinks: int = 0,
    recent: int = 0,
    fp8_mma: bool = True,
) -> dict[str, Any]:
    """Compile-time parameters and launch options of _attention_kernel (shared with compile checks).

    pdl: launched with programmatic dependent launch (kernels/pdl.py), as paged_attention decides per device.
    fp8_mma: the device has e4m3 tensor-core dots (fp8_mma_usable), which Tiles.fp8_keys needs.
    sinks: exact first tokens per sequence read from a side table (kernels/sinks.py); 0 = none.
    recent: exact newest tokens per sequence read from a side table (kernels/recent.py); 0 = none.
    """
    lay = codec.layout
    group = num_heads // lay.num_kv_heads
    block_d = triton.next_power_of_2(lay.head_dim)
    tiles = TILES[block_d]
    wide = tiles.wide_block_n is not None and num_splits >= WIDE_MIN_SPLITS
    block_n = tiles.wide_block_n if wide else tiles.block_n
    block_m = max(tiles.decode_m, triton.next_power_of_2(group))
    varlen = max_query_len > block_m // group
    if varlen:  # a prefill chunk: taller q tiles re-read the pages less often
        block_m = max(tiles.varlen_m, triton.next_power_of_2(group))
    exact = query_dtype == torch.float32
    lut = tiles.lut and on_gpu and not exact  # PTX: not for the CPU interpreter; fp16 tables only
    k_lut, v_lut = lut and codec.lut_usable[0], lut and codec.lut_usable[1]
    # Only decode tiles are swapped (a prefill tile's query rows already fill the MMA), and on the GPU only with
    # register lookups: with codebook gathers (2/3 bits) the swapped, capped kernel made illegal memory accesses
    # on the H200. The interpreter keeps the swap so CPU tests check its arithmetic. The register cap was sized
    # for the block_n tile; wide tiles spill under it.
    swap = tiles.swap_ab and not varlen and (k_lut and v_lut or not on_gpu)
    k_fragment = swap and tiles.k_fragment and block_n % 64 == 0
    v_fragment = (k_fragment and tiles.v_fragment and lay.head_dim == 128 and lay.v_bits == 4
                  and block_size % 16 == 0 and not lay.v_coordinate_major)  # fmt: skip
    # coordinate-major values (TQConfig.fp8_values) as e4m3 bytes for an fp8 P.V MMA; elsewhere they are gathered
    fp8_values = (lay.v_coordinate_major and fp8_mma and codec.lut_usable[1] and not exact and block_d >= 64
                  and block_n >= FP8_DOT_MIN_K and (k_fragment or not swap))  # fmt: skip
    cap = (tiles.wide_maxnreg if wide else tiles.maxnreg) if swap else None
    if swap and not wide and fp8_values and tiles.fp8_values_maxnreg:  # the tile Tiles.resident(True) counts
        cap = tiles.fp8_values_maxnreg
    fp8_key_choice = codec.config.fp8_key_scores  # None: not beside key offsets or exact rows (their quality runs)
    fp8_keys = (tiles.fp8_keys and fp8_key_choice is not False and fp8_mma and (k_fragment or not swap)
                and lay.k_bits == 4 and codec.lut_usable[0] and not exact
                and (fp8_key_choice or not (key_offset or sinks or recent)))  # fmt: skip
    warps = tiles.wide_num_warps if wide and tiles.wide_num_warps else tiles.num_warps
    rot_chunk = tiles.wide_rot_chunk if wide and tiles.wide_rot_chunk else tiles.rot_chunk
    q_rotated = at_least(tiles.prerotate_q_min_splits, num_splits)
    in_rows_from = tiles.fp8_halves_in_rows_min_splits  # decode tiles whose real rows leave half of them as padding
    halves_in_rows = (in_rows_from is not None and num_splits >= in_rows_from and not varlen
                      and group * max_query_len <= block_m // 2)  # fmt: skip
    meta = dict(
        GROUP=group, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_m // group,
        BLOCK_N=block_n, ROT_CHUNK=rot_chunk if on_gpu else INTERPRETER_ROT_CHUNK,
        **lay.kernel_constants(block_size), INDEX_ALIGN=lay.index_alignment(block_size),
        OP_DTYPE=tl.float32 if exact else tl.float16, PREC="ieee" if exact else "tf32",
        FUSED=fused, PREFETCH=tiles.prefetch, HAS_KEY_OFFSET=key_offset,
        # timed on decode tiles; a prefill tile's 64 x 64 per-position sums would spill (256 bytes at d=128)
        PAGES_AHEAD=tiles.pages_ahead and not varlen, TILE_ROW_SUM=tiles.tile_row_sum and not varlen,
        SWAP_AB=swap, K_FRAGMENT=k_fragment, V_FRAGMENT=v_fragment, K_LUT=k_lut, V_LUT=v_lut,
        FP8_KEYS=fp8_keys, FP8_SCALE=codec.key_e4m3_scale if fp8_keys else 1.0,
        FP8_VALUES=fp8_values, FP8_V_SCALE=codec.value_e4m3_scale if fp8_values else 1.0,
        V_FP8_FRAGMENT=fp8_values and k_fragment and block_d == 128 and warps == 4,
        FP8_QUERY_HALVES=fp8_keys and tiles.fp8_query_halves,
        FP8_HALVES_IN_ROWS=fp8_keys and tiles.fp8_query_halves and halves_in_rows,
        LUT_PAIRS=tiles.lut_pairs, UNROTATED_PARTIALS=at_least(tiles.unrotated_min_splits, num_splits),
        Q_ROTATED=q_rotated, Q_PUBLISHED=q_rotated and store_new and tiles.publish_q,
        TAIL_MERGE=at_least(tiles.tail_merge_min_splits, num_splits) and num_splits < WIDE_MIN_SPLITS,
        MERGE_SPLITS=tiles.tail_merge_splits,
        STORE_NEW=store_new, **one_token_store_meta(), NORM_CORRECTION=codec.config.norm_correction,
        TINY=TINY_NORM, PDL=pdl, SINKS=sinks, SINK_TILE=SINK_TILE,
        RECENT=recent, RECENT_TILE=window_tile(recent),
        LIVE_SPLITS=live_split_tiles(lay.head_dim, num_splits),
        num_warps=warps, num_stages=tiles.num_stages, **pdl_option(pdl),
    )  # fmt: skip
    if cap:
        meta["maxnreg"] = cap
    return meta


def stores_in_attention(head_dim: int, num_splits: int) -> bool:
    """Whether a decode launch of num_splits should store the step's new K/V itself (Tiles.fused_store_min_splits)."""
    return at_least(TILES[triton.next_power_of_2(head_dim)].fused_store_min_splits, num_splits)


def window_in_store(head_dim: int) -> bool:
    """Whether a decode step's store after the attention writes the exact window too (Tiles.window_writer_in_store)."""
    return TILES[triton.next_power_of_2(head_dim)].window_writer_in_store


def decode_step_stores(head_dim: int, num_splits: int, pdl: bool, window: bool = False) -> bool:
    """Whether a pure decode step hands its K/V store to paged_attention (store_slots) instead of a store launch
    ahead of it: where the attention launch stores them itself (stores_in_attention), with programmatic
    dependent launch (kernels/pdl.py), where a store launch right after the attention overlaps its last programs,
    and where that store after the attention writes the exact window (window: the layer has one; Tiles.
    window_writer_in_store)."""
    return pdl or (window and window_in_store(head_dim)) or stores_in_attention(head_dim, num_splits)


def at_least(min_splits: int | None, num_splits: int) -> bool:
    """Whether a split-K launch of num_splits takes an option of Tiles that starts at min_splits."""
    return num_splits > 1 and min_splits is not None and num_splits >= min_splits
