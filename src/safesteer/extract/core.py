"""Activation extraction: texts -> mean-pooled hidden states, in resumable, validated shards.

Determinism contract: the rows of shard ``k`` are rows ``[k*S, (k+1)*S)`` of the (empty-text
filtered) record stream, and how a shard is batched (length bucketing, batch size, precision)
is a function of that shard's rows alone. A run killed at any moment and re-run therefore gives
files byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from safesteer import __version__
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, save_npy, sha256_file, write_json
from safesteer.models.backbone import Backbone
from safesteer.models.positions import CHAT_POSITIONS, POSITIONS, chat_inputs, pool
from safesteer.store import commits
from safesteer.store.layout import FORMAT, layer_dir, shard_files

#: Settings that change the bytes of a shard; a folder written with others is refused.
IDENTITY_KEYS = (
    "model",
    "datasets",
    "split",
    "max_rows",
    "seed",
    "shard_size",
    "dtype",
    "batch_size",
    "max_length",
    "bucket_window",
    "source",
)


@dataclass
class ExtractConfig:
    model: str
    datasets: list[str]
    layers: list[int]
    split: str = "train"
    max_rows: int | None = None
    seed: int = 0
    shard_size: int = 20_000
    dtype: Literal["float16", "float32"] = "float32"
    batch_size: int = 32
    max_length: int = 512
    bucket_window: int = 0  # 0 = the whole shard is one length-sorting window
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    source: str = "auto"
    pooling: str = "mean"
    position: str = "mean"
    """Where vectors are read (:mod:`safesteer.models.positions`): mean | last | prompt_end (texts
    rendered as chat user messages). ``answer`` needs answers and is built by behaviour.directions."""

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        ident = {k: d[k] for k in IDENTITY_KEYS}
        if self.position != "mean":  # stores written before positions existed keep their identity
            ident["position"] = self.position
        return ident


@dataclass
class ExtractReport:
    rows: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    empty_skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    bf16_min_cosine: float | None = None
    out: list[str] = field(default_factory=list)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        return False


def _log(msg: str) -> None:
    print(f"[safesteer] {msg}", file=sys.stderr, flush=True)


class Extractor:
    """Turns batches of texts into pooled activations for several layers at once."""

    def __init__(
        self,
        backbone: Backbone,
        layers: list[int],
        batch_size: int = 32,
        max_length: int = 512,
        precision: str = "fp32",
        bucket_window: int = 0,
        position: str = "mean",
    ):
        if position not in POSITIONS or position == "answer":
            raise SafesteerError(
                f"extraction position must be one of mean, last, prompt_end; got {position!r}"
            )
        self.position = position
        self._spans: list[tuple[int, int]] = []
        self.bb = backbone
        self.layers = sorted({backbone.check_layer(l) for l in layers})
        self.batch_size = batch_size
        self.max_length = min(max_length, backbone.max_length)
        self.precision = precision
        self.bucket_window = bucket_window
        self.truncated = 0
        self.tokens = 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.position in CHAT_POSITIONS:  # texts are user messages, rendered with the chat template
            ci = chat_inputs(self.bb, texts, max_length=self.max_length)
            self._spans = ci.prompt_end
            self.truncated += ci.n_truncated
            return ci.ids
        enc = self.bb.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)[
            "input_ids"
        ]
        self.truncated += sum(len(x) >= self.max_length for x in enc)
        return enc

    def order(self, lengths: list[int]) -> np.ndarray:
        """Sort by token length inside windows (length bucketing); stable and deterministic."""
        n = len(lengths)
        window = self.bucket_window or n
        lengths_arr = np.asarray(lengths)
        parts = [
            start + np.argsort(lengths_arr[start : start + window], kind="stable")
            for start in range(0, n, window)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _batch_forward(
        self, ids: list[list[int]], spans: list[tuple[int, int]] | None = None
    ) -> dict[int, torch.Tensor]:
        pad = self.bb.tokenizer.pad_token_id or 0
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        input_ids, mask = input_ids.to(self.bb.device), mask.to(self.bb.device)
        self.tokens += int(mask.sum())
        with (
            torch.inference_mode(),
            torch.autocast(self.bb.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            hs = self.bb.forward_layers(input_ids, mask, self.layers)
        sp = torch.tensor(spans, device=mask.device) if spans is not None else None
        return {l: pool(h.float(), mask, self.position, sp) for l, h in hs.items()}

    def run(self, texts: list[str], progress=None) -> dict[int, np.ndarray]:
        """Pooled float32 vectors (rows × d) per layer, in the order of ``texts``."""
        ids = self.tokenize(texts)
        order = self.order([len(x) for x in ids])
        out = {l: np.zeros((len(texts), self.bb.d_model), dtype=np.float32) for l in self.layers}
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            spans = [self._spans[i] for i in idx] if self.position in CHAT_POSITIONS else None
            pooled = self._batch_forward([ids[i] for i in idx], spans)
            for l, v in pooled.items():
                out[l][idx] = v.cpu().numpy()
            if progress is not None:
                progress(len(idx))
        return out


def choose_precision(
    backbone: Backbone, layers: list[int], texts: list[str], requested: str, threshold: float = 0.999
) -> tuple[str, float | None]:
    """bf16 autocast when the CPU supports it and pooled vectors keep cosine ≥ ``threshold`` vs fp32."""
    if requested == "fp32":
        return "fp32", None
    if not bf16_supported(backbone.device):
        if requested == "bf16":
            raise SafesteerError(
                f"this {backbone.device.type.upper()} has no bf16 support; use --precision fp32 or auto"
            )
        _log(f"bf16 not supported on this {backbone.device.type.upper()}: extracting in fp32")
        return "fp32", None
    sample = [t for t in texts[:16]]
    ref = Extractor(backbone, layers, batch_size=len(sample), precision="fp32").run(sample)
    low = Extractor(backbone, layers, batch_size=len(sample), precision="bf16").run(sample)
    cos = min(
        float(
            np.min(
                np.sum(ref[l] * low[l], 1)
                / (np.linalg.norm(ref[l], axis=1) * np.linalg.norm(low[l], axis=1) + 1e-12)
            )
        )
        for l in ref
    )
    if cos >= threshold or requested == "bf16":
        return "bf16", cos
    _log(f"bf16 pooled vectors reach cosine {cos:.5f} < {threshold} vs fp32: falling back to fp32")
    return "fp32", cos


def _shards(
    rows: Iterable[tuple[str, Any]], size: int, report: ExtractReport
) -> Iterator[list[tuple[str, Any]]]:
    buf: list[tuple[str, Any]] = []
    for name, rec in rows:
        if not rec.text or not rec.text.strip():
            report.empty_skipped += 1
            continue
        buf.append((name, rec))
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _plan_sha(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _meta_frame(chunk: list[tuple[str, Any]]) -> pd.DataFrame:
    records = []
    for name, rec in chunk:
        row = {"id": rec.id, "dataset": name, "split": rec.split, "source": rec.source}
        for k, v in rec.labels.items():
            row[f"{k}"] = v
        records.append(row)
    df = pd.DataFrame.from_records(records)
    for col in df.columns[4:]:
        present = df[col][df[col].notna()]
        if len(present) and present.map(lambda x: isinstance(x, str)).all():
            df[col] = df[col].where(df[col].notna(), None).astype(object)
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def _new_manifest(cfg: ExtractConfig, backbone: Backbone, layer: int) -> dict:
    import transformers  # transformers: only its version, for the manifest

    return {
        "format": FORMAT,
        "model": cfg.model,
        "model_source": backbone.source,
        "model_class": type(backbone.model).__name__,
        "kind": backbone.kind,
        "layer": layer,
        "n_layers": backbone.n_layers,
        "pooling": {
            "mean": "mean over real tokens (attention mask)",
            "last": "last real token",
            "prompt_end": "mean over the chat template's tokens after the user content",
        }[cfg.position],
        "position": cfg.position,
        "dtype": cfg.dtype,
        "d": backbone.d_model,
        "rows_per_shard": cfg.shard_size,
        "identity": cfg.identity(),
        "config": asdict(cfg),
        "versions": {
            "safesteer": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "precision": None,
        "labels": [],
        "datasets": {},
        "shards": [],
        "complete": False,
    }


def _shard_entry_ok(folder: Path, entry: dict) -> bool:
    try:
        return all(sha256_file(folder / entry["files"][k]) == entry["sha256"][k] for k in entry["files"])
    except FileNotFoundError:
        return False


def extract(
    backbone: Backbone,
    rows: Iterable[tuple[str, Any]],
    out: str | Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    total: int | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    sync: Callable[[], None] | None = None,
) -> ExtractReport:
    """Extract pooled activations of ``rows`` ((dataset name, Record) pairs) into ``out``.

    ``rank``/``world``/``sync`` (see :mod:`safesteer.extract.distributed`): with ``world`` > 1 this rank
    computes only the shards ``k`` with ``k % world == rank``, commits each with a record
    (:mod:`safesteer.store.commits`) instead of rewriting the manifest, and after ``sync()`` (a
    barrier) rank 0 folds every rank's records into the manifest. The bytes are those of ``world=1``.
    """
    out = Path(out)
    layers = sorted({backbone.check_layer(l) for l in cfg.layers})
    if cfg.shard_size <= 0 or cfg.batch_size <= 0:
        raise SafesteerError("--shard-size and --batch-size must be positive")
    if cfg.position not in ("mean", "last", "prompt_end"):
        raise SafesteerError(
            f"unknown extraction position {cfg.position!r}; valid choices: mean, last, prompt_end"
        )
    if cfg.dtype not in ("float16", "float32"):
        raise SafesteerError(f"unknown dtype {cfg.dtype!r}; valid choices: float16, float32")
    report = ExtractReport()
    manifests: dict[int, dict] = {}
    replace: list[Path] = []
    for l in layers:
        folder = layer_dir(out, l)
        mpath = folder / "manifest.json"
        if mpath.exists():
            old = read_json(mpath)
            if old.get("identity") != cfg.identity() or old.get("layer") != l:
                if not overwrite:
                    diff = [k for k in IDENTITY_KEYS if old.get("identity", {}).get(k) != cfg.identity()[k]]
                    raise SafesteerError(
                        f"{folder} holds activations from a different run (differs in: "
                        f"{', '.join(diff) or 'format'}); "
                        "pass --overwrite to replace it or choose another --out"
                    )
                replace.append(folder)
            else:
                manifests[l] = old
        if l not in manifests:
            if folder.exists() and overwrite and folder not in replace:
                replace.append(folder)
            manifests[l] = _new_manifest(cfg, backbone, l)
    if sync is not None:
        sync()  # every rank has read the old manifests ...
    if rank == 0:
        for folder in replace:
            shutil.rmtree(folder)
    if sync is not None:
        sync()  # ... and rank 0 has removed what --overwrite replaces before anyone writes
    for l in layers:
        layer_dir(out, l).mkdir(parents=True, exist_ok=True)
        commits.apply_commits(manifests[l], commits.read_commits(layer_dir(out, l), cfg.identity()))

    precision = manifests[layers[0]].get("precision")
    extractor: Extractor | None = None
    bar = None
    if progress:
        bar = tqdm(
            total=total,
            unit="rows",
            desc=f"extract L{','.join(map(str, layers))}",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
    t0 = time.perf_counter()
    n_chunks = 0
    for index, chunk in enumerate(_shards(rows, cfg.shard_size, report)):
        n_chunks = index + 1
        if world > 1 and index % world != rank:
            if index == 0 and precision is None:  # every rank decides on shard 0, as one process would
                precision, report.bf16_min_cosine = choose_precision(
                    backbone, layers, [r.text for _, r in chunk], cfg.precision
                )
                for m in manifests.values():
                    m["precision"], m["bf16_min_cosine"] = precision, report.bf16_min_cosine
            continue
        ids = [rec.id for _, rec in chunk]
        plan = _plan_sha(ids)
        entries = {l: next((s for s in manifests[l]["shards"] if s["index"] == index), None) for l in layers}
        if all(
            e is not None and e["plan_sha256"] == plan and _shard_entry_ok(layer_dir(out, l), e)
            for l, e in entries.items()
        ):
            report.shards_skipped += 1
            report.rows += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            continue
        texts = [rec.text for _, rec in chunk]
        if extractor is None:
            if precision is None:
                precision, cos = choose_precision(backbone, layers, texts, cfg.precision)
                report.bf16_min_cosine = cos
                for m in manifests.values():
                    m["precision"], m["bf16_min_cosine"] = precision, cos
            extractor = Extractor(
                backbone, layers, cfg.batch_size, cfg.max_length, precision, cfg.bucket_window, cfg.position
            )
        trunc_before = extractor.truncated
        pooled = extractor.run(texts, progress=bar.update if bar is not None else None)
        n_trunc = extractor.truncated - trunc_before
        meta = _meta_frame(chunk)
        for l in layers:
            H = pooled[l]
            bad = np.flatnonzero(~np.isfinite(H).all(axis=1))
            if len(bad):
                names = ", ".join(ids[i] for i in bad[:5])
                raise SafesteerError(
                    f"NaN/Inf activations in shard {index} at layer {l} for rows {names}; shard not "
                    "written (try --precision fp32)"
                )
            folder = layer_dir(out, l)
            files = shard_files(index)
            save_npy(folder / files["H"], H.astype(cfg.dtype))
            save_npy(folder / files["ids"], np.asarray(ids, dtype=str))
            with atomic_path(folder / files["meta"]) as tmp:
                meta.to_parquet(tmp, index=False)
            entry = {
                "index": index,
                "rows": len(chunk),
                "files": files,
                "sha256": {k: sha256_file(folder / f) for k, f in files.items()},
                "plan_sha256": plan,
                "truncated": n_trunc,
            }
            m = manifests[l]
            m["shards"] = sorted(
                [s for s in m["shards"] if s["index"] != index] + [entry], key=lambda s: s["index"]
            )
            m["labels"] = sorted(set(m["labels"]) | set(meta.columns[4:]))
            counts = [(name, int(count)) for name, count in meta["dataset"].value_counts().items()]
            for name, count in counts:
                m["datasets"].setdefault(name, {})[str(index)] = count
            if world > 1:
                commits.write_commit(
                    folder,
                    entry,
                    labels=list(meta.columns[4:]),
                    datasets=counts,
                    precision=precision,
                    bf16_min_cosine=m.get("bf16_min_cosine"),
                    identity=cfg.identity(),
                )
            else:
                write_json(folder / "manifest.json", m)
        report.shards_done += 1
        report.rows += len(chunk)
    report.seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    n_shards = n_chunks
    if sync is not None:
        sync()  # every rank has committed its shards
    if world > 1 and rank != 0:
        report.precision = precision or "fp32"
        return report
    for l in layers:
        m = manifests[l]
        commits.apply_commits(m, commits.read_commits(layer_dir(out, l), cfg.identity()))
        have = {int(s["index"]) for s in m["shards"]}
        lost = sorted(set(range(n_shards)) - have)
        if lost:
            raise SafesteerError(
                f"shard(s) {lost[:5]} of {layer_dir(out, l)} were not committed by their rank; "
                "re-run the same command to compute them (the manifest is left incomplete)"
            )
        m["datasets"] = commits.canonical_datasets(m["datasets"])
        m["shards"] = [s for s in m["shards"] if s["index"] < n_shards]
        m["complete"] = True
        m["n_rows"] = int(sum(s["rows"] for s in m["shards"]))
        m["empty_skipped"] = report.empty_skipped
        m["truncated"] = int(sum(s.get("truncated", 0) for s in m["shards"]))
        write_json(layer_dir(out, l) / "manifest.json", m)
        commits.clear_commits(layer_dir(out, l))
        report.out.append(str(layer_dir(out, l)))
    report.truncated = int(manifests[layers[0]]["truncated"])
    if extractor is not None:
        report.tokens = extractor.tokens
    report.precision = precision or "fp32"
    return report
