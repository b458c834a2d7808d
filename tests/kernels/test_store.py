"""store_kv against store_ref: packed indices, scales, skipped slots, strided inputs, int64 addressing."""

import pytest
import torch

from turboquant_vllm import TQConfig
from turboquant_vllm.codec import KVCodec
from turboquant_vllm.kernels import store as store_module
from turboquant_vllm.kernels.reference import decode_rows_ref, gather_rows_ref, store_ref
from turboquant_vllm.kernels.store import store_kv
from turboquant_vllm.key_offset import KeyOffset, use_offset
from turboquant_vllm.quantizer import TINY_NORM, MSEQuantizer, QuantizedVectors

BOUNDARY_EPS = 1e-5  # kernel and torch round the rotation differently; only this close to a boundary may differ
MAX_FLIP_RATE = 1e-3


def fused_kv(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, seed: int = 0):
    """Key/value as strided views of one fused qkv tensor, the way vLLM passes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, 3 * num_kv_heads + 1, head_dim, generator=g).to(dtype).to(device)
    key = qkv[:, 1 : 1 + num_kv_heads]
    value = qkv[:, 1 + num_kv_heads : 1 + 2 * num_kv_heads]
    key[: min(2, num_tokens), 0] = 0  # zero vectors quantise to scale 0
    return key, value


def check_tensor(quantizer: MSEQuantizer, x: torch.Tensor, got, want) -> None:
    """Indices equal except rare flips right at a decision boundary; scales equal to fp32 rounding."""
    x32 = x.cpu().to(torch.float32)
    norms = torch.linalg.vector_norm(x32, dim=-1)
    rotated = quantizer.rotate(x32 / norms.clamp_min(TINY_NORM).unsqueeze(-1))
    dist = (rotated.unsqueeze(-1) - quantizer.boundaries.cpu()).abs().min(-1).values
    flips = got.indices != want.indices
    assert (dist[flips] < BOUNDARY_EPS).all(), f"index mismatch away from a boundary: {dist[flips].max()}"
    assert flips.sum() <= max(1, MAX_FLIP_RATE * flips.numel()), f"{flips.sum()} boundary flips"
    assert ((got.indices.long() - want.indices.long()).abs() <= 1).all()

    expected = want.scales.clone()
    flipped = flips.any(-1)
    if flipped.any():  # the scale follows the kernel's own indices
        cent = quantizer.centroids.cpu().double()[got.indices[flipped].long()]
        recon = torch.linalg.vector_norm(cent, dim=-1).clamp_min(TINY_NORM)
        if quantizer.config.norm_correction:
            expected[flipped] = (norms.double()[flipped] / recon).float()
    torch.testing.assert_close(got.scales, expected, rtol=1e-5, atol=0)
    zero = norms == 0
    assert (got.scales[zero] == 0).all()


def run_store(codec: KVCodec, key, value, slots, num_blocks: int, block_size: int):
    """Store with the kernel and the reference into identical random caches; check every row."""
    device = key.device
    ref = KVCodec(codec.config, codec.num_kv_heads, codec.head_dim)
    g = torch.Generator().manual_seed(1)
    before = torch.randint(0, 256, (num_blocks, block_size, codec.layout.bytes_per_token), generator=g)
    before = before.to(torch.uint8)
    cache = before.to(device)
    store_kv(codec, key, value, cache, slots)
    want = before.clone()
    n = slots.shape[0]
    store_ref(ref, key[:n].cpu(), value[:n].cpu(), want, slots.cpu())

    every = torch.arange(num_blocks * block_size)
    written = torch.zeros(every.shape[0], dtype=torch.bool)
    live = slots.cpu()[slots.cpu() >= 0].long()
    written[live] = True
    untouched = every[~written]
    got_untouched = gather_rows_ref(ref, cache.cpu(), untouched)
    assert torch.equal(got_untouched, gather_rows_ref(ref, before, untouched)), "untouched tokens changed"

    got, wanted = gather_rows_ref(ref, cache.cpu(), live), gather_rows_ref(ref, want, live)
    (gk, gv), (wk, wv) = decode_rows_ref(ref, got), decode_rows_ref(ref, wanted)
    token = torch.nonzero(slots.cpu() >= 0).squeeze(1)
    check_tensor(ref.key, key[token], gk, wk)
    check_tensor(ref.value, value[token], gv, wv)


CASES = [  # k_bits, v_bits, head_dim, num_kv_heads, dtype
    (4, 4, 128, 2, torch.bfloat16),
    (4, 3, 96, 1, torch.float16),
    (3, 2, 64, 8, torch.float32),
    (2, 4, 64, 2, torch.bfloat16),
    (3, 3, 96, 2, torch.float32),
]


@pytest.mark.parametrize(("k_bits", "v_bits", "head_dim", "num_kv_heads", "dtype"), CASES)
def test_store_matches_reference(device, k_bits, v_bits, head_dim, num_kv_heads, dtype):
    codec = KVCodec(TQConfig(k_bits=k_bits, v_bits=v_bits), num_kv_heads, head_dim, device)
    num_blocks, block_size, num_tokens = 4, 8, 19
    key, value = fused_kv(num_tokens, num_kv_heads, head_dim, dtype, device)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(2))[:num_tokens]
    slots[[3, 11]] = -1
    run_store(codec, key, value, slots.to(device), num_blocks, block_size)


@pytest.mark.parametrize(
    "config",
    [
        TQConfig(k_bits=3, v_bits=4, norm_correction=False),
        TQConfig(k_bits=2, v_bits=3, rotation="hadamard"),
        TQConfig(fp8_values=True),
        TQConfig(k_bits=3, v_bits=4, fp8_values=True),
    ],
    ids=["no-norm-correction", "hadamard", "coordinate-major-values", "coordinate-major-values-3-bit-keys"],
)
def test_store_config_variants(device, config):
    codec = KVCodec(config, 2, 64, device)
    key, value = fused_kv(12, 2, 64, torch.float16, device, seed=3)
    slots = torch.arange(12, dtype=torch.int32, device=device) * 2 - 3  # int32, leading negatives
    run_store(codec, key.contiguous(), value, slots, 3, 8)


def test_store_ignores_padding_rows_and_empty(device):
    codec = KVCodec(TQConfig(k_bits=4, v_bits=2), 1, 64, device)
    key, value = fused_kv(10, 1, 64, torch.bfloat16, device, seed=4)
    slots = torch.tensor([5, 0, 7, -1, 2, 9], device=device)  # CUDA-graph padding: key has 10 rows
    run_store(codec, key, value, slots, 2, 8)
    cache = codec.new_cache(2, 8, device)
    store_kv(codec, key[:0], value[:0], cache, slots[:0])
    assert not cache.any()


def test_store_rejects_bad_inputs(device):
    codec = KVCodec(TQConfig(), 2, 64, device)
    key, value = fused_kv(4, 2, 64, torch.float16, device)
    cache = codec.new_cache(1, 8, device)
    slots = torch.arange(4, device=device)
    strided = torch.zeros(4, 64, 2, dtype=key.dtype, device=device).transpose(1, 2)
    with pytest.raises(AssertionError, match="contiguous in head_dim"):
        store_kv(codec, strided, value, cache, slots)
    with pytest.raises(AssertionError, match="cache must be uint8"):
        store_kv(codec, key, value, cache[..., :-1], slots)
    with pytest.raises(AssertionError, match="fp16/bf16/fp32"):
        store_kv(codec, key.to(torch.float64), value, cache, slots)
    with pytest.raises(AssertionError, match="num_tokens"):
        store_kv(codec, key[:, :1], value, cache, slots)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("precision", "bucket_search", "dtype"),
    [("ieee", False, torch.bfloat16), ("tf32x3", False, torch.bfloat16), ("tf32_split", True, torch.bfloat16),
     ("tf32_split", False, torch.float16), ("tf32_split", True, torch.float32)],
)  # fmt: skip
@pytest.mark.parametrize(("k_bits", "v_bits", "head_dim"), [(4, 4, 256), (3, 2, 128), (2, 3, 96)])
def test_store_gpu_many_tokens(cuda, monkeypatch, k_bits, v_bits, head_dim, precision, bucket_search, dtype):
    """Prefill-sized launches with each dot precision: the tensor-core ones must move no more indices than fp32
    rounding does (fp32 inputs under "tf32_split" fall back to the fp32 dot)."""
    params = store_module._launch_params
    monkeypatch.setattr(
        store_module,
        "_launch_params",
        lambda n, h: params(n, h)._replace(precision=precision, bucket_search=bucket_search),
    )
    codec = KVCodec(TQConfig(k_bits=k_bits, v_bits=v_bits), 8, head_dim, cuda)
    num_tokens, num_blocks, block_size = 3000, 256, 16
    key, value = fused_kv(num_tokens, 8, head_dim, dtype, cuda, seed=5)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::97] = -1
    run_store(codec, key, value, slots.to(cuda), num_blocks, block_size)


@pytest.mark.gpu
def test_store_gpu_int64_addressing(cuda):
    """A cache over 2^31 bytes: rows past the int32 range must land where the reference puts them."""
    codec = KVCodec(TQConfig(k_bits=4, v_bits=3), 8, 128, cuda)
    block_size = 16
    num_blocks = (2**31 // codec.layout.page_bytes(block_size)) + 64
    cache = torch.zeros(num_blocks, block_size, codec.layout.bytes_per_token, dtype=torch.uint8, device=cuda)
    total = num_blocks * block_size
    slots = torch.tensor([0, total - 1, total - 2, -1, total // 2, total - block_size * 3 + 5], device=cuda)
    key, value = fused_kv(slots.shape[0], 8, 128, torch.float16, cuda, seed=6)
    store_kv(codec, key, value, cache, slots)
    live = slots[slots >= 0]
    ref = KVCodec(codec.config, 8, 128)
    rows = gather_rows_ref(ref, cache, live)
    want = ref.new_cache(1, 8)
    token = torch.nonzero(slots >= 0).squeeze(1).cpu()
    store_ref(ref, key[token].cpu(), value[token].cpu(), want, torch.arange(live.shape[0]))
    (gk, gv), (wk, wv) = decode_rows_ref(ref, rows), decode_rows_ref(ref, gather_rows_ref(ref, want, torch.arange(5)))
    check_tensor(ref.key, key[token], gk, wk)
    check_tensor(ref.value, value[token], gv, wv)
    assert int(cache.count_nonzero()) <= live.shape[0] * codec.layout.bytes_per_token
    assert int(cache.view(num_blocks, -1).count_nonzero(-1).gt(0).sum()) == 4  # the pages of the 5 live tokens


@pytest.mark.parametrize(
    "shape",
    [(1, 32, 1, False, "ieee"), (4, 8, 1, False, "ieee"), (16, 32, 1, False, "ieee"), (16, 32, 0, False, "ieee"),
     (1, 64, 1, True, "ieee"), (4, 8, 1, True, "ieee"), (32, 64, 1, False, "tf32x3"), (16, 32, 1, False, "tf32_split"),
     (32, 32, 1, False, "tf32_split")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("bucket_search", [False, True])
def test_store_launch_shapes(device, monkeypatch, shape, bucket_search):
    """Every (tokens, R columns, heads per program; 0 = all heads) launch shape on one small input, the broadcast
    rotation's two forms (CONTRACT_LAST; head_dim 96 leaves the last 64-column slice part empty), the dot's
    precisions (the interpreter computes any in fp32; the GPU tests check their flips) and both index searches."""
    block_t, block_k, heads, contract_last, precision = shape
    monkeypatch.setattr(store_module, "CONTRACT_LAST", contract_last)
    launch = store_module.StoreLaunch(block_t, block_k, heads, 4, precision, bucket_search)
    monkeypatch.setattr(store_module, "_launch_params", lambda n, h: launch._replace(heads=heads or h))
    codec = KVCodec(TQConfig(k_bits=3, v_bits=4), 4, 96, device)
    key, value = fused_kv(20, 4, 96, torch.bfloat16, device, seed=7)
    slots = torch.randperm(48, generator=torch.Generator().manual_seed(8))[:20]
    slots[4] = -1
    run_store(codec, key, value, slots.to(device), 3, 16)


def offset_keys(num_tokens: int, num_kv_heads: int, head_dim: int, seed: int):
    """Keys around a shared component, the first token pointing the other way, and their offset."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(num_kv_heads, head_dim, generator=g) * 2
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) + offset
    key[0] = -offset
    return key, offset


