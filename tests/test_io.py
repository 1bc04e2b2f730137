"""Atomic writes: all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from safesteer.io import atomic_path, read_json, write_json


def test_atomic_write_gives_umask_permissions_and_no_leftovers(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_leaves_the_old_file(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_canonical_safetensors_sorts_metadata_and_keeps_tensors(tmp_path):
    import json
    import struct

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from safesteer.io import canonical_safetensors

    tensors = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 5), dtype=np.float32)}
    meta = {"zeta": "1", "alpha": "2", "mid": "3"}
    p = tmp_path / "t.safetensors"
    save_file(tensors, str(p), metadata=meta)
    canonical_safetensors(p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == ["alpha", "mid", "zeta"]
    back = load_file(str(p))
    assert set(back) == {"a", "b"} and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    with safe_open(str(p), "np") as f:
        assert f.metadata() == meta
    once = p.read_bytes()
    canonical_safetensors(p)
    assert p.read_bytes() == once  # idempotent
