"""Model quality with compressed K/V: teacher-forced perplexity/KL/top-1 against an exact cache, and a needle test."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product, takewhile
from typing import Any

import torch
from scipy.stats import binomtest
from transformers.cache_utils import Cache, DynamicCache

from turboquant_vllm.config import TQConfig
from turboquant_vllm.key_offset import load_key_offsets
from turboquant_vllm.kv_cache import CompressedDynamicCache, cache_kwargs

BASELINE = "baseline"
Step = Callable[[], None] | None


@dataclass(frozen=True)
class CacheSpec:
    """A named cache recipe: None config means the exact DynamicCache baseline."""

    name: str
    config: TQConfig | None
    residual_tokens: int = 0
    # False: keys as the vLLM backend stores them by default; True: per-sequence offset (HF default);
    # a path: offsets from `turboquant-vllm calibrate`, as the vLLM backend uses them with key_offsets.
    center_keys: bool | str = False
    sink_tokens: int = 0  # the sequence's first tokens kept exact (0: as the vLLM backend stores them)

    def make(self, model: torch.nn.Module) -> Cache:
        if self.config is None:
            return DynamicCache()
        exact_tokens = dict(residual_tokens=self.residual_tokens, sink_tokens=self.sink_tokens)
        if isinstance(self.center_keys, str):
            offsets = load_key_offsets(self.center_keys)
            return CompressedDynamicCache(self.config, model.config, key_offsets=offsets, **exact_tokens)
        return CompressedDynamicCache(self.config, model.config, center_keys=self.center_keys, **exact_tokens)


def spec_name(config: TQConfig, residual_tokens: int = 0, center_keys: bool | str = False, sink_tokens: int = 0) -> str:
    name = f"k{config.k_bits}v{config.v_bits}" + ("+nc" if config.norm_correction else "")
    name += f"+R{residual_tokens}" if residual_tokens else ""
    name += f"+S{sink_tokens}" if sink_tokens else ""
    return name + ("+ko" if isinstance(center_keys, str) else "+kc" if center_keys else "")


def parse_specs(
    bits: str,
    norm_correction: Sequence[bool] = (True, False),
    residual: Sequence[int] = (0,),
    center_keys: Sequence[bool | str] = (False,),
    sinks: Sequence[int] = (0,),
    **options: Any,
) -> list[CacheSpec]:
    """Bit pairs "4/4,3/3" x norm_correction x residual windows x exact sinks x key offsets (off, per sequence, or
    a calibration file) -> specs named "k4v4+nc", "k4v4", "k4v4+nc+R64", "k4v4+nc+S4", "k4v4+nc+kc", "k4v4+nc+ko"."""
    specs = []
    for pair in (p.strip() for p in bits.split(",") if p.strip()):
        k_bits, _, v_bits = pair.partition("/")
        for nc in norm_correction:
            cfg = TQConfig(k_bits=int(k_bits), v_bits=int(v_bits or k_bits), norm_correction=nc, **options)
            for r, sk, c in product(residual, sinks, center_keys):
                specs.append(CacheSpec(spec_name(cfg, r, c, sk), cfg, r, c, sk))
    return specs


# ---- metrics on logits [N, V] ----


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target [N] under logits [N, V], in nats (fp32)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.long(), reduction="none")


def kl_divergence(base_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_test) per position [N], in nats: how much the compressed model's next-token law moved."""
    base = torch.log_softmax(base_logits.float(), dim=-1)
    test = torch.log_softmax(test_logits.float(), dim=-1)
    return (base.exp() * (base - test)).sum(-1)