PREFILL_SPLIT = store_module.StoreLaunch(16, 32, 1, 4, "tf32_split", True)


@pytest.mark.parametrize(("k_bits", "dtype"), [(4, torch.bfloat16), (3, torch.float32)])
@pytest.mark.parametrize("launch", [None, PREFILL_SPLIT], ids=["default", "tf32_split"])
def test_store_with_key_offset_matches_reference(device, monkeypatch, k_bits, dtype, launch):
    """Keys stored relative to the offset; with "tf32_split" the offset's rotation is subtracted after the dot."""
    if launch is not None:
        monkeypatch.setattr(store_module, "_launch_params", lambda n, h: launch)
    num_kv_heads, head_dim, num_blocks, block_size = 2, 64, 3, 8
    codec = KVCodec(TQConfig(k_bits=k_bits, v_bits=2), num_kv_heads, head_dim, device)
    ref = KVCodec(codec.config, num_kv_heads, head_dim)
    key, offset = offset_keys(17, num_kv_heads, head_dim, seed=k_bits)
    key = key.to(dtype)
    value = torch.randn(17, num_kv_heads, head_dim, generator=torch.Generator().manual_seed(9)).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(5))[:17]
    cache = codec.new_cache(num_blocks, block_size)
    store_kv(codec, key.to(device), value.to(device), cache, slots.to(device), KeyOffset.build(offset, codec.rotation))
    want = ref.new_cache(num_blocks, block_size)
    store_ref(ref, key, value, want, slots, offset)

    rows = gather_rows_ref(ref, cache.cpu(), slots)
    (gk, gv), (wk, wv) = decode_rows_ref(ref, rows), decode_rows_ref(ref, gather_rows_ref(ref, want, slots))
    key32 = key.float()
    shifted = use_offset(key32, offset)
    assert not shifted[0].any() and shifted[1:].all()  # the opposite token keeps its own vector
    assert torch.equal(torch.signbit(gk.scales), shifted) and torch.equal(torch.signbit(wk.scales), shifted)
    stored = torch.where(shifted.unsqueeze(-1), key32 - offset, key32)
    check_tensor(ref.key, stored, *(QuantizedVectors(x.indices, x.scales.abs()) for x in (gk, wk)))
    check_tensor(ref.value, value, gv, wv)


