"""The tests find the data folder by the package's rule (SAFESTEER_DATA_DIR, then ../shared/data); CI fails,
never skips."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, find_data_dir, missing_data

from safesteer.data.sources import resolve_data_dir


def _pack(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# Offline data pack\n")
    return folder


def test_env_folder_first_then_shared(tmp_path):
    env_dir = _pack(tmp_path / "elsewhere" / "data")
    project = tmp_path / "proj" / "repo"
    project.mkdir(parents=True)
    shared = _pack(tmp_path / "proj" / "shared" / "data")
    assert find_data_dir({"SAFESTEER_DATA_DIR": str(env_dir)}, project) == env_dir.resolve()
    assert find_data_dir({}, project) == shared.resolve()
    # a SAFESTEER_DATA_DIR that is not a data folder falls through to ../shared/data
    assert find_data_dir({"SAFESTEER_DATA_DIR": str(tmp_path / "nope")}, project) == shared.resolve()
    assert find_data_dir({}, tmp_path / "lonely" / "repo") is None


def test_same_folder_as_the_package(tmp_path, monkeypatch):
    env_dir = _pack(tmp_path / "d")
    monkeypatch.setenv("SAFESTEER_DATA_DIR", str(env_dir))
    assert resolve_data_dir(None).resolve() == find_data_dir(root=tmp_path / "x" / "y")


def test_missing_data_skips_locally_and_fails_under_ci():
    assert "SAFESTEER_DATA_DIR" in missing_data({"CI": "false"})
    with pytest.raises(pytest.fail.Exception) as e:
        missing_data({"CI": "true"})
    assert "CI=true" in str(e.value)


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_shared_data_fixture_without_data(tmp_path, ci, outcome):
    """A copy of conftest in a project with no data beside it: the fixture skips, or fails under CI."""
    proj = tmp_path / "p" / "repo" / "tests"
    proj.mkdir(parents=True)
    (proj / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (proj / "test_one.py").write_text(
        textwrap.dedent("""
        def test_reads(shared_data):
            assert shared_data.is_dir()
    """)
    )
    env = {"PATH": "/usr/bin:/bin", "CI": ci, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(proj)],
        capture_output=True,
        text=True,
        env=env,
        cwd=proj,
        timeout=300,
    )
    assert outcome in done.stdout and (done.returncode != 0) == (ci == "true"), done.stdout[-2000:]
