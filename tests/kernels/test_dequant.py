"""dequantize_kv against dequantize_ref: rotated and original basis, dtypes, out buffers, int64 addressing."""

import pytest
import torch

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import dequant as dequant_module
from turboquant_vllm.kernels.dequant import dequantize_kv
from turboquant_vllm.kernels.reference import dequantize_ref, gather_rows_ref, scatter_rows_ref, store_ref
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.key_offset import KeyOffset


def filled_cache(config: TQConfig, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int, seed=0):
    """A reference-written cache (CPU) with every slot holding a token; token 0 is a zero vector."""
    ref = KVCodec(config, num_kv_heads, head_dim)
    g = torch.Generator().manual_seed(seed)
    n = num_blocks * block_size
    key = torch.randn(n, num_kv_heads, head_dim, generator=g) * torch.rand(n, num_kv_heads, 1, generator=g) * 4
    value = torch.randn(n, num_kv_heads, head_dim, generator=g)
    key[0] = 0
    cache = ref.new_cache(num_blocks, block_size)
    store_ref(ref, key, value, cache, torch.arange(n))
    return ref, cache


def random_slots(num: int, total: int, seed: int = 1) -> torch.Tensor:
    slots = torch.randint(0, total, (num,), generator=torch.Generator().manual_seed(seed))
    slots[0] = 0
    return slots


CASES = [  # k_bits, v_bits, head_dim, num_kv_heads
    (4, 4, 128, 2),
    (4, 3, 96, 1),
    (3, 2, 64, 8),
    (2, 4, 64, 2),
]


@pytest.mark.parametrize("rotated", [True, False], ids=["rotated", "original"])
@pytest.mark.parametrize(("k_bits", "v_bits", "head_dim", "num_kv_heads"), CASES)
def test_dequant_matches_reference(device, k_bits, v_bits, head_dim, num_kv_heads, rotated):
    config = TQConfig(k_bits=k_bits, v_bits=v_bits)
    ref, cache = filled_cache(config, num_kv_heads, head_dim, 4, 8)
    slots = random_slots(21, cache.shape[0] * cache.shape[1])
    codec = KVCodec(config, num_kv_heads, head_dim, device)
    k, v = dequantize_kv(codec, cache.to(device), slots.to(device), torch.float32, rotated=rotated)
    want_k, want_v = dequantize_ref(ref, cache, slots, rotated=rotated)
    assert k.shape == v.shape == (21, num_kv_heads, head_dim) and k.dtype == torch.float32
    tol = {"rtol": 0, "atol": 0} if rotated else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(k.cpu(), want_k, **tol)
    torch.testing.assert_close(v.cpu(), want_v, **tol)
    assert not k[0].any()


@pytest.mark.parametrize(("k_bits", "head_dim", "block_size"), [(4, 128, 8), (3, 64, 16)])
def test_dequant_reads_coordinate_major_values(device, k_bits, head_dim, block_size):
    """TQConfig.fp8_values pages (layout.py: V indices coordinate by coordinate) give the reference's K and V."""
    config = TQConfig(k_bits=k_bits, fp8_values=True)
    ref, cache = filled_cache(config, 2, head_dim, 3, block_size, seed=4)
    slots = random_slots(23, cache.shape[0] * cache.shape[1], seed=5)
    codec = KVCodec(config, 2, head_dim, device)
    k, v = dequantize_kv(codec, cache.to(device), slots.to(device), torch.float32, rotated=True)
    want_k, want_v = dequantize_ref(ref, cache, slots, rotated=True)
    torch.testing.assert_close(k.cpu(), want_k, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu(), want_v, rtol=0, atol=0)
    plain_ref = KVCodec(TQConfig(k_bits=k_bits, fp8_values=False), 2, head_dim)  # token-major reads: other values
    assert not torch.equal(dequantize_ref(plain_ref, cache, slots)[1], want_v)