@pytest.mark.parametrize(("k_bits", "v_bits"), [(4, 3), (2, 4)])
def test_store_bucket_search_writes_the_same_indices(device, monkeypatch, k_bits, v_bits):
    """Binary search over the boundaries finds exactly the linear scan's indices, at 2, 3 and 4 bits. The scales
    may differ in their last bit on a GPU: the two kernels' layouts differ, and with them the order in which the
    norm correction sums its squares."""
    codec = KVCodec(TQConfig(k_bits=k_bits, v_bits=v_bits), 2, 64, device)
    key, value = fused_kv(40, 2, 64, torch.bfloat16, device, seed=11)
    slots = torch.arange(40, device=device)
    caches = []
    for search in (False, True):
        monkeypatch.setattr(store_module, "_launch_params", lambda n, h, s=search: PREFILL_SPLIT._replace(
            precision="ieee", bucket_search=s))  # fmt: skip
        caches.append(codec.new_cache(5, 8))
        store_kv(codec, key, value, caches[-1], slots)
    rows = [gather_rows_ref(codec, c.cpu(), slots.cpu()) for c in caches]
    (k, v), (k_search, v_search) = (decode_rows_ref(codec, r) for r in rows)
    for scan, search in ((k, k_search), (v, v_search)):
        assert torch.equal(scan.indices, search.indices)
        torch.testing.assert_close(search.scales, scan.scales, rtol=1e-6, atol=0)
    assert k.indices.unique().numel() == 2**k_bits and v.indices.unique().numel() == 2**v_bits  # every index occurs