def top1_agreement(base_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """Whether the argmax tokens agree, per position [N] (bool)."""
    return base_logits.argmax(-1) == test_logits.argmax(-1)


@dataclass
class Tally:
    """Running sums over scored positions; kl/agree stay zero for the baseline itself."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None) -> None:
        self.nll += float(token_nll(logits, targets).double().sum())
        self.count += targets.numel()
        if base_logits is not None:
            self.kl += float(kl_divergence(base_logits, logits).double().sum())
            self.agree += int(top1_agreement(base_logits, logits).sum())

    def merge(self, other: Tally) -> None:
        self.nll, self.kl = self.nll + other.nll, self.kl + other.kl
        self.agree, self.count = self.agree + other.agree, self.count + other.count

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    def summary(self, baseline: Tally | None = None) -> dict[str, float]:
        out = {"perplexity": self.perplexity, "nll": self.nll / max(self.count, 1), "tokens": self.count}
        if baseline is not None:
            out["ppl_change_pct"] = 100.0 * (self.perplexity / baseline.perplexity - 1.0)
            out["kl"] = self.kl / max(self.count, 1)
            out["top1_agreement"] = self.agree / max(self.count, 1)
        return out


# ---- teacher-forced evaluation ----


@torch.no_grad()
def chunk_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, chunk: int, cache: Cache, **forward: Any
) -> Iterator[torch.Tensor]:
    """Feed input_ids [B, L] through the model chunk tokens at a time, yielding each chunk's logits [B, n, V].

    Chunk i attends to chunks < i through the cache (compressed, for a CompressedDynamicCache) and
    to itself exactly, as vLLM's chunked prefill does with our backend. `forward` goes to the model
    (e.g. logits_to_keep=1).
    """
    kwargs = {**cache_kwargs(model, cache), **forward}
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start : start + chunk].to(model.device)
        yield model(input_ids=piece, use_cache=True, **kwargs).logits.float()


def chunked_logits(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int, cache: Cache) -> torch.Tensor:
    """All of chunk_logits, concatenated: [B, L, V]."""
    return torch.cat(list(chunk_logits(model, input_ids, chunk, cache)), dim=1)


def evaluate_windows(
    model: torch.nn.Module,
    windows: Sequence[Sequence[int]],
    chunk: int,
    specs: Sequence[CacheSpec],
    step: Step = None,
) -> dict[str, Tally]:
    """Score equal-length windows of L + 1 tokens (inputs 0..L-1, targets 1..L), one batch row each,
    for the baseline and every spec.

    Batching windows divides the number of forward calls, which bounds GPU run time for a small model.
    All caches advance in lockstep, so only one chunk of baseline logits is alive at a time.
    Positions in the first chunk are not scored: they attend to exact K/V under every cache.
    """
    ids = torch.tensor([list(w) for w in windows], dtype=torch.long)
    targets = ids[:, 1:].to(model.device)
    inputs = ids[:, :-1]
    runs = {s.name: chunk_logits(model, inputs, chunk, s.make(model)) for s in specs}
    baseline_run = chunk_logits(model, inputs, chunk, DynamicCache())
    tallies = {BASELINE: Tally(), **{s.name: Tally() for s in specs}}
    for start, base in zip(range(0, inputs.shape[1], chunk), baseline_run, strict=True):
        tgt = targets[:, start : start + base.shape[1]].reshape(-1)
        base = base.flatten(0, 1)
        scored = start > 0
        if scored:
            tallies[BASELINE].add(base, tgt)
        for name, run in runs.items():
            logits = next(run).flatten(0, 1)
            if scored:
                tallies[name].add(logits, tgt, base)
        if step:
            step()
    return tallies


def windows_for(tokens: Sequence[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of context + 1 tokens (the last token of one is the first of the next)."""
    return [list(tokens[s : s + context + 1]) for s in range(0, len(tokens) - context, context)]


def quality_steps(num_tokens: int, contexts: Sequence[int], chunk: int, batch: int = 1) -> int:
    """How many times evaluate_quality calls step (one per chunk of every batch of windows)."""
    return sum(math.ceil((num_tokens - 1) // c / batch) * math.ceil(c / chunk) for c in contexts)


def evaluate_quality(
    model: torch.nn.Module,
    tokens: Sequence[int],
    contexts: Sequence[int],
    chunk: int,
    specs: Sequence[CacheSpec],
    step: Step = None,
    batch: int = 1,
) -> dict[str, Any]:
    """Per context length: baseline perplexity and, per spec, perplexity, % change, mean KL and top-1 agreement.

    batch windows share each forward call.
    """
    results: dict[str, Any] = {}
    for context in contexts:
        if context <= chunk:
            raise ValueError(f"context {context} must exceed chunk {chunk}: only later chunks see compressed K/V")
        windows = windows_for(tokens, context)
        if not windows:
            raise ValueError(f"{len(tokens)} tokens hold no window of {context + 1}")
        totals = {BASELINE: Tally(), **{s.name: Tally() for s in specs}}
        for first in range(0, len(windows), batch):
            for name, tally in evaluate_windows(model, windows[first : first + batch], chunk, specs, step).items():
                totals[name].merge(tally)
        results[str(context)] = {
            "windows": len(windows),
            BASELINE: totals[BASELINE].summary(),
            "configs": {s.name: totals[s.name].summary(totals[BASELINE]) for s in specs},
        }
    return results


# ---- needle in a haystack ----

# The pass-key retrieval prompt of Mohtashami & Jaggi (2023, "Landmark Attention"): an instruction, the key
# stated twice inside the haystack, and the question. Without compression SmolLM2-135M found a single "code word"
# sentence in 6 of 18 prompts of 1K and 2K tokens, which leaves little to compare against; it finds this key in
# all 18 (benchmarks/results/hf_needle_passkey_cpu_2026-11-30.json).
INSTRUCTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
# Started for the model, so a small model's answer is the key itself rather than a paraphrase of the task.
ANSWER_PREFIX = "The pass key is"
CHATML = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pass_key(seed: int) -> str:
    """A five-digit key: digits carry no meaning the text could suggest, so only retrieval finds them."""
    return str(random.Random(seed).randint(10_000, 99_999))


@dataclass
class NeedlePrompt:
    input_ids: list[int]
    key: str
    needle_at: int = 0  # token index where the needle starts


def _chat_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: the chat template (ChatML if the tokenizer has none) around
    INSTRUCTION + haystack + QUESTION, ending with the start of the assistant's answer (ANSWER_PREFIX).
    """
    marker = "\x00MESSAGE\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = CHATML.format(content=marker)
    before, after = text.split(marker)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    return enc(before + INSTRUCTION), enc("\n\n" + QUESTION + after + ANSWER_PREFIX)


def needle_prompt(tokenizer: Any, haystack: Sequence[int], length: int, depth: float, key: str) -> NeedlePrompt:
    """A chat prompt of exactly `length` tokens: Austen with the pass-key NEEDLE at `depth`.

    The needle goes right after the first sentence end at or past depth * haystack, so it reads as a
    sentence of its own.
    """
    before, after = _chat_parts(tokenizer)
    needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
    budget = length - len(before) - len(after) - len(needle)
    if budget <= 0 or budget > len(haystack):
        raise ValueError(f"cannot build a {length}-token prompt from {len(haystack)} haystack tokens")
    hay = list(haystack[:budget])
    at = int(depth * budget)
    while at < budget and "." not in tokenizer.decode(hay[max(at - 1, 0) : at]):
        at += 1
    at = min(at, budget)
    ids = before + hay[:at] + needle + hay[at:] + after
    return NeedlePrompt(ids, key, len(before) + at)


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    chunk: int,
    cache: Cache,
    max_new_tokens: int,
    eos: set[int],
) -> list[list[int]]:
    """Chunked prefill of equal-length prompts, one batch row each (later chunks attend to the compressed
    earlier ones), then greedy decoding until every row has produced an eos token; answers stop before it.

    Tokens stay on the device between steps: the only sync per step is the all-rows-done check.
    """
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"batched prompts need one length, got {sorted({len(p) for p in prompts})}")
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)
    logits = deque(chunk_logits(model, ids, chunk, cache, logits_to_keep=1), maxlen=1)[0]
    kwargs = cache_kwargs(model, cache)
    stop = torch.tensor(sorted(eos), dtype=torch.long, device=logits.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=logits.device)
    tokens = []
    for i in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = model(input_ids=token[:, None], use_cache=True, **kwargs).logits
    rows = torch.stack(tokens, dim=1).tolist()
    return [list(takewhile(lambda t: t not in eos, row)) for row in rows]


def eos_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    return {i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id}


def needle_test(
    model: torch.nn.Module,
    tokenizer: Any,
    haystack: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    chunk: int,
    specs: Sequence[CacheSpec],
    max_new_tokens: int = 16,
    seed: int = 0,
    step: Step = None,
    batch: int = 1,
) -> dict[str, Any]:
    """Pass/fail of the greedy answer per (length, depth) for the baseline and each spec.

    Lengths are capped so prompt plus answer fit the model's max_position_embeddings. The prompts of
    one length have equal token counts, so up to batch depths share each forward call.
    """
    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 30
    eos = eos_ids(tokenizer, model)
    all_specs = [CacheSpec(BASELINE, None), *specs]
    results: dict[str, Any] = {s.name: {} for s in all_specs}
    for length in lengths:
        used = min(length, max_pos - max_new_tokens)
        keys = [pass_key(seed * 1_000_003 + length * 101 + i) for i in range(len(depths))]
        prompts = [needle_prompt(tokenizer, haystack, used, d, k) for d, k in zip(depths, keys, strict=True)]
        for spec in all_specs:
            cells = results[spec.name].setdefault(str(length), {})
            for first in range(0, len(prompts), batch):
                group = prompts[first : first + batch]
                answers = greedy_answers(
                    model, [p.input_ids for p in group], chunk, spec.make(model), max_new_tokens, eos
                )
                for depth, prompt, answer_ids in zip(depths[first : first + batch], group, answers, strict=True):
                    answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                    cells[f"{depth:.2f}"] = {
                        "pass": prompt.key in answer,
                        "answer": answer,
                        "key": prompt.key,
                        "prompt_tokens": len(prompt.input_ids),
                    }
                    if step:
                        step()
    return results


def needle_pass_rate(results: dict[str, Any]) -> dict[str, float]:
    """Fraction of (length, depth) cells passed, per cache."""
    rates = {}
    for name, by_length in results.items():
        cells = [cell["pass"] for by_depth in by_length.values() for cell in by_depth.values()]
        rates[name] = sum(cells) / len(cells) if cells else float("nan")
    return rates


def needle_agreement(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each cache against the baseline on the same prompts, over one or more needle results (other key seeds).

    A single placement is one greedy answer, so two caches can pass the same number of placements at different
    depths by chance. Paired counts say whether they differ: prompts both pass, neither, only one; and the exact
    two-sided sign test of the prompts only one passes (p = 1 when there are none).
    """
    outcome = {(True, True): "both", (False, False): "neither", (True, False): "only_baseline",
               (False, True): "only_cache"}  # (baseline passes, cache passes)  # fmt: skip
    table = {}
    for name in sorted({name for run in runs for name in run if name != BASELINE}):
        counts = dict.fromkeys(outcome.values(), 0)
        for run in runs:
            for length, by_depth in run.get(name, {}).items():
                for depth, cell in by_depth.items():
                    counts[outcome[run[BASELINE][length][depth]["pass"], cell["pass"]]] += 1
        discordant = counts["only_baseline"] + counts["only_cache"]
        p = binomtest(counts["only_cache"], discordant).pvalue if discordant else 1.0
        table[name] = {**counts, "prompts": sum(counts.values()), "sign_test_p": float(p)}
    return table


def load_model(path: Any, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder, in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
