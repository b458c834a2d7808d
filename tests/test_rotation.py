"""Rotations: orthogonal, deterministic across processes, distinct per (seed, head_dim)."""

import subprocess
import sys

import pytest
import torch

from turboquant_vllm.config import TQConfig
from turboquant_vllm.rotation import haar_rotation, hadamard_matrix, randomized_hadamard, rotation_matrix, tf32_parts


@pytest.mark.parametrize("make", [haar_rotation, randomized_hadamard])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_orthogonal(make, d):
    r = make(7, d)
    torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_haar_supports_non_power_of_two():
    r = haar_rotation(1, 96)
    torch.testing.assert_close(r.T @ r, torch.eye(96, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hadamard_entries():
    h = hadamard_matrix(8) * 8**0.5
    assert set(h.flatten().tolist()) == {1.0, -1.0}
    with pytest.raises(ValueError):
        hadamard_matrix(96)


def test_seed_and_dim_change_the_matrix():
    a = rotation_matrix(TQConfig(seed=1), 64)
    assert not torch.equal(a, rotation_matrix(TQConfig(seed=2), 64))
    assert torch.equal(a, rotation_matrix(TQConfig(seed=1), 64))


def test_same_matrix_in_a_fresh_process():
    """vLLM workers and TP ranks rebuild R independently: it must not depend on process state."""
    code = (
        "import torch; torch.manual_seed(123); from turboquant_vllm.config import TQConfig;"
        "from turboquant_vllm.rotation import rotation_matrix;"
        "print(float(rotation_matrix(TQConfig(seed=5), 128).double().sum()),"
        " float(rotation_matrix(TQConfig(seed=5), 128)[3, 7]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = rotation_matrix(TQConfig(seed=5), 128)
    assert float(out[0]) == float(here.double().sum()) and float(out[1]) == float(here[3, 7])


def test_haar_coordinates_follow_the_sphere_law():
    """Rotating a fixed unit vector by many Haar draws gives coordinates with variance 1/d."""
    d = 64
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1
    coords = torch.stack([haar_rotation(s, d) @ e for s in range(400)])
    assert coords.var().item() == pytest.approx(1 / d, rel=0.1)


def test_tf32_parts_are_exact_in_tf32_and_sum_to_r():
    """The store's "tf32_split" operands: no bit below tf32's mantissa, hi + lo within 2^-21 of R."""
    r = rotation_matrix(TQConfig(), 128)
    hi, lo = tf32_parts(r)
    low_bits = (1 << 13) - 1
    assert not (hi.view(torch.int32) & low_bits).any() and not (lo.view(torch.int32) & low_bits).any()
    err = (hi.double() + lo.double() - r.double()).abs()
    assert (err <= r.double().abs() * 2.0**-21).all()
    assert ((hi.double() - r.double()).abs() > 0).any()  # the low part carries something
