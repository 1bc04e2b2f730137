"""`safesteer run`: the whole pipeline from one config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        config: Optional[Path] = typer.Option(
            None, "--config", help="TOML config (default: the embedded default, = configs/default.toml)."
        ),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<run.name>)."),
        stages: Optional[str] = typer.Option(
            None, "--stages", help="Comma-separated subset of stages to (re)compute; others must be cached."
        ),
    ) -> None:
        """Run datasets → extract → SAE grid → encode → probes → map → atoms → evaluate → report, with stage
        caching."""
        from safesteer.config import load_config
        from safesteer.pipeline.runner import Pipeline

        cfg = load_config(config)
        folder = out or Path("runs") / cfg.run.name
        only = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        pipe = Pipeline(cfg, folder, only)
        html = pipe.run()
        ran = (
            ", ".join(f"{k} {v:.0f}s" for k, v in pipe.timings.items() if k != "total")
            or "nothing (all cached)"
        )
        typer.echo(f"computed: {ran}; total {pipe.timings.get('total', 0.0):.0f}s")
        if html is not None:
            typer.echo(f"report: {html.resolve()}")
