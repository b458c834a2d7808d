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


def test_each_mode_leaves_its_log_and_a_timeout_keeps_its_tail(benchmark_script, tmp_path, monkeypatch):
    """A mode that runs out of time still says how far it got: its engine log is saved and its row keeps the tail."""
    import json

    from turboquant_vllm.eval import child, data

    quality = benchmark_script("bench_vllm_quality")

    def fake_child(cmd, timeout):
        mode = cmd[cmd.index("--child") + 1]
        if mode == "bf16_ref":
            row = {"mode": mode, "actual_logprobs": [-1.0, -2.0], "top1": [5, 7], "greedy": [""],
                   "kv_cache_size_tokens": 10}  # fmt: skip
            return child.ChildResult("RESULT " + json.dumps(row), "engine ready\n", False)
        return child.ChildResult("", "init engine took 190 s\n", True)

    monkeypatch.setattr(child, "run_child", fake_child)
    monkeypatch.setattr(data, "smollm2_hf_dir", lambda: tmp_path)
    out = tmp_path / "q.json"
    modes = "bf16_ref,native_turboquant_4bit_nc_decode"
    monkeypatch.setattr("sys.argv", ["bench_vllm_quality.py", "--modes", modes, "--timeout", "7", "--out", str(out)])
    quality.main()
    summary = json.loads(out.read_text())["summary"]
    assert summary[0]["top1_agreement_vs_bf16"] == 1.0
    log = "q_native_turboquant_4bit_nc_decode.log"
    assert summary[1] == {"mode": "native_turboquant_4bit_nc_decode", "error": "timeout after 7s", "log": log,
                          "log_tail": "init engine took 190 s\n"}  # fmt: skip
    assert (tmp_path / "q_bf16_ref.log").read_text().endswith("engine ready\n")
    assert (tmp_path / log).read_text() == "init engine took 190 s\n"
