"""The decode sweep's variants (benchmarks/decode_variants.py) name real Tiles fields, launch keys, switches."""

import dataclasses

import pytest

from turboquant_vllm.kernels.decode_tiles import TILES


@pytest.fixture(scope="module")
def variants(benchmark_script):
    return benchmark_script("decode_variants")


def test_every_variant_builds_a_tile_config(variants):
    fields = {f.name for f in dataclasses.fields(TILES[128])}
    for change in variants.VARIANTS:
        tile_keys = set(change) - set(variants.LAUNCH_KEYS) - set(variants.SWITCHES)
        assert tile_keys <= fields, (change, tile_keys - fields)
        tiles = dataclasses.replace(TILES[128], **{k: change[k] for k in tile_keys})
        assert all(getattr(tiles, k) == change[k] for k in tile_keys)
        assert change.get("store", "separate") in ("separate", "fused"), change


def test_switches_name_module_attributes(variants):
    for module, attribute in variants.SWITCHES.values():
        assert isinstance(getattr(module, attribute), bool), (module.__name__, attribute)


def test_variants_are_distinct_and_start_with_the_defaults(variants):
    assert variants.VARIANTS[0] == {}
    keys = [tuple(sorted(change.items())) for change in variants.VARIANTS]
    assert len(keys) == len(set(keys))


def test_padded_variants_run_only_where_there_is_padding(variants):
    """Every variant runs at 16 sequences; at one sequence only those without `live` (nothing to pad)."""
    assert all(variants.applies(change, 16) for change in variants.VARIANTS)
    at_one = [change for change in variants.VARIANTS if variants.applies(change, 1)]
    assert at_one == [change for change in variants.VARIANTS if "live" not in change]
    assert len(at_one) < len(variants.VARIANTS)


def test_store_variants_set_the_launch_they_name(benchmark_script, monkeypatch):
    """bench_store_dequant's variants change exactly their StoreLaunch fields and leave the default restored."""
    from turboquant_vllm.kernels import store

    bench = benchmark_script("bench_store_dequant")
    args = bench.parse_args(["--num-kv-heads", "8"])
    seen = []
    monkeypatch.setattr(bench, "bench", lambda run, args: run() or 0.0)
    params, contract_last = store._launch_params, store.CONTRACT_LAST
    for num_tokens, variants in ((16, bench.SMALL_STORE_VARIANTS), (16384, bench.LARGE_STORE_VARIANTS)):
        seen.clear()
        rows = bench.store_variants(lambda n=num_tokens: seen.append((store._launch_params(n, 8), store.CONTRACT_LAST)),
                                    num_tokens, args)  # fmt: skip
        default = store._launch_params(num_tokens, 8)
        assert [r["ms"] for r in rows] == [0.0] * len(variants)
        for change, (launch, contract) in zip(variants, seen, strict=True):
            fields = {k: v for k, v in change.items() if k != "contract_last"}
            assert launch == default._replace(**fields), change
            assert contract == change.get("contract_last", contract_last), change
    assert store._launch_params is params
    assert store.CONTRACT_LAST is contract_last
