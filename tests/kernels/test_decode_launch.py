"""The decode launch's policies: split counts and grids, tile and launch options, and sm_90 lowering."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch
import triton.language as tl
from decode_batch import TOL_FP32, assert_matches, make_batch

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles, pdl
from turboquant_vllm.kernels.decode_tiles import choose_num_splits, choose_split_grid, live_splits
from turboquant_vllm.kernels.workspace import AttentionWorkspace


def test_swap_and_register_cap_only_for_decode_tiles():
    """The d=128 register cap fits the 64-token decode tile; wide and prefill tiles would spill under it, and a
    prefill tile's 64 query rows already fill the MMA's M side. On the GPU only register-lookup tiles swap.
    Token-major values here; test_fp8_values_pages_take_four_programs_an_sm has the coordinate-major ones."""
    codec = KVCodec(TQConfig(fp8_values=False), 8, 128)
    tiles = decode_tiles.TILES[128]
    assert tiles.swap_ab and tiles.maxnreg

    def meta(max_query_len: int, num_splits: int) -> dict:
        return decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, max_query_len, 16, False, num_splits)

    decode_tile, wide, varlen = meta(1, 3), meta(1, decode_tiles.WIDE_MIN_SPLITS), meta(64, 3)
    assert decode_tile["SWAP_AB"] and decode_tile["maxnreg"] == tiles.maxnreg
    assert decode_tile["ROT_CHUNK"] == wide["ROT_CHUNK"] == tiles.rot_chunk  # the interpreter keeps its own
    assert wide["SWAP_AB"] and "maxnreg" not in wide and wide["num_warps"] == tiles.num_warps
    # the wide launch's own warps and cap (bench_decode.py's sweep), leaving the other launches alone
    wider = dataclasses.replace(tiles, wide_num_warps=2 * tiles.num_warps, wide_maxnreg=128, wide_rot_chunk=128)
    with patch.dict(decode_tiles.TILES, {128: wider}):
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["num_warps"] == 2 * tiles.num_warps
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["maxnreg"] == 128
        assert meta(1, decode_tiles.WIDE_MIN_SPLITS)["ROT_CHUNK"] == 128
        assert meta(1, 3) == decode_tile and meta(64, 3) == varlen
    assert not varlen["SWAP_AB"] and "maxnreg" not in varlen and varlen["BLOCK_M"] == tiles.varlen_m
    # both fragment orders on the swapped tiles by default (4-bit V, 16-token pages); the values' needs a page of
    # whole 16-token groups and 4-bit V
    assert all(m["K_FRAGMENT"] and m["V_FRAGMENT"] for m in (decode_tile, wide))
    assert not varlen["K_FRAGMENT"] and not varlen["V_FRAGMENT"]
    odd_pages = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 8, False, 3)
    assert odd_pages["K_FRAGMENT"] and not odd_pages["V_FRAGMENT"]
    v3 = decode_tiles.attention_meta(KVCodec(TQConfig(v_bits=3), 8, 128), 32, torch.bfloat16, False, 1, 16, False, 3)
    assert v3["K_FRAGMENT"] and not v3["V_FRAGMENT"]
    gathers = KVCodec(TQConfig(k_bits=3, v_bits=3), 8, 128)  # codebook gathers: not swapped on the GPU
    gpu = decode_tiles.attention_meta(gathers, 32, torch.bfloat16, True, 1, 16, False, 3)
    assert not gpu["SWAP_AB"] and not gpu["K_LUT"] and "maxnreg" not in gpu
    assert decode_tiles.attention_meta(gathers, 32, torch.bfloat16, False, 1, 16, False, 3)["SWAP_AB"]  # interpreter


def test_programmatic_launch_only_where_enabled_and_supported(monkeypatch):
    """kernels/pdl.py: launches use PDL only when enabled, on CUDA devices of compute capability 9+; the metas then
    carry the launch option and the kernels' PDL switch together."""
    cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(pdl, "capability", lambda index: (9, 0))
    assert pdl.pdl_launch(cuda0) and not pdl.pdl_launch(cpu)  # on by default
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_launch(cuda0)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "capability", lambda index: (8, 9))
    assert not pdl.pdl_launch(cuda0)
    codec = KVCodec(TQConfig(), 8, 128)
    for on in (False, True):
        meta = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, False, 3, pdl=on)
        rmeta = decode_tiles.reduce_meta(32, 128, 128, False, tl.float16, "tf32", 3, pdl=on)
        for m in (meta, rmeta):
            assert m["PDL"] == on and m.get("launch_pdl", False) == on


