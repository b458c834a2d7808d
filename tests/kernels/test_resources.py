"""The decode kernel's register budget on Hopper, checked by compiling it (no GPU needed: Triton ships ptxas).

Decode attention is latency-bound: each SM hides memory latency with the programs it can keep resident.
At 4 warps, <= 168 registers per thread keeps three programs per SM; the version that rotated the
accumulator in registers needed 244 and ran two.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from turboquant_vllm.kernels import decode_tiles

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_resources.py"
V_PROBE = SCRIPT.with_name("probe_v_fragment.py")


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def test_decode_kernel_keeps_three_programs_per_sm_at_head_dim_128(resources):
    rows = [r for r in resources["rows"] if r["head_dim"] == 128 and not r["fp8_values"]]
    tiles = decode_tiles.TILES[128]
    defaults = [r for r in rows if r["tiles"] == dataclasses.asdict(tiles) and not r["store_new"] and not r["sinks"]]
    narrow = [r for r in defaults if r["num_splits"] < decode_tiles.WIDE_MIN_SPLITS]
    assert len(narrow) == 4  # split-K and fused launches, without and with key offsets
    for r in narrow:
        assert r["registers"] <= 168 and r["programs_per_sm_by_registers"] >= 3, r
    assert next(r for r in narrow if r["split_k"] and not r["key_offset"])["spill_store_bytes"] == 0
    wide = next(r for r in defaults if r["num_splits"] >= decode_tiles.WIDE_MIN_SPLITS)  # 1 sequence, 32 splits
    assert wide["block_n"] == tiles.wide_block_n and wide["maxnreg"] is None, wide
    # Wide launches run uncapped near 255 registers: with 64-column slices of R this one spilled 36 bytes offline
    # until the keys were decoded in the A fragment's order (none since), and still measured faster, 1 x 32K 46.6 ->
    # 44.3 us (decode_sweep_h200_2026-12-01p.json); the storing one with key offsets spills a few bytes. A few dozen
    # bytes at most, never a tile's worth.
    wide_store = next(r for r in rows if r["store_new"] and r["num_splits"] >= decode_tiles.WIDE_MIN_SPLITS)
    assert wide_store["tiles"] == dataclasses.asdict(tiles)
    for r in (wide, wide_store):
        assert r["spill_store_bytes"] <= 64, r


def test_fp8_values_tile_fits_four_programs_an_sm(resources):
    """TQConfig.fp8_values' 16-sequence tile compiles under Tiles.fp8_values_maxnreg (4 programs an SM) with at most a
    few bytes spilled and none read in the context loop, and with fewer loop instructions than the default tile."""
    rows = [r for r in resources["rows"] if r["fp8_values"]]
    tiles = decode_tiles.TILES[128]
    capped = next(r for r in rows if r["num_splits"] == 4 and r["tiles"] == dataclasses.asdict(tiles))
    assert capped["maxnreg"] == tiles.fp8_values_maxnreg == 128 and capped["programs_per_sm_by_registers"] >= 4
    assert capped["spill_store_bytes"] <= 16 and capped["context_loop_sass"]["local_accesses"] == 0, capped
    default = next(r for r in resources["rows"] if r["head_dim"] == 128 and not r["fp8_values"] and r["split_k"]
                   and r["num_splits"] == 3 and r["tiles"] == dataclasses.asdict(tiles) and not r["key_offset"]
                   and not r["store_new"] and not r["sinks"])  # fmt: skip
    assert capped["context_loop_sass"]["instructions"] < default["context_loop_sass"]["instructions"]
    wide = next(r for r in rows if r["num_splits"] >= decode_tiles.WIDE_MIN_SPLITS)
    assert wide["spill_store_bytes"] <= 64 and wide["programs_per_sm_by_registers"] >= 2, wide


def test_coordinate_major_values_compile_in_every_tile(resources):
    """fp8_values' pages compile in each tile that reads them: speculative-decoding queries and a prefill chunk's
    varlen tile at head_dim 128 (the default's pages there), head_dim 64's plain tiles with the fp8 P.V product,
    and head_dim 256's 16-token tiles, which gather the values (an e4m3 dot needs 32 tokens on its K side)."""
    rows = {(r["head_dim"], r["max_query_len"]): r for r in resources["rows"]
            if r["fp8_values"] and r["num_splits"] == 3}  # fmt: skip
    spec, chunk = rows[(128, 4)], rows[(128, 64)]
    assert spec["fp8_value_products"] and spec["swap_ab"] and spec["maxnreg"] == 128
    assert chunk["fp8_value_products"] and not chunk["swap_ab"] and chunk["block_n"] >= decode_tiles.FP8_DOT_MIN_K
    assert rows[(64, 1)]["fp8_value_products"] and rows[(64, 1)]["spill_store_bytes"] == 0
    assert not rows[(256, 1)]["fp8_value_products"] and rows[(256, 1)]["block_n"] < decode_tiles.FP8_DOT_MIN_K


def test_exact_sinks_keep_the_register_budget(resources):
    """The sink tile (kernels/sinks.py) adds no program-per-SM loss and no tile's worth of spills at any split count
    (over token-major values; test_fp8_keys_beside_the_window_shorten_its_loop has the fp8 values' tile)."""
    rows = [r for r in resources["rows"] if r["sinks"] and not r["fp8_values"]]
    assert sorted(r["num_splits"] for r in rows) == [1, 3, decode_tiles.WIDE_MIN_SPLITS]
    for r in rows:
        narrow = r["num_splits"] < decode_tiles.WIDE_MIN_SPLITS
        assert r["programs_per_sm_by_registers"] >= (3 if narrow else 2) and r["spill_store_bytes"] <= 64, r


def test_split_reduce_never_spills(resources):
    """At every padded head_dim, un-rotating (by a dot or, in programs of 1 or 4 rows, by multiply-adds) or plain,
    the reduce's step (rows x splits x BLOCK_D fp32) and its un-rotation slice of R fit in registers: 4 splits a
    step at d=256 spilled 584 bytes. Defaults at 3 and WIDE_MIN_SPLITS splits (d=128 takes 1 row a program there);
    the same with the recent window's writer programs in the launch (Tiles.window_writer_in_reduce), and the one-row
    programs with all of R loaded ahead of the partials (Tiles.reduce_rot_ahead)."""
    defaults = [r["block_d"] for r in resources["reduce"] if not r["change"]]
    assert sorted(defaults) == sorted(3 * list(decode_tiles.TILES))
    wide_128 = [r for r in resources["reduce"] if not r["change"] and not r["plain"] and r["block_d"] == 128
                and r["num_splits"] >= decode_tiles.WIDE_MIN_SPLITS]  # fmt: skip
    assert [r["rows"] for r in wide_128] == [decode_tiles.TILES[128].wide_reduce_rows]
    assert {r["rows"] for r in resources["reduce"] if r["change"] and not r["recent_writer"]} == {1, 4}
    assert [r["plain"] for r in resources["reduce"] if r["recent_writer"]] == [False, True]
    assert [r["rows"] for r in resources["reduce"] if r["rot_ahead"]] == [1]
    for r in resources["reduce"]:
        assert r["spill_store_bytes"] == 0 and r["registers"] <= 255, r


def test_context_loop_sass_counts_the_tile_loop(resources):
    """kernel_resources.context_loop_sass finds the loop over context tiles: at d=128 the swapped decode tile's two
    dots are 8 + 8 wgmma of 64x16x16 (64 tokens x 128 dims, then 128 dims x 64 tokens), with the 4-bit lookups'
    byte permutes and the tile's barriers in the same loop; every attention variant has a tile loop with MMAs."""
    tiles = dataclasses.asdict(decode_tiles.TILES[128])
    default = next(r for r in resources["rows"] if r["head_dim"] == 128 and r["num_splits"] == 3
                   and r["tiles"] == tiles and not r["key_offset"] and not r["store_new"])  # fmt: skip
    loop = default["context_loop_sass"]
    assert loop["tensor_core"] == 16 and loop["byte_permutes"] > 0 and loop["barriers"] > 0, loop
    assert loop["global_loads"] > 0 and loop["instructions"] > loop["register_moves"] > 0, loop
    for r in resources["rows"]:
        assert r["context_loop_sass"]["tensor_core"] > 0, r


def test_fp8_keys_score_by_fp8_wgmma(resources):
    """With Tiles.fp8_keys the d=128 tile's key dot is fp8 wgmma (QGMMA, k32: 4 a 64-token tile per query operand)
    beside the value dot's 8 HGMMA: the query halves by two MMAs take 8 of them, in the padding rows or rounded once
    4. Those by two MMAs and the rounded-once queries shorten the fp16 keys' loop; the halves in rows lengthen it
    (Triton 3.6 runs the softmax twice after the fold), why only wide launches take that form."""
    plain = {"key_offset": False, "store_new": False, "sinks": 0, "recent": 0}
    rows = [r for r in resources["rows"] if r["head_dim"] == 128 and r["num_splits"] == 3
            and all(r[k] == v for k, v in plain.items())]  # fmt: skip
    fp16 = dataclasses.asdict(dataclasses.replace(decode_tiles.TILES[128], fp8_keys=False))
    fp16_loop = next(r["context_loop_sass"] for r in rows if r["tiles"] == fp16)
    mmas = {(True, decode_tiles.WIDE_MIN_SPLITS): 16, (True, 1): 12, (False, decode_tiles.WIDE_MIN_SPLITS): 12}

    def loop(halves: bool, in_rows_from: int) -> dict:
        tiles = dataclasses.replace(decode_tiles.TILES[128], fp8_keys=True, fp8_query_halves=halves,
                                    fp8_halves_in_rows_min_splits=in_rows_from)  # fmt: skip
        return next(r["context_loop_sass"] for r in rows if r["tiles"] == dataclasses.asdict(tiles))

    loops = {form: loop(*form) for form in mmas}
    assert {form: sass["tensor_core"] for form, sass in loops.items()} == mmas, loops
    shorter = [sass["instructions"] < fp16_loop["instructions"] for sass in loops.values()]
    assert shorter == [True, False, True], (fp16_loop, loops)


def test_fp8_keys_beside_the_window_shorten_its_loop(resources):
    """A window turns fp8 key scores off by default (TQConfig.fp8_key_scores=None), so over fp8-value pages its
    16-sequence tile decodes keys for fp16 products: offline 674 loop instructions against 602 without the window.
    With fp8_key_scores=True the packed keys keep their fp8 MMA (the window's rows are scored after the loop) and
    the loop is back under the window-free tile's (589 against 602), with nothing spilled read inside it."""
    rows = [r for r in resources["rows"] if r["head_dim"] == 128 and r["num_splits"] == 4 and r["fp8_values"]
            and r["tiles"] == dataclasses.asdict(decode_tiles.TILES[128]) and not r["key_offset"]]  # fmt: skip
    plain = next(r for r in rows if not r["recent"] and not r["sinks"])
    window = {r["fp8_key_scores"]: r for r in rows if r["recent"] and not r["sinks"]}
    assert plain["fp8_key_scores"] and set(window) == {False, True}
    loops = {k: r["context_loop_sass"] for k, r in window.items()}
    assert loops[True]["instructions"] <= plain["context_loop_sass"]["instructions"] < loops[False]["instructions"]
    assert loops[True]["byte_permutes"] < loops[False]["byte_permutes"], loops
    assert loops[True]["tensor_core"] == plain["context_loop_sass"]["tensor_core"], loops
    with_sinks = next(r for r in rows if r["recent"] and r["sinks"])  # the window past the sinks, both exact tiles
    for r in (window[True], with_sinks):  # the exact tiles' spills (96 B) are not read in the loop
        assert r["context_loop_sass"]["local_accesses"] == 0 and r["programs_per_sm_by_registers"] >= 4, r


def test_tiles_reach_the_mma_without_shared_memory(resources):
    """Decoded in the A fragment's order (kernels/fragment.py) the key tile skips the shared-memory round trip the
    page order needs (its stores, a barrier, ldmatrix): offline 760 -> 714 instructions a tile, and on the H200
    16 x 32K 472 -> 403 us (decode_sweep_h200_2026-12-01x.json). The value tile in that order too (Tiles.v_fragment)
    drops its own stores: 714 -> 678, and 403 -> 363 us (decode_sweep_h200_2026-12-01y.json). Packed lookups
    (Tiles.lut_pairs) drop the register moves that repack fp16 halves yet measured slower (414 us), so they stay off."""
    rows = {json.dumps(r["tiles"], sort_keys=True): r for r in resources["rows"]
            if r["head_dim"] == 128 and r["num_splits"] == 3 and not r["key_offset"] and not r["store_new"]
            and not r["sinks"] and not r["fp8_values"]}  # fmt: skip
    tiles = decode_tiles.TILES[128]
    assert tiles.k_fragment and tiles.v_fragment and not tiles.lut_pairs

    def loop(**change) -> dict:
        return rows[json.dumps(dataclasses.asdict(dataclasses.replace(tiles, **change)), sort_keys=True)][
            "context_loop_sass"
        ]

    default, keys_only, page_order = loop(), loop(v_fragment=False), loop(k_fragment=False)
    pairs, page_order_pairs = loop(lut_pairs=True), loop(k_fragment=False, lut_pairs=True)
    for fragment, page in ((keys_only, page_order), (pairs, page_order_pairs), (default, keys_only)):
        assert fragment["shared_stores"] < page["shared_stores"] and fragment["barriers"] <= page["barriers"]
        assert fragment["instructions"] < page["instructions"]
    assert keys_only["barriers"] < page_order["barriers"]


def test_values_in_fragment_order_would_skip_shared_memory():
    """docs/design-v-fragment.md rests on this: V^T decoded from the proposed field order, or from today's pages read
    2 bytes a token and relabelled, reaches wgmma from registers (only P is stored to shared memory), where the page
    order as the kernel reads it now stores the tile and reads it back."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(V_PROBE)], env=env, check=True, capture_output=True, text=True)
    rows = {r["v_order"]: r for r in json.loads(res.stdout)["rows"]}
    page = rows.pop("page")
    assert set(rows) == {"fragment", "relabelled page"}
    for order in rows.values():
        assert order["shared_memory_conversions"] == 1 < page["shared_memory_conversions"], order
        assert order["context_loop_sass"]["shared_stores"] < page["context_loop_sass"]["shared_stores"], order
        assert order["spill_store_bytes"] == 0, order


def test_prefill_store_merges_value_groups_unspilled(resources):
    """The prefill-sized store at head_dim 128 (coordinate-major values by default) merges rows of 8 tokens into
    whole words (StoreLaunch.merge_value_groups) and still compiles without spilling; the variant that writes every
    nibble by atomics, which the H200 times beside it, compiles too."""
    prefill = [r for r in resources["store"] if r["launch"]["block_t"] == 32 and not r["key_offset"]]
    merged = next(r for r in prefill if r["launch"] == prefill[0]["launch"])
    assert merged["launch"]["merge_value_groups"] and merged["spill_store_bytes"] == 0, merged
    nibbles = next(r for r in prefill if not r["launch"]["merge_value_groups"])
    assert nibbles["spill_store_bytes"] == 0 and 0 < nibbles["atomics"] < merged["atomics"], nibbles
