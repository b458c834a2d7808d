"""Quality metrics against hand-computed values, and the chunked harness against one unchunked forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from turboquant_vllm.config import TQConfig
from turboquant_vllm.eval import quality as Q


@pytest.fixture(scope="module")
def model(tiny_llama) -> LlamaForCausalLM:
    return tiny_llama(num_key_value_heads=1, seed=1)


def test_token_nll_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    nll = Q.token_nll(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(nll, torch.tensor([math.log(4 / 3), math.log(2.0)]))


def test_kl_by_hand_and_direction():
    uniform, skewed = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    # KL(U || Q) with Q = (1/4, 3/4): 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    torch.testing.assert_close(Q.kl_divergence(uniform, skewed), torch.tensor([0.5 * math.log(4 / 3)]))
    # KL(Q || U) = 0.25 ln(0.5) + 0.75 ln(1.5), a different number: the argument order matters
    torch.testing.assert_close(
        Q.kl_divergence(skewed, uniform), torch.tensor([0.25 * math.log(0.5) + 0.75 * math.log(1.5)])
    )
    assert float(Q.kl_divergence(skewed, skewed)) == pytest.approx(0.0, abs=1e-7)


def test_top1_agreement_by_hand():
    base = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    test = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert Q.top1_agreement(base, test).tolist() == [True, False, True]


def test_tally_summary_by_hand():
    base_logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    test_logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    targets = torch.tensor([1, 0])
    base, test = Q.Tally(), Q.Tally()
    base.add(base_logits, targets)
    test.add(test_logits, targets, base_logits)
    assert base.perplexity == pytest.approx(2.0)
    # nll of test: ln(4/3) and ln 4 -> ppl = exp(mean) = sqrt(16/3)
    summary = test.summary(base)
    assert summary["perplexity"] == pytest.approx(math.sqrt(16 / 3))
    assert summary["ppl_change_pct"] == pytest.approx(100 * (math.sqrt(16 / 3) / 2 - 1))
    assert summary["kl"] == pytest.approx(0.5 * math.log(4 / 3))
    assert summary["top1_agreement"] == pytest.approx(0.0)  # uniform argmax is token 0, skewed is 1
    assert summary["tokens"] == 2


def test_parse_specs_names_and_options():
    specs = Q.parse_specs("4/4, 3/2,2", (True, False), rotation="hadamard")
    assert [s.name for s in specs] == ["k4v4+nc", "k4v4", "k3v2+nc", "k3v2", "k2v2+nc", "k2v2"]
    assert specs[3].config == TQConfig(k_bits=3, v_bits=2, norm_correction=False, rotation="hadamard")
    with_window = Q.parse_specs("3/3", (True,), residual=(0, 64))
    assert [(s.name, s.residual_tokens) for s in with_window] == [("k3v3+nc", 0), ("k3v3+nc+R64", 64)]
    centered = Q.parse_specs("4/4", (True,), center_keys=(False, True))
    assert [(s.name, s.center_keys) for s in centered] == [("k4v4+nc", False), ("k4v4+nc+kc", True)]
    calibrated = Q.parse_specs("4/4", (True,), center_keys=("offsets.pt",))
    assert [(s.name, s.center_keys) for s in calibrated] == [("k4v4+nc+ko", "offsets.pt")]
    sinks = Q.parse_specs("4/4", (True,), residual=(32,), center_keys=(True,), sinks=(0, 4))
    assert [(s.name, s.sink_tokens) for s in sinks] == [("k4v4+nc+R32+kc", 0), ("k4v4+nc+R32+S4+kc", 4)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("rows", [1, 3])
def test_chunked_exact_cache_equals_one_forward(model, chunk, rows):
    ids = torch.randint(1, 64, (rows, 40), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
    torch.testing.assert_close(Q.chunked_logits(model, ids, chunk, DynamicCache()), whole, rtol=0, atol=2e-5)


def test_evaluate_quality_baseline_matches_unchunked_logits(model):
    tokens = torch.randint(1, 64, (97,), generator=torch.Generator().manual_seed(5)).tolist()
    specs = Q.parse_specs("4/4,2/2", (True,))
    steps = []
    res = Q.evaluate_quality(model, tokens, [48], 16, specs, step=lambda: steps.append(1))
    assert len(steps) == Q.quality_steps(len(tokens), [48], 16) == 2 * 3
    out = res["48"]
    assert out["windows"] == 2
    nll, count = 0.0, 0
    for window in Q.windows_for(tokens, 48):
        ids = torch.tensor([window])
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits[0]
        nll += float(Q.token_nll(logits[16:], ids[0, 17:]).sum())
        count += 32
    assert out["baseline"]["tokens"] == count
    assert out["baseline"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    k4, k2 = out["configs"]["k4v4+nc"], out["configs"]["k2v2+nc"]
    assert 0 < k4["kl"] < k2["kl"]
    assert 0 <= k2["top1_agreement"] <= k4["top1_agreement"] <= 1


def test_batched_windows_score_like_one_at_a_time(model):
    tokens = torch.randint(1, 64, (161,), generator=torch.Generator().manual_seed(6)).tolist()
    specs = Q.parse_specs("3/2", (True, False))
    one = Q.evaluate_quality(model, tokens, [32], 16, specs)["32"]
    steps = []
    batched = Q.evaluate_quality(model, tokens, [32], 16, specs, step=lambda: steps.append(1), batch=3)["32"]
    assert len(steps) == Q.quality_steps(len(tokens), [32], 16, batch=3) == 2 * 2  # 5 windows: batches of 3 and 2
    assert batched["windows"] == one["windows"] == 5
    assert batched["baseline"]["tokens"] == one["baseline"]["tokens"] == 5 * 16
    for name in ("k3v2+nc", "k3v2"):
        for key in ("perplexity", "kl", "top1_agreement"):
            assert batched["configs"][name][key] == pytest.approx(one["configs"][name][key], rel=1e-4, abs=1e-7)


def test_context_must_exceed_chunk(model):
    with pytest.raises(ValueError, match="exceed chunk"):
        Q.evaluate_quality(model, list(range(1, 60)), [16], 16, [])


class WordTokenizer:
    """Whitespace-ish tokenizer over a growing vocabulary: enough for prompt assembly tests."""

    chat_template = None
    eos_token_id = 1
    unk_token_id = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<pad>": 0, "<eos>": 1}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        words = text.replace("\n", " \n ").split(" ")
        return [self.vocab.setdefault(w, len(self.vocab)) % 64 if w else 2 for w in words]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        inverse = {i % 64: w for w, i in self.vocab.items()}
        return " ".join(inverse.get(i, "?") for i in ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return 1


def test_needle_prompt_length_and_placement():
    tok = WordTokenizer()
    hay = tok.encode(" ".join(f"word{i}." if i % 5 == 4 else f"word{i}" for i in range(300)))
    for depth in (0.1, 0.5, 0.9):
        prompt = Q.needle_prompt(tok, hay, 200, depth, "48213")
        assert len(prompt.input_ids) == 200 and prompt.key == "48213"
        needle = tok.encode(Q.NEEDLE.format(key="48213"))
        assert prompt.input_ids[prompt.needle_at : prompt.needle_at + len(needle)] == needle
        before = tok.decode(prompt.input_ids[prompt.needle_at - 1 : prompt.needle_at])
        assert before.endswith(".")
    with pytest.raises(ValueError):
        Q.needle_prompt(tok, hay[:50], 200, 0.5, "48213")


def test_needle_test_runs_every_cache(model):
    tok = WordTokenizer()
    hay = tok.encode(" ".join(f"w{i}." for i in range(200)))
    res = Q.needle_test(model, tok, hay, [80, 96], [0.25, 0.75], 16, Q.parse_specs("4/4", (True,)), max_new_tokens=2)
    assert set(res) == {"baseline", "k4v4+nc"}
    assert set(res["k4v4+nc"]) == {"80", "96"} and set(res["k4v4+nc"]["80"]) == {"0.25", "0.75"}
    cell = res["baseline"]["96"]["0.25"]
    assert cell["prompt_tokens"] == 96 and isinstance(cell["pass"], bool)
    assert set(Q.needle_pass_rate(res)) == {"baseline", "k4v4+nc"}


def test_needle_agreement_pairs_prompts_across_runs():
    """Counts per prompt pair, summed over runs, and the exact sign test (hand-computed values)."""

    def run(base: str, cache: str) -> dict:
        cells = lambda passes: {"1024": {f"0.{i}": {"pass": p == "x"} for i, p in enumerate(passes)}}
        return {"baseline": cells(base), "k4v4": cells(cache)}

    mixed = Q.needle_agreement([run("xx..", "x.x."), run("x", "x")])["k4v4"]
    assert mixed == {"both": 2, "neither": 1, "only_baseline": 1, "only_cache": 1, "prompts": 5, "sign_test_p": 1.0}
    one_sided = Q.needle_agreement([run("xxxxxxxxxx", "..........")])["k4v4"]
    assert one_sided["only_baseline"] == 10 and one_sided["sign_test_p"] == 2 / 1024
    assert Q.needle_agreement([run("x.", "x.")])["k4v4"]["sign_test_p"] == 1.0  # nothing discordant


def test_batched_greedy_answers_match_single_rows(model):
    prompts = torch.randint(2, 64, (3, 37), generator=torch.Generator().manual_seed(2)).tolist()
    spec = Q.parse_specs("4/4", (True,))[0]
    singles = [Q.greedy_answers(model, [p], 16, spec.make(model), 6, eos=set())[0] for p in prompts]
    assert all(len(s) == 6 for s in singles)
    assert Q.greedy_answers(model, prompts, 16, spec.make(model), 6, eos=set()) == singles
    word = singles[0][2]  # as eos: answers end before it, rows without it run to max_new_tokens
    cut = Q.greedy_answers(model, prompts, 16, spec.make(model), 6, eos={word})
    for got, full in zip(cut, singles, strict=True):
        assert got == (full[: full.index(word)] if word in full else full)
    with pytest.raises(ValueError, match="one length"):
        Q.greedy_answers(model, [prompts[0], prompts[1][:-1]], 16, DynamicCache(), 2, set())


def test_needle_batches_depths_like_single_runs(model):
    tok = WordTokenizer()
    hay = tok.encode(" ".join(f"w{i}." for i in range(200)))
    args = (model, tok, hay, [80], [0.2, 0.5, 0.8], 16, Q.parse_specs("2/2", (False,)))
    assert Q.needle_test(*args, max_new_tokens=3, batch=2) == Q.needle_test(*args, max_new_tokens=3)


@pytest.mark.network
def test_smollm2_short_window_quality():
    from turboquant_vllm.eval import data

    model, tokenizer = Q.load_model(data.smollm2_hf_dir())
    tokens = data.austen_token_stream(tokenizer, 257)
    res = Q.evaluate_quality(model, tokens, [256], 128, Q.parse_specs("4/4", (True,)))["256"]
    assert res["baseline"]["perplexity"] < 60
    assert res["configs"]["k4v4+nc"]["kl"] < 0.05
    assert res["configs"]["k4v4+nc"]["top1_agreement"] > 0.85


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_quality_and_needle_on_cuda_match_cpu(model):
    cuda_model = copy.deepcopy(model).cuda()
    tokens = torch.randint(1, 64, (161,), generator=torch.Generator().manual_seed(8)).tolist()
    specs = Q.parse_specs("4/3", (True, False))
    want = Q.evaluate_quality(model, tokens, [32], 16, specs)["32"]
    got = Q.evaluate_quality(cuda_model, tokens, [32], 16, specs, batch=4)["32"]
    assert got["baseline"]["perplexity"] == pytest.approx(want["baseline"]["perplexity"], rel=1e-4)
    for name, row in want["configs"].items():
        assert got["configs"][name]["perplexity"] == pytest.approx(row["perplexity"], rel=1e-3)
        assert got["configs"][name]["kl"] == pytest.approx(row["kl"], rel=0.05, abs=1e-6)
        assert got["configs"][name]["top1_agreement"] == pytest.approx(row["top1_agreement"], abs=0.05)
    tok = WordTokenizer()
    hay = tok.encode(" ".join(f"w{i}." for i in range(200)))
    res = Q.needle_test(cuda_model, tok, hay, [96], [0.25, 0.5, 0.75], 16, specs, max_new_tokens=3, batch=2)
    assert set(res) == {"baseline", "k4v3+nc", "k4v3"} and len(res["k4v3"]["96"]) == 3


@pytest.mark.network
def test_smollm2_finds_the_pass_key_with_and_without_compression():
    """The needle format is one the real model solves, so the compressed caches are compared against a pass."""
    from turboquant_vllm.eval import data

    model, tokenizer = Q.load_model(data.smollm2_hf_dir())
    haystack = data.austen_token_stream(tokenizer, 1100)
    specs = Q.parse_specs("4/4", (True,))
    res = Q.needle_test(model, tokenizer, haystack, [1024], [0.3, 0.7], 256, specs, batch=2)
    for name in ("baseline", "k4v4+nc"):
        for cell in res[name]["1024"].values():
            assert cell["pass"], (name, cell)
