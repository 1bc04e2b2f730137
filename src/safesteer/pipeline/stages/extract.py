"""The extract stage: the configured datasets through the backbone into an activation store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer import layout
from safesteer.data.rows import check_sources, dataset_rows
from safesteer.errors import SafesteerError
from safesteer.extract import ExtractConfig, extract
from safesteer.extract.distributed import run_extract
from safesteer.models import load_backbone


@dataclass(frozen=True)
class ExtractOutputs:
    acts: Path  # the layer folder of the activation store
    rows: int
    precision: str
    truncated: int
    empty: int


def run_extract_stage(section: tuple, inputs: Mapping[str, Any], out_dir: Path, ctx) -> ExtractOutputs:
    model, data, ex = section
    check_sources(data.sae_datasets, data.source, ctx.data_dir)
    ecfg = ExtractConfig(
        model=model.name,
        datasets=data.sae_datasets,
        layers=[model.layer],
        split="all",
        max_rows=data.max_rows_per_dataset,
        seed=ctx.seed,
        shard_size=ex.shard_size,
        dtype=ex.dtype,
        batch_size=ex.batch_size,
        max_length=model.max_length,
        precision=ex.precision,
        source=data.source,
    )
    bb = load_backbone(
        model.name, max_length=model.max_length, device=ctx.dist.device if ctx.distributed else ctx.device
    )  # every stage detects the kind the same way
    if model.kind != "auto" and bb.kind != model.kind:
        raise SafesteerError(
            f"model.kind = {model.kind!r} but {model.name} is a {bb.kind} LM; fix model.kind or set it "
            'to "auto"'
        )
    rows = list(
        dataset_rows(data.sae_datasets, "all", data.max_rows_per_dataset, ctx.seed, data.source, ctx.data_dir)
    )
    root = out_dir / layout.ACTS
    total = sum(1 for _, r in rows if r.text.strip())
    if ctx.distributed:  # each rank its shards, rank 0 the manifest: the same bytes as one process
        rep = run_extract(bb, rows, root, ecfg, ctx.dist, total=total, progress=ctx.show_progress)
    else:
        rep = extract(bb, rows, root, ecfg, total=total)
    return ExtractOutputs(
        root / layout.layer_folder(model.layer), rep.rows, rep.precision, rep.truncated, rep.empty_skipped
    )