def run_slots(pages: list[int], start: int, count: int, block_size: int = 16) -> list[int]:
    """Slots of positions start .. start + count - 1 of a sequence whose block table is `pages`."""
    return [pages[p // block_size] * block_size + p % block_size for p in range(start, start + count)]


SLOT_PATTERNS = {  # 12 pages of 16 slots; each a batch as vLLM's slot_mapping would give it
    "aligned": run_slots([7, 2, 9], 0, 48),
    "offset": run_slots([4, 11, 0], 5, 43),
    "mixed": [21] + run_slots([3, 8], 3, 21) + [-1] + run_slots([10, 6], 0, 18) + [101, 150],
    "wrapped-group": [13, 14, 15, 8, 9, 10, 11, 12] + run_slots([5, 1], 2, 19),
    "random": torch.randperm(192, generator=torch.Generator().manual_seed(12))[:40].tolist(),
}


@pytest.mark.parametrize("block_t", [8, 16, 32])
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_store_merged_value_groups_match_reference(device, monkeypatch, pattern, block_t):
    """Coordinate-major values written a row of 8 tokens at a time (StoreLaunch.merge_value_groups): runs from a
    group boundary or not, two sequences and decode tokens in one program, skipped slots, a row that wraps within
    one group, scattered slots; every byte of the cache against the reference, untouched slots included."""
    launch = store_module.StoreLaunch(block_t, 32, 1, 4, merge_value_groups=True)
    monkeypatch.setattr(store_module, "_launch_params", lambda n, h: launch)
    codec = KVCodec(TQConfig(k_bits=3, fp8_values=True), 2, 64, device)
    slots = torch.tensor(SLOT_PATTERNS[pattern])
    key, value = fused_kv(slots.shape[0], 2, 64, torch.bfloat16, device, seed=13)
    run_store(codec, key, value, slots.to(device), 12, 16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's atomics")
@pytest.mark.parametrize(("start", "atomic_words"), [(0, 0), (16, 0), (5, 2), (3, 2)])
def test_store_merged_value_groups_use_atomics_only_at_program_edges(monkeypatch, start, atomic_words):
    """A 32-token run from a group boundary is written by plain stores alone; from inside a group, only the words
    it shares with the programs before and after it take atomics (an and and an or each), not every nibble."""
    from triton.runtime.interpreter import InterpreterBuilder

    lanes = []
    rmw = InterpreterBuilder.create_atomic_rmw

    def counting(self, op, ptr, val, mask, sem, scope):
        lanes.append(int(mask.data.sum()))
        return rmw(self, op, ptr, val, mask, sem, scope)

    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", counting)
    launch = store_module.StoreLaunch(32, 32, 1, 4, merge_value_groups=True)
    monkeypatch.setattr(store_module, "_launch_params", lambda n, h: launch)
    codec = KVCodec(TQConfig(fp8_values=True), 1, 64)
    slots = torch.tensor(run_slots([3, 1, 4], start, 32))
    key, value = fused_kv(32, 1, 64, torch.float16, "cpu", seed=14)
    run_store(codec, key, value, slots, 6, 16)
    assert sum(lanes) == atomic_words * 2 * 64  # per coordinate: a word, two atomics

    lanes.clear()
    monkeypatch.setattr(store_module, "_launch_params", lambda n, h: launch._replace(merge_value_groups=False))
    run_store(codec, key, value, slots, 6, 16)
    assert sum(lanes) == 32 * 2 * 64  # a nibble, two atomics


@pytest.mark.gpu
def test_store_gpu_prefill_chunks_into_coordinate_major_values(cuda):
    """Head_dim 128 at 4/4 bits keeps values coordinate-major: a prefill-sized batch of sequences starting at every
    offset into a page, with decode tokens between them, through the default (merging) launch."""
    codec = KVCodec(TQConfig(), 8, 128, cuda)
    assert codec.layout.v_coordinate_major
    pages = torch.randperm(400, generator=torch.Generator().manual_seed(15)).tolist()
    slots = []
    for start in range(16):  # sequence `start` takes 24 pages and begins `start` slots into its first one
        slots += run_slots(pages[24 * start : 24 * start + 24], start, 360) + [pages[384 + start] * 16 + start]
    key, value = fused_kv(len(slots), 8, 128, torch.bfloat16, cuda, seed=16)
    run_store(codec, key, value, torch.tensor(slots, device=cuda), 400, 16)
