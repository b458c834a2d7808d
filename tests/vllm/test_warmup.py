"""The start-up warm-up reaches every launch shape the backend uses (interpreted on CPU, compiled on a GPU)."""

import dataclasses

import pytest
import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig
from turboquant_vllm.kernels import decode, decode_tiles, dequant, store
from turboquant_vllm.kernels.workspace import AttentionWorkspace
from turboquant_vllm.vllm import warmup


@pytest.mark.parametrize(("key_offset", "fused_store", "pdl"), [(False, False, False), (True, True, False),
                                                          (False, False, True)])  # fmt: skip
def test_warm_up_runs_every_launch_shape(device, monkeypatch, key_offset, fused_store, pdl):
    calls = {"store": [], "attention": [], "dequant": []}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name].append((args, kwargs))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(warmup, "store_kv", spy("store", store.store_kv))
    monkeypatch.setattr(warmup, "paged_attention", spy("attention", decode.paged_attention))
    monkeypatch.setattr(dequant, "_dequantize_rotated", spy("dequant", dequant._dequantize_rotated))
    monkeypatch.setattr(warmup, "pdl_launch", lambda device: pdl)  # decode_step_stores hands every store over
    wide = decode_tiles.WIDE_MIN_SPLITS
    tiles = decode_tiles.TILES[64]
    monkeypatch.setitem(decode_tiles.TILES, 64, dataclasses.replace(tiles, fused_store_min_splits=wide if fused_store
                                                                    else None))  # fmt: skip
    codec = KVCodec(TQConfig(), 1, 64, device)
    workspace = AttentionWorkspace.allocate(4, 2, 64, wide, device)
    warmup.warm_up_kernels(codec, 2, torch.float16, 16, key_offset, workspace, max_blocks_per_seq=2064)

    store_shapes = {(store._launch_params(args[4].shape[0], 1), kw.get("after_attention", False))
                    for args, kw in calls["store"]}  # fmt: skip
    assert len(store_shapes) == 3 * (2 if pdl else 1)  # one, four and sixteen tokens a program; after attention
    assert all((args[5] is not None) == key_offset for args, _ in calls["store"])
    tiles = {decode_tiles.attention_meta(codec, 2, torch.float16, True, 1, 16, kw["num_splits"] == 1,
                                    kw["num_splits"])["BLOCK_N"] for _, kw in calls["attention"]}  # fmt: skip
    launches = {(kw["num_splits"], kw["store_slots"] is not None) for _, kw in calls["attention"]}
    handed = {(n, True) for n in (1, 2, wide) if pdl} | ({(wide, True)} if fused_store else set())
    assert launches == {(1, False), (2, False), (wide, False)} | handed
    assert all(args[5].shape == (1, 2064) for args, _ in calls["attention"])  # vLLM's block table row stride
    assert len(tiles) == (2 if decode_tiles.TILES[64].wide_block_n else 1)
    (args, _), *_ = calls["dequant"]  # the prefill path's launch: scratch in the model's dtype, un-rotated after
    assert args[4].dtype == torch.float16 and (args[3] is not None) == key_offset
