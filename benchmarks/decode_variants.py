"""The variants bench_decode.py's sweep times against the defaults (unless --no-sweep): evidence for each Tiles choice.

Each variant is a dict of changes. Keys that are `Tiles` fields replace the default tile config; `num_splits`,
`store` ("separate" or "fused"), `sinks`, `recent`, `writers` (False: time the attention without the exact
tables' writer launches) and `live` (sequences with a query; the rest pad the batch, as vLLM pads to a captured
CUDA-graph size) change the launch; `pdl` and `store_contract_last` set module switches
(`SWITCHES`). docs/decode-tuning.md says which won.
"""

from __future__ import annotations

from turboquant_vllm.kernels import decode_tiles, pdl
from turboquant_vllm.kernels import store as store_kernel

LAUNCH_KEYS = ("num_splits", "store", "sinks", "recent", "writers", "live")  # arguments of the launch, not Tiles fields
SWITCHES = {"store_contract_last": (store_kernel, "CONTRACT_LAST"), "pdl": (pdl, "ENABLED")}  # key: (module, attribute)


def applies(change: dict, batch: int) -> bool:
    """Whether a variant means anything at this batch size: a padded one (`live`) needs padding rows."""
    return change.get("live", 0) < batch


VARIANTS: list[dict] = [
    {},
    {"lut": False},  # codebook gathers from memory instead of byte permutes in registers
    {"k_fragment": False},  # keys (and so values) in page order: Triton moves them to the A fragment through smem
    # values in page order (docs/design-v-fragment.md): 4 loads of 16 bytes a thread and tile, and a shared-memory
    # round trip for the V tile; offline 678 -> 714 instructions a tile
    {"v_fragment": False},
    {"v_fragment": False, "store": "fused"},
    {"lut_pairs": True},  # the lookups' fp16 pairs kept packed, one register each, none repacked for the MMA
    {"store": "fused", "maxnreg": None},
    {"block_n": 32},
    {"block_n": 128},
    {"num_warps": 2},
    {"num_warps": 2, "block_n": 16},
    {"num_warps": 1, "block_n": 16},
    {"num_warps": 1, "block_n": 32},
    {"wide_block_n": None},  # no wide tiles for heavily split launches
    {"num_stages": 2},
    {"prefetch": False},
    {"pages_ahead": False},  # block-table entries read in the same step as the page reads that need them
    {"tile_row_sum": False},  # softmax sums added up across warps every tile
    {"pages_ahead": False, "tile_row_sum": False},
    {"maxnreg": None},  # no register cap: offline 166 registers (3 programs an SM) and 87 moves a tile, not 157
    {"maxnreg": 128},  # 4 programs per SM, with spills
    {"maxnreg": 128, "resident_programs": 4},  # and splits that fill them (TQConfig.fp8_values: no loop spills)
    {"wide_maxnreg": 168, "wide_resident_programs": 3},  # one sequence: 3 wide programs an SM
    {"swap_ab": False, "maxnreg": None},  # mma.sync with the padded query rows on the M side
    {"swap_ab": False, "maxnreg": 128},
    {"reduce_splits": 1},  # the split-K reduce reads one split per step
    {"reduce_splits": 8, "reduce_rot_chunk": 16},  # the reduce un-rotates 16 columns of R per step
    {"reduce_splits": 4},
    {"unrotated_min_splits": 2},  # every split launch un-rotates in the split programs; a plain-sum reduce
    {"unrotated_min_splits": decode_tiles.WIDE_MIN_SPLITS},  # only wide launches do
    {"wide_reduce_rows": None},  # the reduce un-rotates 16 rows a program by a dot at every split count
    {"wide_reduce_rows": 4},
    {"reduce_rows": 1},  # one row a program by multiply-adds at every split count
    {"prerotate_q_min_splits": None},  # every split program rotates its own queries
    # twice the warps a program at 128 registers: 16 warps an SM instead of 8 (wide) or 12 (3 x 4 warps)
    {"wide_num_warps": 8, "wide_maxnreg": 128},
    {"wide_num_warps": 8, "wide_maxnreg": 128, "num_splits": 64},  # one sequence: two waves of those
    {"num_warps": 8, "maxnreg": 128},
    {"num_warps": 8, "block_n": 128, "maxnreg": 128},  # each warpgroup a 64-token half of the tile
    {"num_warps": 8, "block_n": 128, "maxnreg": 128, "num_splits": 2},  # 16 x 8 x 2 programs: one wave
    {"num_warps": 8, "block_n": 128, "maxnreg": 128, "wide_num_warps": 8, "wide_maxnreg": 128},
    # one sequence in capped 64-token programs (3 an SM): 8 x 48 = 384 of them fill one wave, 8 x 64 take two
    {"wide_block_n": None, "num_splits": 48},
    {"wide_block_n": None, "num_splits": 64},
    # slices of R where the launch rotates the new token's V (the last split's tail) and the queries
    {"rot_chunk": 16},
    {"rot_chunk": 32},
    {"rot_chunk": 128},
    {"rot_chunk": 32, "wide_rot_chunk": 128},  # the best width of each launch in decode_sweep_h200_2026-12-01p
    # "fused": paged_attention stores the new K/V, in the attention launch at 32 splits (the engine's
    # one-sequence steps), else in a store launch right after it
    {"store": "fused"},
    {"fused_store_min_splits": 2, "store": "fused"},  # in the attention launch at 3 splits too
    {"rot_chunk": 128, "store": "fused"},
    {"store": "fused", "store_contract_last": True},  # store.CONTRACT_LAST in the fused store
    {"store": "fused", "wide_block_n": None, "num_splits": 48},  # 8 x 48 capped programs + 8 store programs
    # the split program that finishes last merges the partials instead of a reduce launch (below 32 splits)
    {"tail_merge_min_splits": 2},
    {"tail_merge_min_splits": 2, "store": "separate"},  # the 16-sequence engine step
    {"tail_merge_min_splits": 2, "rot_chunk": 32},
    {"tail_merge_min_splits": 2, "store": "fused"},  # the engine's steps with PDL: the store after the merge
    # without programmatic dependent launch (kernels/pdl.py, on by default on Hopper): each kernel of the step
    # waits for the one ahead to end
    {"pdl": False},
    {"pdl": False, "store": "separate"},  # the 16-sequence engine step without PDL: the store ahead
    {"pdl": False, "store": "fused"},  # the one-sequence engine step without PDL: the store in the launch
    # the store programs rotate the queries for the split programs (no rotation launch), with 32 wide splits
    # and with 48 capped ones
    {"publish_q": True, "store": "fused"},
    {"store": "fused", "wide_block_n": None, "num_splits": 48, "publish_q": True},
    # keys as e4m3 bytes scored by an fp8 MMA against the queries in two e4m3 halves (kernels/lut.py): alone and in
    # the one-sequence engine step (two MMAs in capped launches, one with the remainders in its padding rows in wide
    # ones); the halves in rows everywhere and by two MMAs everywhere; the queries rounded once
    {"fp8_keys": True},
    {"fp8_keys": True, "store": "fused"},
    {"fp8_keys": True, "fp8_halves_in_rows_min_splits": 1},
    {"fp8_keys": True, "fp8_halves_in_rows_min_splits": None, "store": "fused"},
    {"fp8_keys": True, "fp8_query_halves": False},
    {"fp8_keys": True, "fp8_query_halves": False, "store": "fused"},
    # the split rule before resident_programs: about two programs an SM (2-8 sequences take fewer splits)
    {"resident_programs": None},
    # 4 exact sinks (the sink tile, the first tile's mask, the writer launch), without and with the engine's store
    {"sinks": 4},
    {"sinks": 4, "store": "fused"},
    # 32 exact recent tokens (the window's tag reads, its tile in the last split, the writer launch), likewise
    {"recent": 32},
    {"recent": 32, "store": "fused"},  # where the store runs after the attention, it writes the window's rows
    {"recent": 32, "store": "fused", "window_writer_in_store": False},  # ... or the writer launch does
    {"recent": 32, "writers": False},  # the attention's share of the window's cost; the rest is the writer's
    {"recent": 32, "window_writer_in_reduce": True},  # the writer's programs in the reduce launch
    {"recent": 32, "window_writer_in_reduce": True, "store": "fused"},
    # a 16-sequence CUDA graph replayed for 10 and 12 live sequences (6 and 4 padding rows), with the live ones split
    # finer (the default) and with the grid's split count fixed (choose_num_splits of 16)
    {"live_splits": False},  # a full batch: the live count is read, but splits as before
    {"live": 10},
    {"live": 10, "live_splits": False},
    {"live": 12},
    {"live": 12, "live_splits": False},
]
