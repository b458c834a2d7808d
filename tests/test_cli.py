"""The turboquant-vllm command line: argparse wiring, help, and the offline layout calculator."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from turboquant_vllm import cli


def test_subcommands_parse_with_defaults():
    parser = cli.build_parser()
    ev = parser.parse_args(["eval"])
    assert ev.command == "eval" and ev.tokens == 50000 and ev.context == [512, 2048, 8192]
    assert ev.bits == cli.DEFAULT_BITS and ev.norm_correction == "both" and ev.chunk == 256
    assert ev.needle_lengths == [1024, 2048, 4096, 8192] and ev.needle_depths[0] == 0.1 and len(ev.needle_depths) == 9
    assert ev.out == "benchmarks/results" and ev.device == "auto"
    demo = parser.parse_args(["demo", "--tokens", "513", "--context", "512", "--bits", "4/4", "--out", "/tmp/x"])
    assert (demo.tokens, demo.context, demo.bits, demo.out) == (513, 512, "4/4", "/tmp/x")


def test_eval_lists_and_flags():
    args = cli.build_parser().parse_args(
        ["eval", "--tokens", "2000", "--context", "512,1024", "--needle-depths", "0.5", "--no-needle",
         "--norm-correction", "on", "--center-keys", "both", "--dtype", "bfloat16"]
    )  # fmt: skip
    assert args.context == [512, 1024] and args.needle_depths == [0.5] and args.no_needle and not args.no_quality
    assert cli.ON_OFF[args.norm_correction] == (True,) and args.dtype == "bfloat16"
    assert cli.ON_OFF[args.center_keys] == (True, False)
    assert cli.build_parser().parse_args(["eval"]).center_keys == "off"  # the vLLM backend's format by default


def test_command_is_required_and_bad_choices_fail(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--norm-correction", "maybe"])


@pytest.mark.parametrize(
    "argv", [["--help"], ["demo", "--help"], ["eval", "--help"], ["plot", "--help"], ["layout", "--help"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: turboquant-vllm" in out


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "turboquant_vllm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "demo" in result.stdout and "eval" in result.stdout


def test_layout_prints_compression(capsys):
    assert cli.main(["layout", "--heads", "3", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "4/4" in out and "216" in out  # 3 heads x (32 + 4) B x (K, V) per token; bf16 is 768
    assert "3.56x" in out


class _Tokenizer:
    """Just enough tokenizer for the needle prompt: one id per word, ids wrap at the vocabulary size."""

    chat_template, eos_token_id, unk_token_id = None, 1, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + sum(map(ord, w)) % 60 for w in text.split(" ")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join("." if i % 7 == 0 else f"w{i}" for i in ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return 1


@pytest.fixture
def offline(monkeypatch, tiny_llama):
    """Swap the real model and Austen for a tiny random Llama and random ids."""
    import torch

    from turboquant_vllm.eval import data

    model = tiny_llama(num_key_value_heads=1, seed=0)
    monkeypatch.setattr(cli, "_load", lambda args, console: (model, _Tokenizer(), "tiny-llama"))
    ids = torch.randint(2, 64, (4096,), generator=torch.Generator().manual_seed(1)).tolist()
    monkeypatch.setattr(data, "austen_token_stream", lambda tokenizer, n, **kw: ids[:n])
    return SimpleNamespace(model=model, tokens=ids)


def _argv(command: str, options: dict[str, object]) -> list[str]:
    return [command, *(str(x) for pair in options.items() for x in pair)]


def test_eval_writes_json_and_png(offline, tmp_path):
    options = {"--tokens": 97, "--context": 48, "--chunk": 16, "--bits": "4/4", "--norm-correction": "on"}
    options |= {"--needle-lengths": 96, "--needle-depths": 0.5, "--out": tmp_path, "--name": "t", "--batch": 2}
    argv = _argv("eval", options)
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["quality"]["48"]["configs"]["k4v4+nc"]["tokens"] == 64
    memory = payload["kv_memory"]  # --memory-tokens 8192 is capped at the model's 256 positions
    assert memory["tokens"] == 256 and set(memory["configs"]) == {"k4v4"}
    assert memory["configs"]["k4v4"]["ratio"] == pytest.approx(2 * 64 * 4 / 72)  # fp32 K/V vs 32 + 4 B each
    assert memory["configs"]["k4v4"]["ratio_vs_bf16"] == pytest.approx(2 * 64 * 2 / 72)
    assert set(payload["needle"]) == {"baseline", "k4v4+nc"} and "needle_pass_rate" in payload
    assert payload["provenance"]["versions"]["torch"]
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "t_needle.png").stat().st_size > 0


def test_eval_needle_seed_draws_other_keys(offline, tmp_path):
    """--needle-seed asks the same placements with other pass keys (benchmarks/needle_agreement.py pools them)."""
    keys = []
    for seed in (0, 1):
        options = {"--needle-lengths": 96, "--needle-depths": 0.5, "--chunk": 16, "--bits": "4/4", "--memory-tokens": 0}
        options |= {"--norm-correction": "on", "--needle-seed": seed, "--out": tmp_path, "--name": f"s{seed}"}
        assert cli.main([*_argv("eval", options), "--no-quality"]) == 0
        payload = json.loads((tmp_path / f"s{seed}.json").read_text())
        assert payload["settings"]["needle_seed"] == seed
        keys.append(payload["needle"]["baseline"]["96"]["0.50"]["key"])
    assert keys[0] != keys[1]


def test_eval_checkpoints_survive_an_interrupted_run(offline, tmp_path, monkeypatch):
    from turboquant_vllm.eval import quality

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "needle_test", interrupted)
    options = {"--tokens": 97, "--context": "32,48", "--chunk": 16, "--bits": "2/2", "--memory-tokens": 64}
    assert cli.main(_argv("eval", {**options, "--out": tmp_path, "--name": "cut"})) == 130
    payload = json.loads((tmp_path / "cut.json").read_text())
    assert set(payload["quality"]) == {"32", "48"} and payload["kv_memory"]["tokens"] == 64
    assert "needle" not in payload and payload["seconds"] > 0


def test_eval_without_matplotlib_writes_json_and_plot_renders_it_later(offline, tmp_path, monkeypatch):
    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    options = {"--tokens": 65, "--context": 32, "--chunk": 16, "--bits": "3/3", "--memory-tokens": 48}
    options |= {"--needle-lengths": 96, "--needle-depths": "0.3,0.6", "--batch": 2}
    with monkeypatch.context() as patch:
        patch.setattr(cli, "_pyplot", no_matplotlib)
        assert cli.main(_argv("eval", {**options, "--out": tmp_path, "--name": "bare"})) == 0
    assert (tmp_path / "bare.json").exists() and not list(tmp_path.glob("*.png"))
    assert cli.main(["plot", str(tmp_path / "bare.json"), "--out", str(tmp_path / "png")]) == 0
    assert {p.name for p in (tmp_path / "png").iterdir()} == {"bare.png", "bare_needle.png"}


def test_demo_writes_json_and_png(offline, tmp_path):
    options = {"--capture-tokens": 32, "--tokens": 65, "--context": 32, "--chunk": 16, "--bits": "4/4"}
    argv = _argv("demo", {**options, "--out": tmp_path})
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert set(payload["kv_errors"]) == {"4", "3", "2"}
    assert payload["kv_errors"]["4"]["compression_vs_bf16"] == pytest.approx(128 / 36)
    assert payload["kv_errors"]["2"]["k_rel_mse"] > payload["kv_errors"]["4"]["k_rel_mse"]
    assert set(payload["quality"]["32"]["configs"]) == {"k4v4+nc", "k4v4+nc+kc", "k4v4+nc+R32+S4+kc"}
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_calibrate_writes_offsets_that_vllm_accepts(offline, tmp_path):
    import torch

    from turboquant_vllm.config import TQConfig
    from turboquant_vllm.eval.calibration import key_offsets
    from turboquant_vllm.eval.kv_capture import capture_qkv
    from turboquant_vllm.key_offset import KEY_OFFSET_SKIP

    out = tmp_path / "offsets.pt"
    assert cli.main(["calibrate", "--tokens", "40", "--skip", "8", "--out", str(out)]) == 0
    payload = torch.load(out, weights_only=True)
    offsets = payload["key_offset"]
    assert payload["tokens"] == 40 and payload["skip"] == 8 and offsets.dtype == torch.float32
    TQConfig(key_offsets=str(out))  # the file vLLM would be given passes the start-up check
    model, tokens = offline.model, offline.tokens[8:48]
    records = capture_qkv(model, torch.tensor([tokens]))
    want = torch.stack([r.key[0, :, KEY_OFFSET_SKIP:].mean(1) for r in records])  # [layers, kv_heads, d]
    torch.testing.assert_close(offsets, want)
    two_windows = key_offsets(model, tokens, window=20)  # the mean of each window's own mean
    halves = [capture_qkv(model, torch.tensor([tokens[i : i + 20]])) for i in (0, 20)]
    means = [torch.stack([r.key[0, :, KEY_OFFSET_SKIP:].mean(1) for r in h]) for h in halves]
    torch.testing.assert_close(two_windows, (means[0] + means[1]) / 2)
