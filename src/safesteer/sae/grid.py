"""Grid search over expansion x L1 coefficient, then the best configuration to convergence.

Each grid point trains in ``OUT/grid/x<K>-l1_<lambda>/`` (its own checkpoints, metrics and SAE)
for ``grid_epochs`` with ``grid_patience`` (the study: 5 epochs, patience 2). The results table
is sorted by best validation loss and reports L0/FVU at the best epoch (the shape of the
study's Table 1). The winner is then *continued* from its own checkpoint -- same weights,
optimiser state and data position -- up to ``final_epochs`` with ``final_patience`` (the study:
20 epochs, patience 3), and its best weights are written to ``OUT/sae``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from safesteer.errors import SafesteerError
from safesteer.io import write_json
from safesteer.sae.config import TrainConfig
from safesteer.sae.saving import save_sae
from safesteer.sae.trainer import BatchSource, Trainer, TrainResult


@dataclass
class GridResult:
    rows: list[dict[str, Any]]  # sorted by best validation loss
    best: dict[str, Any]
    final: TrainResult
    table: str


def grid_name(expansion: int, l1: float) -> str:
    return f"x{int(expansion)}-l1_{l1:g}"


def run_grid(
    batches: BatchSource,
    d_in: int,
    base: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    expansions: Sequence[int] = (32, 64),
    l1s: Sequence[float] = (1e-4, 5e-5),
    grid_epochs: int = 5,
    grid_patience: int = 2,
    final_epochs: int = 20,
    final_patience: int = 3,
    resume: bool = False,
    device: str = "cpu",
    data_identity: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_run: Callable[[str, TrainConfig], None] | None = None,
    sae_metadata: dict[str, Any] | None = None,
    fit: Callable[[TrainConfig, Path, bool], TrainResult] | None = None,
    is_writer: bool = True,
) -> GridResult:
    """``fit(cfg, folder, resume)``: how one run is trained (default: a :class:`Trainer` here; a
    distributed run passes :func:`safesteer.sae.distributed.train_distributed`); only a writer
    writes the grid's files."""
    if fit is None:

        def fit(cfg: TrainConfig, folder: Path, resume: bool) -> TrainResult:
            return Trainer(
                cfg,
                d_in,
                folder,
                device=device,
                data_identity=data_identity,
                on_step=on_step,
                on_epoch=on_epoch,
                sae_metadata=sae_metadata,
            ).fit(batches, resume=resume)

    if not expansions or not l1s:
        raise SafesteerError("the grid needs at least one expansion and one L1 coefficient")
    for k in expansions:
        if not k > 0:
            raise SafesteerError(f"expansion must be > 0 (got {k})")
    for lam in l1s:
        if not lam > 0:
            raise SafesteerError(f"the L1 coefficient must be > 0 (got {lam})")
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for k in expansions:
        for lam in l1s:
            cfg = base.replace(expansion=int(k), l1=float(lam), epochs=grid_epochs, patience=grid_patience)
            cfg.validate()
            folder = out / "grid" / grid_name(k, lam)
            if on_run is not None:
                on_run(folder.name, cfg)
            res = fit(cfg, folder, resume)
            rows.append(_row(k, lam, res, folder))
    rows.sort(key=lambda r: float("inf") if r["best_val_loss"] is None else r["best_val_loss"])
    best = rows[0]
    table = grid_table(rows)
    if is_writer:
        write_json(out / "grid_results.json", {"rows": rows, "best": best["name"]})
        (out / "grid.md").write_text(table)
    # continue the winner from its own checkpoint to convergence
    cfg = base.replace(
        expansion=best["expansion"], l1=best["l1"], epochs=final_epochs, patience=final_patience
    )
    if on_run is not None:
        on_run(f"{best['name']} (final)", cfg)
    final = fit(cfg, Path(best["folder"]), True)
    final_dir = out / "sae"
    if not is_writer:
        return GridResult(rows=rows, best=best, final=final, table=table)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    save_sae(final.sae, final_dir, extra={"grid": best["name"]})
    write_json(
        out / "grid_results.json",
        {
            "rows": rows,
            "best": best["name"],
            "final": {
                "epochs": len(final.history),
                "best_epoch": final.best_epoch,
                "best_val_loss": final.best_val_loss,
                "stopped": final.stopped,
                "sae": str(final_dir),
            },
        },
    )
    return GridResult(rows=rows, best=best, final=final, table=table)


def _row(k: int, lam: float, res: TrainResult, folder: Path) -> dict[str, Any]:
    best_h = None
    if res.best_epoch is not None:
        best_h = next((h for h in res.history if h["epoch"] == res.best_epoch), None)
    v = (best_h or {}).get("val") or {}
    return {
        "name": folder.name,
        "expansion": int(k),
        "l1": float(lam),
        "best_val_loss": res.best_val_loss,
        "best_epoch": res.best_epoch,
        "l0": v.get("l0"),
        "fvu": v.get("fvu"),
        "val_mse": v.get("mse"),
        "gamma": v.get("gamma"),
        "dead_fraction": (best_h or {}).get("dead_fraction"),
        "epochs_run": len(res.history),
        "stopped": res.stopped,
        "folder": str(folder),
    }


def grid_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rank | expansion | L1 | best val loss | epoch | L0 | FVU | dead % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):

        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines.append(
            f"| {i} | {r['expansion']}x | {r['l1']:g} | {f(r['best_val_loss'], '.6g')} | "
            f"{f(r['best_epoch'], 'd')} | "
            f"{f(r['l0'], '.1f')} | {f(r['fvu'], '.4f')} | "
            f"{f(None if r['dead_fraction'] is None else 100 * r['dead_fraction'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"
