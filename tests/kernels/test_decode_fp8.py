"""paged_attention's fp8 products (Tiles.fp8_keys, TQConfig.fp8_values) against paged_attention_ref rounding the
same way: the key scores against e4m3 queries, the values against e4m3 probabilities, and where each applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decode_batch import TOL_FP32, TOL_HALF, assert_matches, make_batch, store_around_offset
from test_recent import recent_for
from test_sinks import sinks_for

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import decode_tiles, reference
from turboquant_vllm.key_offset import KeyOffset

FP8_QUERY_FORMS = {"halves_by_two_mmas": (True, None), "halves_in_rows": (True, 1), "rounded": (False, None)}


@pytest.mark.parametrize("form", list(FP8_QUERY_FORMS))
@pytest.mark.parametrize("head_dim", [128, 64], ids=["swapped_fragments", "unswapped"])
def test_fp8_keys(device, monkeypatch, head_dim, form):
    """Tiles.fp8_keys: keys from the e4m3-rounded codebook scored by an fp8 MMA against e4m3 queries (two halves,
    in the tile's padding rows or by a second MMA, or rounded once), at 1, 3 and 32 (wide) splits, in d=128's swapped
    fragment-ordered tiles and d=64's plain ones, against the reference that rounds the same way. The other rounding
    of the queries, and the unrounded reference, are both farther from the output than the tolerance, so this checks
    which path ran."""
    halves, in_rows_from = FP8_QUERY_FORMS[form]
    tiles = dataclasses.replace(decode_tiles.TILES[head_dim], fp8_keys=True, fp8_query_halves=halves,
                                fp8_halves_in_rows_min_splits=in_rows_from)  # fmt: skip
    monkeypatch.setitem(decode_tiles.TILES, head_dim, tiles)
    b = make_batch(device, [5, 300, 133, 700], [1, 1, 1, 1], num_heads=8, head_dim=head_dim, dtype=torch.bfloat16,
                   seed=41)  # fmt: skip
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float16, device.type == "cuda", 1, 16, False, 3)
    assert meta["FP8_KEYS"] and meta["FP8_SCALE"] == b.codec.key_e4m3_scale
    assert (meta["FP8_QUERY_HALVES"], meta["FP8_HALVES_IN_ROWS"]) == (halves, in_rows_from is not None)
    want, other = (b.expected(fp8_keys=True, fp8_query_halves=h) for h in (halves, not halves))
    assert torch.equal(b.expected(), want)  # the batch's reference follows the tiles
    tol = TOL_HALF / 2
    for num_splits in (1, 3, decode_tiles.WIDE_MIN_SPLITS):
        got = b.run(num_splits=num_splits)
        assert_matches(got, want, tol)
    for ref in (other, b.expected(fp8_keys=False)):
        err = ((got.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err > tol, f"the output matched another rounding's reference to {err:.3g}: which path ran?"


def test_fp8_reference_rotates_queries_as_a_gpu_does():
    """A GPU's tf32 product reads fp32 as 10 mantissa bits, truncated. Rounding the rotated queries once to e4m3
    turns that into whole e4m3 steps: at d=64 the reference moves by more than test_fp8_keys' tolerance (the H200's
    1.9% from the fp32-rotation reference), while the two halves' reference stays within it."""
    x = torch.tensor([1 + 2**-10 + 2**-11, -(1 + 2**-9 + 2**-12), 3.0])
    assert torch.equal(reference.tf32_truncated(x), torch.tensor([1 + 2**-10, -(1 + 2**-9), 3.0]))
    b = make_batch(torch.device("cpu"), [5, 300, 133, 700], [1, 1, 1, 1], num_heads=8, head_dim=64,
                   dtype=torch.bfloat16, seed=41)  # fmt: skip
    for halves, moved in ((False, True), (True, False)):
        fp32, tf32 = (b.expected(fp8_keys=True, fp8_query_halves=halves, tf32_query_rotation=t) for t in (False, True))
        err = ((tf32 - fp32).abs().max() / fp32.abs().max()).item()
        assert (err > TOL_HALF / 2) == moved, f"queries {'in halves' if halves else 'rounded once'}: {err:.3g}"


