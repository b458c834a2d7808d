"""TQConfig validation: bad settings fail at construction with a message naming the fix."""

import pytest

from turboquant_vllm.config import TQConfig, TQConfigError, check_head_dim
from turboquant_vllm.layout import PageLayout


def test_defaults_are_4_4_haar_with_norm_correction():
    cfg = TQConfig()
    assert (cfg.k_bits, cfg.v_bits, cfg.rotation, cfg.norm_correction) == (4, 4, "haar", True)


@pytest.mark.parametrize("bits", [0, 1, 5, 8, 16, 3.0, "4", True])
def test_rejects_unsupported_bits(bits):
    with pytest.raises(TQConfigError, match=r"k_bits=.*\(2, 3, 4\)"):
        TQConfig(k_bits=bits)
    with pytest.raises(TQConfigError, match="v_bits"):
        TQConfig(v_bits=bits)


@pytest.mark.parametrize("head_dim", [0, 16, 31, 60, 100, 513, 1024])
def test_rejects_unsupported_head_dim(head_dim):
    with pytest.raises(TQConfigError, match=f"head_dim={head_dim}"):
        check_head_dim(head_dim)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256, 512])
def test_accepts_common_head_dims(head_dim):
    TQConfig().check_head_dim(head_dim)


def test_hadamard_needs_power_of_two():
    TQConfig(rotation="hadamard").check_head_dim(128)
    with pytest.raises(TQConfigError, match="power-of-two"):
        TQConfig(rotation="hadamard").check_head_dim(96)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = TQConfig(k_bits=4, v_bits=3, norm_correction=False)
    assert TQConfig.from_dict(cfg.to_dict()) == cfg
    assert TQConfig.from_dict(None) == TQConfig()
    with pytest.raises(TQConfigError, match="unknown TurboQuant option"):
        TQConfig.from_dict({"kbits": 4})


def test_rejects_bad_rotation_and_seed():
    with pytest.raises(TQConfigError, match="rotation"):
        TQConfig(rotation="qr")
    with pytest.raises(TQConfigError, match="seed"):
        TQConfig(seed=-1)
    with pytest.raises(TQConfigError, match="fp8_key_scores must be a bool"):
        TQConfig.from_dict({"fp8_key_scores": "no"})
    assert TQConfig().fp8_key_scores is None  # automatic: attention_meta decides per launch
    assert [TQConfig.from_dict({"fp8_key_scores": c}).fp8_key_scores for c in (True, False)] == [True, False]


def test_key_offsets_file_is_checked_at_construction(tmp_path):
    import torch

    from turboquant_vllm.key_offset import layer_key_offset, save_key_offsets

    with pytest.raises(TQConfigError, match="cannot read key offsets"):
        TQConfig(key_offsets=str(tmp_path / "missing.pt"))
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(TQConfigError, match="not a key-offset file"):
        TQConfig.from_dict({"key_offsets": str(tmp_path / "bad.pt")})
    with pytest.raises(TQConfigError, match="file path"):
        TQConfig(key_offsets=3)
    good = tmp_path / "good.pt"
    offsets = torch.randn(2, 3, 64)
    save_key_offsets(good, offsets, model="tiny")
    cfg = TQConfig.from_dict({"key_offsets": str(good)})
    assert torch.equal(layer_key_offset(cfg.key_offsets, "model.layers.1.self_attn.attn", 3, 64), offsets[1])
    with pytest.raises(TQConfigError, match="calibrate for this model"):
        layer_key_offset(cfg.key_offsets, "model.layers.2.self_attn.attn", 3, 64)
    with pytest.raises(TQConfigError, match="calibrate for this model"):
        layer_key_offset(cfg.key_offsets, "model.layers.0.self_attn.attn", 2, 64)
    with pytest.raises(TQConfigError, match="layer index"):
        layer_key_offset(cfg.key_offsets, "encoder.attn", 3, 64)


@pytest.mark.parametrize(("field", "limit"), [("sink_tokens", 16), ("recent_tokens", 64)])
def test_exact_token_counts_are_checked(field, limit):
    assert getattr(TQConfig(**{field: limit}), field) == limit
    for bad in (-1, limit + 1):
        with pytest.raises(TQConfigError, match=f"{field}={bad} is out of range"):
            TQConfig(**{field: bad})
    for bad in (True, 4.0, "32"):
        with pytest.raises(TQConfigError, match=f"{field} must be an int"):
            TQConfig(**{field: bad})


def test_fp8_values_is_automatic_at_head_dim_128_without_quality_options():
    """fp8_values=None puts V coordinate-major (the fp8 P.V product) only where it was timed and measured: 4-bit
    values at head_dim 128 with none of the options whose quality figures used fp16 value products."""
    auto = TQConfig()
    assert auto.fp8_values is None and auto.values_coordinate_major(128)
    assert not any(auto.values_coordinate_major(d) for d in (64, 96, 256))
    for off in (TQConfig(v_bits=3), TQConfig(sink_tokens=4), TQConfig(recent_tokens=32), TQConfig(fp8_values=False)):
        assert not off.values_coordinate_major(128), off
    assert all(TQConfig(fp8_values=True, sink_tokens=4).values_coordinate_major(d) for d in (64, 128, 256))
    assert PageLayout.from_config(TQConfig(), 8, 128).v_coordinate_major
    assert not PageLayout.from_config(TQConfig(), 3, 64).v_coordinate_major
    with pytest.raises(TQConfigError, match="fp8_values needs v_bits=4"):
        TQConfig(v_bits=3, fp8_values=True)
    with pytest.raises(TQConfigError, match="bool or None"):
        TQConfig.from_dict({"fp8_values": "yes"})
    assert TQConfig.from_dict(TQConfig(fp8_values=None).to_dict()) == TQConfig()
