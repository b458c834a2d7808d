"""Tests for the real-data loaders: offline on fixtures, and against Debian/PyPI when marked network."""

from __future__ import annotations

import bz2
import json
import lzma
import math
import struct
import zlib
from pathlib import Path

import pytest

from turboquant_vllm.eval import data


class CharTokenizer:
    """One id per character, so token counts are easy to reason about."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]


@pytest.fixture
def fake_austen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("TURBOQUANT_VLLM_CACHE", str(tmp_path))
    novels = {title: f"{title.upper()}\nline" for title in data.AUSTEN_TITLES}
    (tmp_path / "austen.json").write_text(json.dumps(novels))
    return novels


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOQUANT_VLLM_CACHE", str(tmp_path / "env"))
    assert data.cache_root() == tmp_path / "env"
    assert data.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert (tmp_path / "env").is_dir() and (tmp_path / "arg").is_dir()


@pytest.mark.parametrize(
    ("compressed", "method", "encode"),
    [
        (1, b"", zlib.compress),
        (3, b"Z", zlib.compress),
        (3, b"2", bz2.compress),
        (3, b"X", lzma.compress),
        (2, b"0", bytes),
    ],
)
def test_inflate_methods(compressed: int, method: bytes, encode) -> None:
    payload = b"X\n" + bytes(range(256)) * 4
    blob = struct.pack(">I", len(payload)) + method + encode(payload)
    assert data._inflate(blob, compressed) == payload


def test_inflate_rejects_bad_length_and_method() -> None:
    with pytest.raises(ValueError, match="header says"):
        data._inflate(struct.pack(">I", 5) + zlib.compress(b"abc"), 1)
    with pytest.raises(ValueError, match="compression method"):
        data._inflate(struct.pack(">I", 3) + b"Q" + b"abc", 3)


@pytest.mark.parametrize(("compressed", "method"), [(True, b""), (3, b"X"), (2, b"2")])
def test_read_lazyload_db_fixture(tmp_path: Path, compressed: bool | int, method: bytes) -> None:
    """A lazy-load database laid out as R's makeLazyLoadDB writes it, objects serialized by rdata."""
    rdata = pytest.importorskip("rdata")
    np = pytest.importorskip("numpy")
    encode = {b"": zlib.compress, b"X": lzma.compress, b"2": bz2.compress}[method]
    objects = {"first": ["It is a truth", "", "universally acknowledged £"], "second": ["Emma"]}
    blobs, variables = b"", {}
    for name, lines in objects.items():
        rdata.write_rds(tmp_path / f"{name}.rds", np.array(lines), compression=None)
        raw = (tmp_path / f"{name}.rds").read_bytes()
        blob = struct.pack(">I", len(raw)) + method + encode(raw)
        variables[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    (tmp_path / "db.rdb").write_bytes(blobs)
    flag = np.array([compressed], dtype=np.int32) if method else True
    rdata.write_rds(tmp_path / "db.rdx", {"variables": variables, "references": {}, "compressed": flag})

    loaded = data.read_lazyload_db(tmp_path / "db.rdx")
    assert {name: [str(s) for s in value] for name, value in loaded.items()} == objects


def test_austen_text_reads_cache(fake_austen: dict[str, str]) -> None:
    assert data.austen_text() == fake_austen


def test_token_stream_order_and_prefix(fake_austen: dict[str, str]) -> None:
    tok = CharTokenizer()
    full = "".join(fake_austen[t] + "\n\n" for t in data.AUSTEN_TITLES)
    ids = data.austen_token_stream(tok, 60)
    assert ids == [ord(ch) for ch in full[:60]]
    assert data.austen_token_stream(tok, 25) == ids[:25]
    assert data.austen_token_stream(tok, 5, titles=["Emma"]) == [ord(ch) for ch in "EMMA\n"]
    with pytest.raises(ValueError, match="fewer than"):
        data.austen_token_stream(tok, len(full) + 1)


def test_windows_stride(fake_austen: dict[str, str]) -> None:
    tok = CharTokenizer()
    stream = data.austen_token_stream(tok, 100)
    windows = list(data.austen_windows(tok, 10, 4, stride=30))
    assert windows == [stream[s : s + 10] for s in (0, 30, 60, 90)]
    assert list(data.austen_windows(tok, 8, 3)) == [stream[0:8], stream[8:16], stream[16:24]]


def test_bundled_gguf_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "other.gguf").write_bytes(b"GGUF")
    (bundle / "sub" / data.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setenv("GPU_BUNDLE_MODELS", str(bundle))
    assert data.smollm2_path(tmp_path / "cache") == bundle / "sub" / data.SMOLLM2_GGUF
    monkeypatch.setenv("GPU_BUNDLE_MODELS", str(bundle / "other.gguf"))
    assert data.smollm2_path(tmp_path / "cache") == bundle / "other.gguf"


@pytest.fixture(scope="session")
def austen_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache, so the Debian download and the R parsing run every session."""
    pytest.importorskip("rdata")
    cache = tmp_path_factory.mktemp("austen-cache")
    data.austen_text(cache)
    return cache


@pytest.mark.network
def test_austen_novels(austen_cache: Path) -> None:
    austen = data.austen_text(austen_cache)
    assert tuple(austen) == data.AUSTEN_TITLES
    pride = austen["Pride & Prejudice"]
    assert pride.startswith("PRIDE AND PREJUDICE\n")
    assert "It is a truth universally acknowledged, that a single man in possession" in pride
    assert pride.count("\n") + 1 == 13030
    assert austen["Emma"].startswith("EMMA\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in austen["Emma"]
    assert austen["Persuasion"].startswith("Persuasion\n")
    assert 3_900_000 < sum(map(len, austen.values())) < 4_200_000
    assert all(300_000 < len(text) < 1_000_000 for text in austen.values())
    assert json.loads((austen_cache / "austen.json").read_text(encoding="utf-8")) == austen


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    """Built in the shared cache: converting the GGUF takes about a minute on two cores."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    return data.smollm2_hf_dir()


@pytest.mark.network
def test_smollm2_gguf_is_pinned() -> None:
    path = data.smollm2_path()
    assert path.name == data.SMOLLM2_GGUF
    assert path.read_bytes()[:4] == b"GGUF"
    assert data._sha256(path) == data.SMOLLM2_GGUF_SHA256


@pytest.mark.network
def test_smollm2_hf_config(hf_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.hidden_size == 576 and config.vocab_size == 49152
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    marker = json.loads((hf_dir / data.SOURCE_MARKER).read_text())
    assert marker["gguf_sha256"] == data.SMOLLM2_GGUF_SHA256


@pytest.mark.network
def test_smollm2_hf_tokenizer(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "It is a truth universally acknowledged.\n\n  Mr. Darcy's £10,000 a year\t— “quoted”"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode("Hello", add_special_tokens=True) == tok.encode("Hello", add_special_tokens=False)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.network
def test_smollm2_hf_generates_and_scores_austen(hf_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        prompt = tok("The capital of France is", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])
        ids = torch.tensor([data.austen_token_stream(tok, 512)])
        perplexity = math.exp(model(ids, labels=ids).loss.item())
    assert 10 < perplexity < 40, perplexity