@pytest.mark.parametrize(
    ("num_heads", "q_lens", "in_rows"),
    [(8, [2, 1, 2, 2], True), (16, [1, 1, 1, 1], True), (8, [3, 1, 2, 3], False), (32, [1, 1, 1, 1], False)],
    ids=["group4_2_tokens", "group8", "group4_3_tokens", "group16"],
)
def test_fp8_halves_in_rows_only_where_the_rows_fit(device, monkeypatch, num_heads, q_lens, in_rows):
    """The query halves share one MMA only while group x max_query_len fills at most half of the decode tile's 16
    rows (the remainders take the other half); at exactly half and past it (a second MMA then) the output matches
    the halves' reference, with several query tokens per sequence (speculative decoding's shape)."""
    tiles = dataclasses.replace(decode_tiles.TILES[128], fp8_keys=True, fp8_halves_in_rows_min_splits=1)
    monkeypatch.setitem(decode_tiles.TILES, 128, tiles)
    b = make_batch(device, [40, 300, 133, 90], q_lens, num_heads=num_heads, head_dim=128, dtype=torch.bfloat16,
                   seed=43)  # fmt: skip
    meta = decode_tiles.attention_meta(b.codec, num_heads, torch.bfloat16, device.type == "cuda", max(q_lens), 16,
                                       False, 3)  # fmt: skip
    assert meta["FP8_QUERY_HALVES"] and meta["FP8_HALVES_IN_ROWS"] == in_rows
    want = b.expected()
    for num_splits in (1, 3):
        assert_matches(b.run(num_splits=num_splits), want, TOL_HALF / 2)


def test_fp8_halves_in_rows_from_the_wide_launches(monkeypatch):
    """With fp8 keys at head_dim 128 the halves share one MMA in wide launches (one sequence), where the H200 timed it
    faster, and take two in capped ones (where it was slower), and never in a prefill tile."""
    codec = KVCodec(TQConfig(), 8, 128)
    monkeypatch.setitem(decode_tiles.TILES, 128, dataclasses.replace(decode_tiles.TILES[128], fp8_keys=True))
    in_rows = {(splits, q_len): decode_tiles.attention_meta(codec, 32, torch.bfloat16, True, q_len, 16, False,
                                                            splits)["FP8_HALVES_IN_ROWS"]
               for splits in (3, decode_tiles.WIDE_MIN_SPLITS) for q_len in (1, 2, 3, 64)}  # fmt: skip
    assert [key for key, yes in in_rows.items() if yes] == [(decode_tiles.WIDE_MIN_SPLITS, 1),
                                                           (decode_tiles.WIDE_MIN_SPLITS, 2)]  # fmt: skip


@pytest.mark.parametrize("head_dim", [128, 64], ids=["swapped_fragments", "unswapped"])
def test_fp8_values(device, head_dim):
    """TQConfig.fp8_values: coordinate-major value pages read as e4m3 bytes for an fp8 P.V MMA, the probabilities
    times the value norms rounded to e4m3, at 1, 3 and 32 (wide) splits, in d=128's swapped fragment-ordered tiles
    (P's rows reordered to V^T's relabelled columns) and d=64's plain ones, against the reference over the same
    e4m3-rounded value codebook. The probabilities' rounding is not modelled: each keeps 3 mantissa bits, which here
    moves the output by up to ~2% of its largest value, so the tolerance is twice the 16-bit one; a misplaced token
    or coordinate moves it by O(1)."""
    b = make_batch(device, [5, 300, 133, 700], [1, 1, 1, 1], num_heads=8, head_dim=head_dim, dtype=torch.bfloat16,
                   seed=43, fp8_values=True)  # fmt: skip
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float16, device.type == "cuda", 1, 16, False, 3)
    assert meta["FP8_VALUES"] and meta["V_COORD"] and not meta["V_FRAGMENT"]
    assert meta["FP8_V_SCALE"] == b.codec.value_e4m3_scale
    want = b.expected()
    assert not torch.equal(want, b.expected(fp8_values=False))
    for num_splits in (1, 3, decode_tiles.WIDE_MIN_SPLITS):
        assert_matches(b.run(num_splits=num_splits), want, 2 * TOL_HALF)


@pytest.mark.parametrize("q_lens", [[2, 4, 1], [3, 1, 40]], ids=["spec_decode", "prefill_chunks"])
def test_fp8_values_multi_token_queries(device, q_lens):
    """Speculative-decoding queries (several rows a sequence in the swapped decode tile) and short prefill chunks
    (the varlen tile, unswapped) take the same fp8 P.V product over TQConfig.fp8_values' pages, the default's at
    head_dim 128; tolerance as in test_fp8_values."""
    b = make_batch(device, [77, 200, 129], q_lens, num_heads=8, head_dim=128, dtype=torch.bfloat16, seed=45,
                   fp8_values=True)  # fmt: skip
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float16, device.type == "cuda", max(q_lens), 16, False, 3)
    assert meta["FP8_VALUES"] and meta["SWAP_AB"] == (max(q_lens) <= meta["BLOCK_Q"])
    want = b.expected()
    for num_splits in (1, 3):
        assert_matches(b.run(num_splits=num_splits), want, 2 * TOL_HALF)