def test_fp8_key_scores_only_where_configured_and_supported(monkeypatch):
    """d=128's 4-bit keys are scored in fp8 by default, in every launch shape, unless the config turns that off or
    the device has no e4m3 tensor-core dots (compute capability below 8.9: Triton would not compile the kernel);
    beside key offsets, sinks or the exact window only where fp8_key_scores is True."""

    def fp8(config: TQConfig | None = None, **kw) -> list[bool]:
        codec = KVCodec(config or TQConfig(), 8, 128)
        return [decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, q_len, 16, False, splits, **kw)["FP8_KEYS"]
                for q_len, splits in ((1, 3), (1, decode_tiles.WIDE_MIN_SPLITS), (64, 3))]  # fmt: skip

    assert fp8() == [True] * 3
    assert fp8(TQConfig(fp8_key_scores=False)) == fp8(fp8_mma=False) == [False] * 3
    assert fp8(TQConfig(k_bits=3)) == fp8(key_offset=True) == fp8(sinks=4) == fp8(recent=32) == [False] * 3
    beside = TQConfig(fp8_key_scores=True)  # also beside key offsets and exact rows
    assert fp8(beside, key_offset=True) == fp8(beside, sinks=4) == fp8(beside, recent=32) == [True] * 3
    cuda0 = torch.device("cuda", 0)
    for capability, usable in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(decode_tiles, "capability", lambda index, c=capability: c)
        assert decode_tiles.fp8_mma_usable(cuda0) == usable
    assert decode_tiles.fp8_mma_usable(torch.device("cpu"))  # the interpreter emulates them


def test_choose_num_splits():
    """Tiles without resident_programs (d=64): about two 4-warp programs an SM."""
    assert choose_num_splits(1, 8, 32, 132, head_dim=64) == 32  # 8 programs: split up to the cap
    assert choose_num_splits(1, 8, 16, 132, head_dim=64) == 16
    assert choose_num_splits(4, 8, 32, 132, head_dim=64) == 9  # cdiv(264, 32)
    assert choose_num_splits(16, 8, 32, 132, head_dim=64) == 3
    assert choose_num_splits(17, 8, 32, 132, head_dim=64) == 1  # 136 programs already cover 132 SMs
    assert choose_num_splits(256, 8, 32, 132, head_dim=64) == 1
    assert choose_num_splits(1, 8, 1, 132, head_dim=64) == 1
    assert choose_num_splits(0, 8, 32, 132, head_dim=64) == 32
    for seqs in range(1, 70):
        n = choose_num_splits(seqs, 2, 16, 108, head_dim=64)
        assert 1 <= n <= 16 and (n == 1) == (seqs * 2 >= 108)
        assert n in (1, 16) or seqs * 2 * n >= 2 * 108


