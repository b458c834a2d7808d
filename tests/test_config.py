"""TQConfig validation: bad settings fail at construction with a message naming the fix."""

import pytest

from turboquant_vllm.config import TQConfig, TQConfigError, check_head_dim


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