@pytest.mark.parametrize("rotated", [True, False], ids=["rotated", "original"])
def test_dequant_adds_the_key_offset_back(device, rotated):
    config, num_kv_heads, head_dim = TQConfig(k_bits=4, v_bits=3), 2, 64
    ref = KVCodec(config, num_kv_heads, head_dim)
    g = torch.Generator().manual_seed(6)
    offset = torch.randn(num_kv_heads, head_dim, generator=g) * 2
    key = torch.randn(24, num_kv_heads, head_dim, generator=g) + offset
    key[0] = -offset  # stored as is: the offset would lengthen it
    value = torch.randn(24, num_kv_heads, head_dim, generator=g)
    cache = ref.new_cache(3, 8)
    store_ref(ref, key, value, cache, torch.arange(24), offset)
    slots = random_slots(19, 24, seed=7)
    codec = KVCodec(config, num_kv_heads, head_dim, device)
    k, v = dequantize_kv(codec, cache.to(device), slots.to(device), torch.float32, rotated,
                         key_offset=KeyOffset.build(offset, codec.rotation))  # fmt: skip
    want_k, want_v = dequantize_ref(ref, cache, slots, rotated, offset)
    torch.testing.assert_close(k.cpu(), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.cpu(), want_v, rtol=1e-5, atol=1e-5)
    exact = key[slots] if not rotated else key[slots] @ ref.rotation.T
    assert ((k.cpu() - exact).norm() / exact.norm()) < 0.2  # the offset really is added back


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotated", [True, False], ids=["rotated", "original"])
def test_dequant_half_outputs(device, out_dtype, rotated):
    config = TQConfig(k_bits=3, v_bits=3, rotation="hadamard")
    ref, cache = filled_cache(config, 2, 64, 2, 8, seed=2)
    slots = random_slots(16, 16, seed=3).to(torch.int32)
    k, v = dequantize_kv(KVCodec(config, 2, 64, device), cache.to(device), slots.to(device), out_dtype, rotated)
    want_k, want_v = dequantize_ref(ref, cache, slots, rotated=rotated)
    assert k.dtype == v.dtype == out_dtype
    # Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): allow one bf16 ulp there.
    exact = device.type == "cuda" or out_dtype == torch.float16
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 2**-7, "atol": 0}
    if not rotated:  # one GEMM in out_dtype (fp32 accumulation): a few 16-bit roundings of each row's length
        for got, want in ((k, want_k), (v, want_v)):
            err = (got.cpu().float() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
            assert err.max() < 2 * torch.finfo(out_dtype).eps, (out_dtype, err.max().item())
        return
    torch.testing.assert_close(k.cpu(), want_k.to(out_dtype), **tol)
    torch.testing.assert_close(v.cpu(), want_v.to(out_dtype), **tol)


def test_dequant_into_preallocated_strided_outputs(device):
    config = TQConfig(k_bits=4, v_bits=2)
    ref, cache = filled_cache(config, 2, 64, 2, 8, seed=4)
    slots = torch.tensor([3, -1, 15, 3, 0])
    codec = KVCodec(config, 2, 64, device)
    buf = torch.full((5, 5, 64), 7.0, device=device)  # k and v as strided views of one buffer
    out_k, out_v = buf[:, 1:3], buf[:, 3:5]
    k, v = dequantize_kv(codec, cache.to(device), slots.to(device), rotated=False, out_k=out_k, out_v=out_v)
    assert k.data_ptr() == out_k.data_ptr() and v.data_ptr() == out_v.data_ptr()
    live = slots >= 0
    want_k, want_v = dequantize_ref(ref, cache, slots[live], rotated=False)
    torch.testing.assert_close(k.cpu()[live], want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.cpu()[live], want_v, rtol=1e-5, atol=1e-5)
    assert not k[1].any() and not v[1].any(), "negative slots read as zeros"
    assert (buf[:, 0] == 7).all(), "wrote outside out_k/out_v"
    empty_k, empty_v = dequantize_kv(codec, cache.to(device), slots[:0].to(device))
    assert empty_k.shape == (0, 2, 64) and empty_v.dtype == torch.bfloat16


def test_store_then_dequant_round_trip(device):
    """Kernel to kernel: reconstruction error matches the codebook's distortion, lengths are kept."""
    config = TQConfig(k_bits=4, v_bits=3)
    codec = KVCodec(config, 2, 128, device)
    key = torch.randn(32, 2, 128, device=device)
    value = torch.randn(32, 2, 128, device=device)
    cache = codec.new_cache(4, 8, device)
    store_kv(codec, key, value, cache, torch.arange(32, device=device))
    k, v = dequantize_kv(codec, cache, torch.arange(32, device=device), torch.float32, rotated=False)
    for x, y, bits in ((key, k, 4), (value, v, 3)):
        rel = ((x - y).square().sum(-1) / x.square().sum(-1)).mean().item()
        assert rel < {4: 0.015, 3: 0.05}[bits], rel
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=0)


