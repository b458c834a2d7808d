"""probe_gemm_neighbours.py on the CPU: its launches split into the GEMM's per replay and the neighbours' means."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def probe(benchmark_script):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its sibling imports
        return benchmark_script("probe_gemm_neighbours")


def test_split_launches_keeps_each_replays_gemms_in_order(probe):
    spans = []
    t = 0.0
    for replay in range(3):
        for layer in range(2):
            for name, us in (("attn", 4.0), ("gemm", 50.0 + 5.0 * layer + replay)):
                spans.append((name, t, t + us))
                t += us + 1.0
    rows, others = probe.split_launches(spans, {"gemm"}, replays=3, layers=2)
    assert rows == [[50.0, 55.0], [51.0, 56.0], [52.0, 57.0]]
    assert others == {"attn": 4.0}


def test_neighbours_refuse_an_unknown_kind(probe):
    with pytest.raises(ValueError, match="neighbour must be one of"):
        probe.neighbour_kernels("nap", layers=1, target_us=1.0, context=16)
    assert probe.neighbour_kernels("none", layers=1, target_us=1.0, context=16) is None


def test_split_launches_takes_each_layers_last_gemm_when_o_proj_shares_its_kernel(probe):
    spans = []
    t = 0.0
    for replay in range(2):
        for layer in range(3):
            for name, us in (("attn", 4.0), ("gemm", 10.0), ("norm", 2.0), ("gemm", 50.0 + layer + 10 * replay)):
                spans.append((name, t, t + us))
                t += us + 1.0
    rows, others = probe.split_launches(spans, {"gemm"}, replays=2, layers=3)
    assert rows == [[50.0, 51.0, 52.0], [60.0, 61.0, 62.0]]
    assert others == {"attn": 4.0, "norm": 2.0, "earlier launches of gate/up's kernel": 10.0}


def test_split_launches_refuses_launches_that_do_not_fill_the_layers(probe):
    spans = [("gemm", float(i), i + 0.5) for i in range(5)]
    with pytest.raises(ValueError, match="do not split into 2 replays of 2 layers"):
        probe.split_launches(spans, {"gemm"}, replays=2, layers=2)


def test_whole_layer_runs_down_norm_and_qkv_ahead_of_the_attention(probe):
    """--whole-layer's launches between a layer's MLP and the next attention compute what the engine's do."""
    from types import SimpleNamespace

    import torch

    torch.manual_seed(0)
    hidden, inter, qkv = 8, 16, 12
    bufs = SimpleNamespace(down=[torch.randn(hidden, inter)], qkv=[torch.randn(qkv, hidden)], act=torch.randn(1, inter),
                           h=torch.empty(1, hidden), qkv_out=torch.empty(1, qkv), hidden=hidden)  # fmt: skip
    norm_weight = torch.rand(hidden) + 0.5
    probe.ahead_of_attention(bufs, 0, norm_weight)
    h = bufs.act @ bufs.down[0].T
    normed = h / h.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt() * norm_weight
    torch.testing.assert_close(bufs.h, h)
    torch.testing.assert_close(bufs.qkv_out, normed @ bufs.qkv[0].T)


@pytest.mark.parametrize("own", [False, True])
def test_layer_steps_share_one_set_of_pages_or_make_one_a_layer(probe, own):
    """--pages-per-layer: layer i runs the i-th step made; without it every layer runs the one step."""
    made, ran = [], []

    def make():
        k = len(made)
        made.append(k)
        return lambda: ran.append(k)

    step = probe.layer_steps(make, layers=3, own=own)
    for i in (0, 1, 2, 1):
        step(i)
    assert made == ([0, 1, 2] if own else [0])
    assert ran == ([0, 1, 2, 1] if own else [0, 0, 0, 0])