def test_coordinate_major_values_gathered_where_an_fp8_dot_cannot_take_them(device):
    """An e4m3 dot needs 32 tokens on P.V's K side: head_dim 256's 16-token tiles gather coordinate-major values
    (TQConfig(fp8_values=True) there) for fp16 products, and match the reference as token-major pages do."""
    b = make_batch(device, [77, 200], [1, 1], num_heads=8, head_dim=256, dtype=torch.bfloat16, seed=46,
                   fp8_values=True)  # fmt: skip
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float16, device.type == "cuda", 1, 16, False, 3)
    assert meta["V_COORD"] and not meta["FP8_VALUES"] and meta["BLOCK_N"] < decode_tiles.FP8_DOT_MIN_K
    for num_splits in (1, 3):
        assert_matches(b.run(num_splits=num_splits), b.expected(), TOL_HALF)


@pytest.mark.parametrize(("head_dim", "q_lens"), [(128, [1, 1, 1]), (64, [1, 1, 1]), (128, [3, 1, 40])],
                         ids=["swapped", "unswapped", "prefill_chunks"])  # fmt: skip
def test_coordinate_major_values_in_fp32(device, head_dim, q_lens):
    """fp32 queries keep 32-bit products: coordinate-major values (TQConfig.fp8_values' pages) are then gathered,
    in the keys' token order, and match the fp32 reference as token-major pages do."""
    b = make_batch(device, [77, 200, 129], q_lens, num_heads=8, head_dim=head_dim, seed=44, fp8_values=True)
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float32, device.type == "cuda", max(q_lens), 16, False, 3)
    assert meta["V_COORD"] and not meta["FP8_VALUES"]
    for num_splits in (1, 3):
        assert_matches(b.run(num_splits=num_splits), b.expected(), TOL_FP32)


@pytest.mark.parametrize("beside", ["key_offset", "sinks", "recent", "sinks_and_recent"])
def test_fp8_keys_beside_offsets_and_exact_rows(device, monkeypatch, beside):
    """TQConfig.fp8_key_scores=True keeps fp8 key scores beside key offsets, exact sinks and the exact window: the
    packed context is scored in fp8 (its keys' offset share in fp32), the side tables' rows in 16 bits. By default
    (None) those launches score in fp16, whose reference is many times farther from this output."""
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(decode_tiles.TILES[64], fp8_keys=True))
    b = make_batch(device, [7, 40, 133, 300], [1, 1, 2, 1], num_heads=8, head_dim=64, dtype=torch.float16, seed=47,
                   fp8_key_scores=True)  # fmt: skip
    run, ref = {}, {}
    if beside == "key_offset":
        g = torch.Generator().manual_seed(48)
        offset = torch.randn(2, 64, generator=g) * 1.5
        store_around_offset(b, offset, g)
        run["key_offset"], ref["key_offset"] = KeyOffset.build(offset.to(device), b.codec.rotation), offset
    if "sinks" in beside:
        run["sinks"], ref["exact_first"] = sinks_for(b, device, seed=49)
    if "recent" in beside:
        run["recent"], ref["exact_last"] = recent_for(b, device, sinks=4 if "sinks" in beside else 0, seed=50)
    flags = dict(key_offset="key_offset" in run, sinks=4 * ("sinks" in run), recent=24 * ("recent" in run))
    for choice, fp8 in ((True, True), (None, False), (False, False)):
        codec = KVCodec(TQConfig(fp8_key_scores=choice), 2, 64)
        meta = decode_tiles.attention_meta(codec, 8, torch.float16, device.type == "cuda", 2, 16, False, 3, **flags)
        assert meta["FP8_KEYS"] == fp8, choice
    meta = decode_tiles.attention_meta(b.codec, 8, torch.float16, device.type == "cuda", 2, 16, False, 3, **flags)
    want = b.expected(fp8_keys=True, fp8_query_halves=meta["FP8_QUERY_HALVES"], **ref)
    assert torch.equal(b.expected(**ref), want)  # the batch's reference follows the launch beside them too
    fp16 = b.expected(fp8_keys=False, **ref)
    tol = TOL_HALF / 4  # fp16 inputs: the fp16 scores' reference sits 0.008-0.028 away, this one under 0.001
    for num_splits in (1, 3):
        got = b.run(num_splits=num_splits, **run)
        assert_matches(got, want, tol)
    err, err16 = (((got.float().cpu() - r).abs().max() / r.abs().max()).item() for r in (want, fp16))
    assert err16 > 5 * err, f"the output is {err16:.3g} from the fp16 scores' reference, {err:.3g} from fp8's"