def test_fp8_values_pages_take_four_programs_an_sm(monkeypatch):
    """TQConfig.fp8_values' decode tile fits 128 registers (Tiles.fp8_values_maxnreg): capped launches split until
    4 programs an SM fill a wave (16 sequences x 8 KV heads x 4 = 512 <= 528), and only those launches take the cap;
    the wide one-sequence launch keeps its own rule, and devices without e4m3 dots the default cap."""
    tiles = decode_tiles.TILES[128]
    assert (tiles.fp8_values_maxnreg, tiles.resident(True), tiles.resident(False)) == (128, 4, 3)
    assert choose_num_splits(16, 8, 32, 132, fp8_values=True) == 4
    assert choose_num_splits(16, 8, 32, 132) == 3
    assert choose_num_splits(1, 8, 32, 132, fp8_values=True) == choose_num_splits(1, 8, 32, 132)
    assert choose_split_grid(12, 8, 32, 132, fp8_values=True)[1] == 4 * 132 // 8  # the slots of a padded batch
    for fp8_values in (False, True):
        codec = KVCodec(TQConfig(fp8_values=fp8_values), 8, 128)
        capped, wide = (decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, False, splits)
                        for splits in (4, decode_tiles.WIDE_MIN_SPLITS))  # fmt: skip
        assert capped["maxnreg"] == (128 if fp8_values else tiles.maxnreg)
        assert wide.get("maxnreg") == tiles.wide_maxnreg
    # without e4m3 dots (compute capability < 8.9) such pages' values are gathered: the default tile and its cap
    gathered = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, False, 4, fp8_mma=False)
    assert not gathered["FP8_VALUES"] and gathered["maxnreg"] == tiles.maxnreg
    # ... which is what the split count asks of the pages and the device (the backend's and bench_decode's rule)
    cpu, cuda0 = torch.device("cpu"), torch.device("cuda", 0)
    assert decode_tiles.fp8_value_tiles(KVCodec(TQConfig(), 8, 128), cpu)  # the default's pages at d=128
    assert not decode_tiles.fp8_value_tiles(KVCodec(TQConfig(fp8_values=False), 8, 128), cpu)
    monkeypatch.setattr(decode_tiles, "capability", lambda index: (8, 0))
    assert not decode_tiles.fp8_value_tiles(codec, cuda0)


