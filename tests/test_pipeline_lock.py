"""One run per folder (an OS lock), and byte-identical stage files from identical runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline_behaviour import pinned_config, tiny_model_dir  # noqa: F401  (fixture)

from safesteer.config import dump_toml
from safesteer.errors import SafesteerError
from safesteer.pipeline.lock import RunLock
from safesteer.pipeline.runner import Pipeline

pytestmark = pytest.mark.integration


def test_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(SafesteerError, match=rf"in use by another safesteer run \(pid {os.getpid()}\)"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_second_run_on_one_folder_exits_2_with_one_line(tmp_path, tiny_model_dir, shared_data):  # noqa: F811
    cfg = pinned_config(tiny_model_dir, shared_data)
    path = tmp_path / "cfg.toml"
    path.write_text(dump_toml(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "safesteer.cli.main", "run", "--config", str(path), "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            lock = out / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        t0 = time.time()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(out) in lines[0], second.stderr
        assert time.time() - t0 < 60  # at once, not after the first run
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]


def _stage_files(run: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted((run / "stages").rglob("*")):
        # DONE.json and the trainer's timings.json are the only files that hold wall-clock times
        if not p.is_file() or p.name in ("DONE.json", "timings.json"):
            continue
        out[p.relative_to(run).as_posix()] = p.read_bytes()
    return out


def test_identical_runs_give_byte_identical_stage_files(tmp_path, tiny_model_dir, shared_data):  # noqa: F811
    cfg = pinned_config(tiny_model_dir, shared_data)
    out = tmp_path / "run"  # the same path twice (files record their paths): run, move aside, run again
    Pipeline(cfg, out).run()
    first = tmp_path / "first"
    out.rename(first)
    Pipeline(cfg, out).run()
    a, b = _stage_files(first), _stage_files(out)
    assert sorted(a) == sorted(b) and len(a) > 40
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, differ
