"""bench_vllm_quality.py's modes are engine arguments vLLM knows, and Tiles fields where they change tiles."""

import dataclasses

from turboquant_vllm.kernels.decode_tiles import TILES


def test_modes_name_engine_arguments_and_tile_fields(benchmark_script):
    from vllm.engine.arg_utils import EngineArgs

    quality = benchmark_script("bench_vllm_quality")
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    tile_fields = {f.name for f in dataclasses.fields(TILES[128])}
    for name, kwargs in quality.MODES.items():
        assert set(kwargs) - {"tiles"} <= engine_fields, (name, set(kwargs) - {"tiles"} - engine_fields)
        assert set(kwargs.get("tiles", {})) <= tile_fields, name


def test_decode_modes_feed_one_token_a_step(benchmark_script):
    """Every chunk decode-sized (the paged kernel's), and a step fits the default 25 windows."""
    quality = benchmark_script("bench_vllm_quality")
    decode = {name: kw for name, kw in quality.MODES.items() if name.endswith("_decode")}
    assert decode
    for kwargs in decode.values():
        assert kwargs["long_prefill_token_threshold"] == 1
        assert kwargs["max_num_batched_tokens"] >= kwargs["max_num_seqs"] >= 25