@pytest.mark.parametrize("num_sms", [132, 114, 78])
def test_split_choice_fills_one_wave_of_resident_programs(num_sms):
    """d=128: 2-16 sequences split until one more split would need a second wave of capped programs (3 an SM);
    one sequence until its wide programs (2 an SM) fill one, counting the store programs launches of
    >= fused_store_min_splits splits add (one per sequence and KV head)."""
    tiles = decode_tiles.TILES[128]
    assert (tiles.resident_programs, tiles.wide_resident_programs) == (3, 2) and tiles.wide_block_n
    assert choose_num_splits(1, 8, 32, 132) == 32  # 8 x 32 wide programs + 8 store programs = 264
    assert choose_num_splits(1, 8, 48, 132) == 32  # a wider workspace changes nothing: the wave is full
    assert choose_num_splits(2, 8, 32, 132) == 24  # 16 x 24 = 384 capped programs <= 396
    assert choose_num_splits(4, 8, 32, 132) == 12
    assert choose_num_splits(16, 8, 32, 132) == 3
    assert choose_num_splits(17, 8, 32, 132) == 1  # 136 programs already cover 132 SMs

    def programs(seqs: int, splits: int) -> int:
        return seqs * 8 * (splits + decode_tiles.at_least(tiles.fused_store_min_splits, splits))

    for seqs in range(1, num_sms // 8 + 1):
        n = choose_num_splits(seqs, 8, 64, num_sms)
        resident = 2 if n >= decode_tiles.WIDE_MIN_SPLITS else 3
        assert programs(seqs, n) <= resident * num_sms, (seqs, n)
        assert programs(seqs, n + 1) > resident * num_sms or n == decode_tiles.WIDE_MIN_SPLITS - 1, (seqs, n)


@pytest.mark.parametrize(("split_slots", "want_splits"), [(6, 3), (2, 1), (40, 4)])
def test_live_splits_of_a_padded_batch(device, split_slots, want_splits):
    """A graph's padding rows (no query, no context) do not count: the 2 live sequences of 4 share split_slots
    (head_dim 128: the tiles that count live sequences).

    The workspace starts as NaN, so a split the reduce read without its program having run would poison the
    output; the splits past the live count must stay unwritten, proving those programs left at once."""
    b = make_batch(device, [150, 0, 45, 0], [1, 0, 2, 0], num_heads=4, num_kv_heads=2, head_dim=128, seed=21)
    assert live_splits(2, 4, split_slots) == want_splits
    ws = AttentionWorkspace.allocate(8, 4, 128, 4, device, max_seqs=4)
    for t in (ws.acc, ws.row_max, ws.row_sum):
        t.fill_(float("nan"))
    assert_matches(b.run(num_splits=4, split_slots=split_slots, workspace=ws), b.expected(), TOL_FP32, rows=3)
    written = ~torch.isnan(ws.row_max[:3].cpu()).any(dim=1)  # [token, split]: -inf where a split saw no token
    assert written.tolist() == [[s < want_splits for s in range(4)]] * 3


def test_split_grid_serves_padded_batches(monkeypatch):
    """d=128 on 132 SMs: a full batch splits as choose_num_splits does; a batch just over half live splits finer in
    the same grid, and no live count needs more than one wave of capped programs (3 an SM)."""
    assert choose_split_grid(16, 8, 32, 132) == (5, 49)  # 9 live: 5 splits; 16 live: 3
    assert choose_split_grid(1, 8, 32, 132) == (32, 0)  # one sequence: the wide tiles, nothing to pad
    assert choose_split_grid(2, 8, 32, 132) == (24, 49)
    assert choose_split_grid(17, 8, 32, 132) == (1, 0)  # no split at all
    assert choose_split_grid(16, 8, 32, 132, head_dim=64) == (3, 0)  # tiles without resident_programs
    for seqs in range(2, 17):
        grid, slots = choose_split_grid(seqs, 8, 32, 132)
        assert live_splits(seqs, grid, slots) == choose_num_splits(seqs, 8, 32, 132)
        assert grid < decode_tiles.WIDE_MIN_SPLITS
        for live in range(seqs // 2 + 1, seqs + 1):
            splits = live_splits(live, grid, slots)
            assert live * 8 * splits <= 3 * 132 and splits >= live_splits(seqs, grid, slots), (seqs, live)
    monkeypatch.setitem(decode_tiles.TILES, 128, dataclasses.replace(decode_tiles.TILES[128], live_splits=False))
    assert choose_split_grid(16, 8, 32, 132) == (3, 0)  # Tiles.live_splits off: choose_num_splits, fixed


def test_narrower_programs_get_more_splits(monkeypatch):
    """2-warp programs: the same warps per SM take twice the programs before splitting stops."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], num_warps=2, resident_programs=None)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    assert choose_num_splits(16, 8, 32, 132) == 5  # cdiv(2 * 132 * 2, 128)
    assert choose_num_splits(17, 8, 32, 132) == 4  # 136 programs no longer fill the SMs
    assert choose_num_splits(33, 8, 32, 132) == 1
    assert choose_num_splits(16, 8, 32, 132, head_dim=64) == 3  # other head dims keep their own tiles


_HOPPER_COMPILE = """
import dataclasses, torch, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from turboquant_vllm.kernels import decode, decode_reduce, decode_tiles, sinks, store
from turboquant_vllm.kernels.pdl import pdl_option
from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec

def build(fn, ptrs, meta, options):
    sig = {n: ptrs.get(n, "constexpr" if n in meta else "i32") for n in fn.arg_names}
    assert compile(ASTSource(fn, sig, meta), target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]

codec = KVCodec(TQConfig(k_bits=4, v_bits=3), 8, 128)
ptrs = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*bf16")
ptrs |= dict.fromkeys(("rot_ptr", "k_cent_ptr", "v_cent_ptr", "koff_ptr"), "*fp32")
ptrs |= dict.fromkeys(("ws_acc_ptr", "ws_max_ptr", "ws_sum_ptr", "ws_q_ptr"), "*fp32")
ptrs |= dict.fromkeys(("k_bnd_ptr", "k_cent32_ptr", "v_bnd_ptr", "v_cent32_ptr", "koff_orig_ptr"), "*fp32")
ptrs |= {"slot_ptr": "*i64", "ws_ticket_ptr": "*i32"}
ptrs |= {"cache_ptr": "*u8", "lut_ptr": "*i32", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32"}
ptrs |= {"qk_scale": "fp32"}
decode_tiles.TILES[128] = dataclasses.replace(decode_tiles.TILES[128], tail_merge_min_splits=2)
ptrs |= {"sink_kv_ptr": "*bf16", "sink_tag_ptr": "*i32"}
for num_splits, pdl in ((1, False), (3, True)):  # fused; split with the tail merge, programmatic launch and sinks
    meta = decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, 1, 16, num_splits == 1, num_splits, True,
                                       store_new=True, pdl=pdl, sinks=4 * pdl)
    assert meta["K_LUT"] and not meta["V_LUT"]  # the byte-permute lookups (PTX) compile for 4-bit keys
    assert meta["TAIL_MERGE"] == (num_splits > 1) and meta["PDL"] == meta.get("launch_pdl", False) == pdl
    options = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
    build(decode._attention_kernel, ptrs, meta, options)
ptrs = dict.fromkeys(("ws_acc_ptr", "ws_max_ptr", "ws_sum_ptr", "rot_ptr"), "*fp32") | {"out_ptr": "*bf16"}
for plain in (False, True):
    meta = decode_tiles.reduce_meta(32, 128, 128, plain, tl.float16, "tf32", pdl=plain)
    options = {k: meta.pop(k) for k in decode_tiles.LAUNCH_OPTIONS if k in meta}
    build(decode_reduce._reduce_splits_kernel, ptrs | {"qsl_ptr": "*i32"}, meta, options)
for pdl in (False, True):
    meta = dict(NUM_HEADS=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_R=16, CHUNK=16, PREC="tf32", PDL=pdl)
    build(decode_reduce._rotate_queries_kernel, {"q_ptr": "*bf16", "out_ptr": "*fp32", "rot_ptr": "*fp32"}, meta,
          pdl_option(pdl))
meta = dict(HEAD_DIM_PAD=128, BLOCK_T=1, BLOCK_K=32, HEADS_PER_PROGRAM=1, **codec.layout.kernel_constants(16),
            NORM_CORRECTION=True, TINY=1e-30, DOT_PRECISION="ieee", HAS_KEY_OFFSET=False, CONTRACT_LAST=False,
            BUCKET_SEARCH=False, MERGE_V_GROUPS=False, LAUNCH_DEPENDENTS=True, PDL_AFTER=True,
            WINDOW=True)  # the store after the attention, with PDL, writing the exact window
ptrs = dict.fromkeys(("key_ptr", "value_ptr"), "*bf16") | {"cache_ptr": "*u8", "slot_ptr": "*i64"}
ptrs |= dict.fromkeys(("rot_ptr", "rot_lo_ptr", "k_bnd_ptr", "k_cent_ptr", "v_bnd_ptr", "v_cent_ptr"), "*fp32")
ptrs |= dict.fromkeys(("koff_ptr", "koff_rot_ptr"), "*fp32") | {"window_kv_ptr": "*bf16", "window_tag_ptr": "*i32"}
build(store._store_kv_kernel, ptrs, meta, pdl_option(True))
# a prefill-sized store: two tf32 dots on R's parts, binary-search indices, keys relative to an offset
meta |= dict(BLOCK_T=16, DOT_PRECISION="tf32_split", BUCKET_SEARCH=True, HAS_KEY_OFFSET=True, PDL_AFTER=False,
             WINDOW=False)
build(store._store_kv_kernel, ptrs, meta, pdl_option(False))
ptrs = dict.fromkeys(("k_ptr", "v_ptr", "kv_ptr"), "*bf16") | {"rot_ptr": "*fp32", "tag_ptr": "*i32"}
ptrs |= dict.fromkeys(("block_table_ptr", "seq_lens_ptr", "qsl_ptr"), "*i32")
meta = dict(SINKS=4, HEAD_DIM=128, BLOCK_D=128, ROT_CHUNK=sinks.WRITER_ROT_CHUNK, SCAN=sinks.SCAN, PDL=True)
build(sinks._write_sinks_kernel, ptrs, meta, pdl_option(True) | {"num_warps": 4})
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """bf16 decode (with a key offset and the fused store; fused, and split with the tail merge, programmatic
    dependent launch and exact sinks), the split reduce, the query rotation, the store launched after the attention
    (writing the exact window) and the sink writer lower to sm_90 cubins on the host, GPU or not.

    The interpreter never exercises GPU lowering (nor the bf16 new-token dots, which run on GPUs
    only), so compile in a fresh process without TRITON_INTERPRET.
    """
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