def test_dequant_several_heads_per_program(device, monkeypatch):
    """The large-batch launch shape (all heads of a token tile in one program) on a small input."""
    monkeypatch.setattr(dequant_module, "_launch_params", lambda n, heads: (16, heads, 4))
    config = TQConfig(k_bits=2, v_bits=3)
    ref, cache = filled_cache(config, 4, 96, 2, 16, seed=9)
    slots = random_slots(20, 32, seed=10)
    for rotated in (True, False):
        k, v = dequantize_kv(KVCodec(config, 4, 96, device), cache.to(device), slots.to(device), torch.float32, rotated)
        want_k, want_v = dequantize_ref(ref, cache, slots, rotated=rotated)
        torch.testing.assert_close(k.cpu(), want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.cpu(), want_v, rtol=1e-5, atol=1e-5)


def test_dequant_rejects_bad_inputs(device):
    codec = KVCodec(TQConfig(), 2, 64, device)
    cache = codec.new_cache(2, 8, device)
    slots = torch.arange(4, device=device)
    with pytest.raises(AssertionError, match="cache must be contiguous"):
        dequantize_kv(codec, cache.transpose(0, 1), slots)
    with pytest.raises(AssertionError, match="slots must be"):
        dequantize_kv(codec, cache, slots.float())
    with pytest.raises(AssertionError, match="out_k must be"):
        dequantize_kv(codec, cache, slots, out_k=torch.empty(3, 2, 64, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("rotated", [True, False], ids=["rotated", "original"])
@pytest.mark.parametrize(("k_bits", "v_bits", "head_dim"), [(4, 4, 256), (3, 2, 128), (2, 3, 96)])
def test_dequant_gpu_many_slots(cuda, k_bits, v_bits, head_dim, rotated):
    config = TQConfig(k_bits=k_bits, v_bits=v_bits)
    ref, cache = filled_cache(config, 8, head_dim, 128, 16, seed=5)
    slots = random_slots(3000, 128 * 16, seed=6)
    k, v = dequantize_kv(KVCodec(config, 8, head_dim, cuda), cache.to(cuda), slots.to(cuda), torch.float32, rotated)
    want_k, want_v = dequantize_ref(ref, cache, slots, rotated=rotated)
    tol = {"rtol": 0, "atol": 0} if rotated else {"rtol": 1e-5, "atol": 2e-5}
    torch.testing.assert_close(k.cpu(), want_k, **tol)
    torch.testing.assert_close(v.cpu(), want_v, **tol)


@pytest.mark.gpu
def test_dequant_gpu_int64_addressing(cuda):
    """A cache over 2^31 bytes: rows past the int32 range decode from where they were written."""
    config = TQConfig(k_bits=3, v_bits=4)
    ref, small = filled_cache(config, 8, 128, 1, 8, seed=7)
    block_size = 16
    num_blocks = (2**31 // ref.layout.page_bytes(block_size)) + 64
    cache = torch.zeros(num_blocks, block_size, ref.layout.bytes_per_token, dtype=torch.uint8, device=cuda)
    total = num_blocks * block_size
    slots = torch.tensor([total - 1, 0, total - 8, total // 2 + 3, total - 100, total - 2, 1, total - 77])
    scatter_rows_ref(ref, cache, slots, gather_rows_ref(ref, small, torch.arange(8)))
    k, v = dequantize_kv(KVCodec(config, 8, 128, cuda), cache, slots.to(cuda), torch.float32)
    want_k, want_v = dequantize_ref(ref, small, torch.arange(8))
    torch.testing.assert_close(k.cpu(), want_k, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu(), want_v, rtol=0, atol=0)
