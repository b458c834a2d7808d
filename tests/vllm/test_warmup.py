"""The start-up warm-up reaches every launch shape the backend uses (interpreted on CPU, compiled on a GPU)."""

import pytest
import torch

from turboquant_vllm.codec import KVCodec
from turboquant_vllm.config import TQConfig
from turboquant_vllm.kernels import decode, decode_tiles, dequant, store
from turboquant_vllm.kernels.decode import AttentionWorkspace
from turboquant_vllm.vllm import warmup


@pytest.mark.parametrize("key_offset", [False, True])
def test_warm_up_runs_every_launch_shape(device, monkeypatch, key_offset):
    calls = {"store": [], "attention": [], "dequant": []}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name].append((args, kwargs))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(warmup, "store_kv", spy("store", store.store_kv))
    monkeypatch.setattr(warmup, "paged_attention", spy("attention", decode.paged_attention))
    monkeypatch.setattr(dequant, "_dequantize_rotated", spy("dequant", dequant._dequantize_rotated))
    codec = KVCodec(TQConfig(), 1, 64, device)
    workspace = AttentionWorkspace.allocate(4, 2, 64, decode_tiles.WIDE_MIN_SPLITS, device)
    warmup.warm_up_kernels(codec, 2, torch.float16, 16, key_offset, workspace)

    store_shapes = {store._launch_params(args[4].shape[0], 1) for args, _ in calls["store"]}
    assert len(store_shapes) == 3  # one token, four and sixteen tokens per program
    assert all((args[5] is not None) == key_offset for args, _ in calls["store"])
    tiles = {decode_tiles.attention_meta(codec, 2, torch.float16, True, 1, 16, kw["num_splits"] == 1,
                                    kw["num_splits"])["BLOCK_N"] for _, kw in calls["attention"]}  # fmt: skip
    assert {kw["num_splits"] for _, kw in calls["attention"]} == {1, 2, decode_tiles.WIDE_MIN_SPLITS}
    assert len(tiles) == (2 if decode_tiles.TILES[64].wide_block_n else 1)
    (args, _), *_ = calls["dequant"]  # the prefill path's launch: scratch in the model's dtype, un-rotated after
    assert args[4].dtype == torch.float16 and (args[3] is not None) == key_offset
