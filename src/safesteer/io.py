"""Atomic file writing: nothing is ever half-written.

Every artefact is written to a temporary file in the destination folder, flushed, fsynced and
renamed over the target, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from safesteer.errors import SafesteerError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide results from other users


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if tmp_path.is_file():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise SafesteerError(
            f"cannot write {target}: {exc.strerror or exc}; check free space and permissions"
        ) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(target: str | os.PathLike, obj: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise SafesteerError(f"missing file {path}; run the stage that produces it first") from exc
    except json.JSONDecodeError as exc:
        raise SafesteerError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run the stage") from exc


def save_npy(target: str | os.PathLike, array: np.ndarray) -> None:
    """Write an ``.npy`` atomically (never with objects)."""
    if array.dtype == object:
        raise SafesteerError("refusing to save an object array; safesteer never pickles")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file (bounded memory, works on GB files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted, in place.

    The safetensors writer keeps metadata in a hash map, so the same tensors and metadata come out
    with the keys in a different order from one process to the next; sorted, identical saves are
    byte-identical. Tensor offsets are relative to the data section, so only the header changes.
    """
    p = Path(path)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
