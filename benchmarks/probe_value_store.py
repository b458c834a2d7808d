"""What storing 4-bit value indices coordinate-major would cost the store, against today's token-major rows.

An fp8 P.V product wants a value word to hold 8 tokens of one coordinate (benchmarks/probe_warp_softmax.py's
cta_fp8_kv_fragment: 16 x 32K 354.7 -> 284.2 us in the toy), so a page's V field would become, per KV head,
[head_dim coordinates x block_size / 8 words] instead of [block_size tokens x head_dim / 8 words]. Every store
then writes one nibble into head_dim words that up to 7 other tokens share. Three ways, each over the index
field alone (quantising is the same for all):

- `token_major`: today's row of head_dim / 8 words per token (plain stores);
- `coord_atomic`: a program per token block; each nibble cleared and set by two atomics on its word;
- `coord_group`: a program per batch token, of which the first of each 8-slot group (the group's tokens are
  consecutive in a batch: a sequence's positions are, and no two sequences share a page) merges the group's
  nibbles into each coordinate's word: a load, and a store of the merged word, no atomics.

The store kernel itself took neither form for prefill: its 32-token programs merge each row of 8 consecutive slots
into whole words, with atomics only at their edges (page.store_coordinate_groups, since 2026-12-05).

Shapes: a decode step (16 sequences, one token each, each in a page of its own) and prefill chunks of 16,384
tokens (4 sequences, pages shuffled), one starting on a page boundary and one 5 slots into a page.

    python benchmarks/probe_value_store.py --out benchmarks/results/probe_value_store_h200_DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import run_header  # noqa: E402  (a sibling script, not a package)

HEAD_DIM = 128
BLOCK_SIZE = 16  # tokens a page
WORDS = HEAD_DIM // 8  # int32 words of one token's 4-bit indices, token-major
SLOT_WORDS = BLOCK_SIZE // 8  # int32 words of one coordinate's indices in a page, coordinate-major
PAGE_WORDS = BLOCK_SIZE * WORDS  # one KV head's V index field of a page, in either order
FORMS = ("token_major", "coord_atomic", "coord_group")


@triton.jit
def _token_major_kernel(idx_ptr, slot_ptr, pages_ptr, num_tokens, heads,
                        BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """idx [tokens, heads, HEAD_DIM] int32 -> pages [pages, heads, BLOCK_SIZE, HEAD_DIM // 8] int32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    live = t < num_tokens
    dim = tl.arange(0, HEAD_DIM)
    idx = tl.load(idx_ptr + (t[:, None] * heads + head) * HEAD_DIM + dim[None, :], mask=live[:, None], other=0)
    word = tl.sum(tl.reshape(idx, (BLOCK_T, HEAD_DIM // 8, 8)) << (tl.arange(0, 8) * 4)[None, None, :], axis=2)
    slot = tl.load(slot_ptr + t, mask=live, other=0)
    row = ((slot // BLOCK_SIZE) * heads + head) * BLOCK_SIZE + slot % BLOCK_SIZE
    g = tl.arange(0, HEAD_DIM // 8)
    tl.store(pages_ptr + row[:, None] * (HEAD_DIM // 8) + g[None, :], word, mask=live[:, None])


@triton.jit
def _coordinate_word(slot, head, heads, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Word offsets [.., HEAD_DIM] of each coordinate's word holding `slot` ([..]), and the nibble's shift."""
    dim = tl.arange(0, HEAD_DIM)
    base = ((slot // BLOCK_SIZE) * heads + head) * (HEAD_DIM * (BLOCK_SIZE // 8))
    word = base[:, None] + dim[None, :] * (BLOCK_SIZE // 8) + ((slot % BLOCK_SIZE) // 8)[:, None]
    return word, ((slot % 8) * 4)[:, None]


@triton.jit
def _coord_atomic_kernel(idx_ptr, slot_ptr, pages_ptr, num_tokens, heads,
                         BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """idx -> pages [pages, heads, HEAD_DIM, BLOCK_SIZE // 8] int32 (coordinate j, slot s: nibble s % 8 of word
    s // 8 of row j), each nibble cleared and set by atomics (other programs write the word's other nibbles)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    live = t < num_tokens
    dim = tl.arange(0, HEAD_DIM)
    idx = tl.load(idx_ptr + (t[:, None] * heads + head) * HEAD_DIM + dim[None, :], mask=live[:, None], other=0)
    slot = tl.load(slot_ptr + t, mask=live, other=0)
    word, shift = _coordinate_word(slot, head, heads, HEAD_DIM, BLOCK_SIZE)
    mask = live[:, None] & (dim < HEAD_DIM)[None, :]
    tl.atomic_and(pages_ptr + word, ~(15 << shift), mask=mask, sem="relaxed")
    tl.atomic_or(pages_ptr + word, idx << shift, mask=mask, sem="relaxed")


@triton.jit
def _coord_group_kernel(idx_ptr, slot_ptr, pages_ptr, num_tokens, heads,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """The same pages as _coord_atomic_kernel: the batch token that starts an 8-slot group merges the group."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    prev = tl.load(slot_ptr + tl.maximum(t - 1, 0))
    if (t > 0) & (prev // 8 == slot // 8):
        return
    member = t + tl.arange(0, 8)
    member_slot = tl.load(slot_ptr + member, mask=member < num_tokens, other=-1)
    live = (member < num_tokens) & (member_slot // 8 == slot // 8) & (member_slot >= 0)
    dim = tl.arange(0, HEAD_DIM)
    idx = tl.load(idx_ptr + (member[:, None] * heads + head) * HEAD_DIM + dim[None, :], mask=live[:, None], other=0)
    shift = ((member_slot % 8) * 4)[:, None]
    new = tl.sum(tl.where(live[:, None], idx << shift, 0), axis=0)  # [HEAD_DIM]: the group's nibbles
    cleared = tl.sum(tl.where(live[:, None], 15 << shift, 0), axis=0)
    word, _ = _coordinate_word(slot[None], head, heads, HEAD_DIM, BLOCK_SIZE)
    word = tl.reshape(word, (HEAD_DIM,))
    tl.store(pages_ptr + word, (tl.load(pages_ptr + word) & ~cleared) | new)


def store(form: str, idx: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor, block_t: int = 4) -> None:
    """Write idx [tokens, heads, HEAD_DIM] (int32, 0-15) at `slots` into pages [pages, heads, 256] int32."""
    num_tokens, heads, _ = idx.shape
    common = dict(HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK_SIZE)
    if form == "token_major":
        _token_major_kernel[(triton.cdiv(num_tokens, block_t), heads)](
            idx, slots, pages, num_tokens, heads, BLOCK_T=block_t, **common
        )
    elif form == "coord_atomic":
        _coord_atomic_kernel[(triton.cdiv(num_tokens, block_t), heads)](
            idx, slots, pages, num_tokens, heads, BLOCK_T=block_t, **common
        )
    elif form == "coord_group":
        _coord_group_kernel[(num_tokens, heads)](idx, slots, pages, num_tokens, heads, **common)
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def read_back(form: str, pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """int64 [tokens, heads, HEAD_DIM]: the indices stored at `slots`, decoded in torch."""
    heads = pages.shape[1]
    shifts = 4 * torch.arange(8, device=pages.device)
    nib = (pages.to(torch.int64)[..., None] >> shifts) & 15  # [pages, heads, 256, 8]
    if form == "token_major":
        per_token = nib.reshape(-1, heads, BLOCK_SIZE, HEAD_DIM)
    else:  # [pages, heads, coordinate, slot]
        per_token = nib.reshape(-1, heads, HEAD_DIM, BLOCK_SIZE).transpose(2, 3)
    return per_token[slots // BLOCK_SIZE, :, slots % BLOCK_SIZE]


def batch(shape: str, heads: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(idx, slots, pages) of a shape: "decode" (16 tokens, a page each), "prefill" (4 x 4096 tokens from a page
    boundary), "prefill_offset" (the same 5 slots into a page), or "tiny" (3 sequences of 1-19 tokens, for tests)."""
    g = torch.Generator().manual_seed(seed)
    if shape == "decode":
        pages = 64
        page_ids = torch.randperm(pages, generator=g)[:16]
        slots = page_ids * BLOCK_SIZE + torch.randint(0, BLOCK_SIZE, (16,), generator=g)
    else:
        lengths, first = {"prefill": ([4096] * 4, 0), "prefill_offset": ([4096] * 4, 5), "tiny": ([19, 1, 9], 5)}[shape]
        per_seq = [-(-(first + n) // BLOCK_SIZE) for n in lengths]
        pages = sum(per_seq)
        order = torch.randperm(pages, generator=g)
        slots_list, used = [], 0
        for n, count in zip(lengths, per_seq, strict=True):
            table = order[used : used + count]
            used += count
            pos = first + torch.arange(n)
            slots_list.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        slots = torch.cat(slots_list)
    idx = torch.randint(0, 16, (slots.numel(), heads, HEAD_DIM), generator=g, dtype=torch.int32)
    return idx.to(device), slots.to(device), pages


def time_forms(shapes: list[str], heads: int, rep: int) -> list[dict]:
    rows = []
    for shape in shapes:
        idx, slots, num_pages = batch(shape, heads, "cuda")
        for form in FORMS:
            pages = torch.randint(-(2**31), 2**31 - 1, (num_pages, heads, PAGE_WORDS), dtype=torch.int32, device="cuda")
            store(form, idx, slots, pages)
            ok = bool(torch.equal(read_back(form, pages, slots), idx.long()))
            launch = lambda f=form, i=idx, s=slots, p=pages: store(f, i, s, p)  # noqa: E731
            ms = float(triton.testing.do_bench_cudagraph(launch, rep=rep))
            row = {"shape": shape, "form": form, "tokens": slots.numel(), "heads": heads, "us": ms * 1e3,
                   "read_back_exact": ok}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="decode,prefill,prefill_offset")
    p.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--rep", type=int, default=100, help="do_bench_cudagraph repetition time, ms")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU; none found.")
        return 2
    rows = time_forms(args.shapes.split(","), args.heads, args.rep)
    text = json.dumps({**run_header("probe_value_store"), "rows": rows}, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
