"""`safesteer directions` (build a direction set) and `safesteer evaluate` (the evaluation suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from safesteer.errors import SafesteerError


def _floats(value: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise SafesteerError(f"{what} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise SafesteerError(f"{what} is empty")
    return out


def _random_alpha(value: str) -> str | float:
    if value in ("max", "each"):
        return value
    try:
        return float(value)
    except ValueError:
        raise SafesteerError(f"--random-alpha must be max, each or a number, got {value!r}") from None


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
        probe_tox: Optional[Path] = typer.Option(None, "--probe-tox", help="Toxicity probe folder (probe.json)."),
        probe_harm: Optional[Path] = typer.Option(None, "--probe-harm", help="Harm probe folder (probe.json)."),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder (for sae_* strategies)."),
        atoms: list[str] = typer.Option([], "--atoms", help="NAME=CSV atom selection, NAME in tox_top20, tox_all, tox_filtered, harm_top20, …; repeatable."),
        d_model: Optional[int] = typer.Option(None, "--d-model", help="Width, when only the random control is built."),
        seed: int = typer.Option(1234, "--seed", help="Seed of the first random control direction."),
        random_members: int = typer.Option(4, "--random-members", help="Directions in the random control ensemble."),
    ) -> None:
        """Build the named steering directions (unit vectors toward unsafe) from probes and SAE atoms."""
        from safesteer.steering import build_directions

        probes, sources = {}, {}
        if probe_tox or probe_harm:
            from safesteer.probes import load_probe

            for key, path in (("tox", probe_tox), ("harm", probe_harm)):
                if path is not None:
                    probes[key] = load_probe(path)
                    sources[f"probe_{key}"] = str(path)
        sae_obj = None
        if sae is not None:
            from safesteer.sae import load_sae

            sae_obj = load_sae(sae)
            sources["sae"] = str(sae)
        atom_sel = _atoms_option(atoms)
        if atom_sel and sae_obj is None:
            raise SafesteerError("--atoms needs --sae (the decoder rows come from the SAE)")
        ds = build_directions(layer, probes, sae_obj, atom_sel, d_model=d_model, seed=seed, sources=sources,
                              random_members=random_members)
        ds.save(out)
        typer.echo(f"wrote {len(ds)} directions to {out}: {', '.join(ds.names())}")

    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Option("smollm2-135m", "--model", help="Alias (smollm2-135m), local folder or hub id."),
        layer: int = typer.Option(..., "--layer", help="Steering layer (0-based block output)."),
        directions: Path = typer.Option(..., "--directions", help="Folder written by `safesteer directions`."),
        out: Path = typer.Option(..., "--out", help="Output folder (results.csv/json, table.csv, plots/)."),
        strategies: Optional[str] = typer.Option(None, "--strategies", help="Comma-separated strategy names (default: all in the set)."),
        alphas: str = typer.Option("-1,-0.5,-0.25,-0.1,0.1,0.25,0.5,1", "--alphas", help="α grid (comma-separated); one value = no calibration. α ≥ 0 steers away from unsafe."),
        alpha_unit: str = typer.Option("norm", "--alpha-unit", help="norm (× median token norm at the layer) or raw."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics (default: all that can run)."),
        max_prompts: int = typer.Option(100, "--max-prompts", help="Test items per metric (and per bias benchmark unless --max-bias)."),
        max_bias: Optional[int] = typer.Option(None, "--max-bias", help="Rows of CrowS-Pairs / StereoSet (default: --max-prompts)."),
        calib_prompts: int = typer.Option(40, "--calib-prompts", help="Validation items per α during calibration."),
        objective: str = typer.Option("yes_harmful", "--objective", help="Calibration safety metric: yes_harmful, harm_probe, tox_probe, yes_toxic."),
        budget: float = typer.Option(0.10, "--budget", help="Fluency budget: max relative per-token NLL increase on validation."),
        random_alpha: str = typer.Option("max", "--random-alpha", help="α of the random control: max (largest chosen |α|), each (one row per chosen α) or a number."),
        probe_tox: Optional[Path] = typer.Option(None, "--probe-tox", help="Toxicity probe for the ΔP efficacy metric."),
        probe_harm: Optional[Path] = typer.Option(None, "--probe-harm", help="Harm probe for the ΔP efficacy metric."),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder, for --clamp strategies."),
        clamp: list[str] = typer.Option([], "--clamp", help="NAME=CSV: SAE clamping of those atoms as strategy clamp_NAME (needs --sae); repeatable."),
        lambdas: str = typer.Option("0.5,1,2", "--lambdas", help="Clamping grid λ (codes lowered by λ, floored at 0)."),
        generation: bool = typer.Option(False, "--generation/--no-generation", help="Greedy answers + refusal rates (causal LMs; slow)."),
        max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
        n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap resamples."),
        ci_method: str = typer.Option("percentile", "--ci", help="percentile or bca."),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(16, "--batch-size"),
        source: str = typer.Option("auto", "--source", help="auto, local, pypi or hub."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="SAFESTEER_DATA_DIR", help="Offline data folder."),
        plots: bool = typer.Option(True, "--plots/--no-plots"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    ) -> None:
        """Evaluate steering strategies: safety, over-refusal, fluency and bias, with 95% CIs vs unsteered."""
        from rich.console import Console

        from safesteer.evaluate.suite import METRICS, SuiteConfig, run_suite, write_outputs
        from safesteer.models import load_backbone
        from safesteer.steering import DirectionSet

        console = Console(stderr=True)
        alpha_list = _floats(alphas, "--alphas")
        metric_list = _names(metrics)
        if ci_method not in ("percentile", "bca"):
            raise SafesteerError(f"--ci must be percentile or bca, got {ci_method!r}")
        ds = DirectionSet.load(directions)
        strat = _names(strategies)
        if strat:
            for s in strat:
                if not s.startswith("clamp_"):
                    ds[s]  # unknown names fail before the model loads
        layers = {ds[n].layer for n in (strat or ds.names()) if n in ds}
        if layers - {layer}:
            console.print(f"[yellow]note:[/] directions were built for layer(s) {sorted(layers)}; steering at --layer {layer}")
        probes = {}
        if probe_tox or probe_harm:
            from safesteer.probes import load_probe

            for key, path in (("tox", probe_tox), ("harm", probe_harm)):
                if path is not None:
                    probes[key] = load_probe(path)
        interventions = None
        clamp_sel = _atoms_option(clamp)
        if clamp_sel:
            if sae is None:
                raise SafesteerError("--clamp needs --sae")
            from safesteer.sae import load_sae
            from safesteer.steering import ClampEdit, Intervention

            sae_obj = load_sae(sae)
            interventions = {
                f"clamp_{name}": (lambda lam, atoms=atoms, name=name: Intervention(
                    f"clamp_{name}", layer, edit=ClampEdit(sae_obj, atoms, lam=lam, mode="subtract")))
                for name, atoms in clamp_sel.items()
            }
            if strat:
                strat = strat + [n for n in interventions if n not in strat]
        cfg = SuiteConfig(
            layer=layer, strategies=strat, alphas=alpha_list, lambdas=_floats(lambdas, "--lambdas"), alpha_unit=alpha_unit, calibrate=len(alpha_list) > 1,
            objective=objective, budget=budget, random_alpha=_random_alpha(random_alpha),
            max_prompts=max_prompts, max_bias=max_bias, calib_prompts=calib_prompts,
            generation=generation, max_new_tokens=max_new_tokens, n_boot=n_boot, ci_method=ci_method, seed=seed,
            batch_size=batch_size, data_dir=str(data_dir) if data_dir else None, source=source,
        )
        if metric_list:
            cfg.metrics = metric_list
        elif generation:
            cfg.metrics = list(METRICS)
        with console.status("loading model…"):
            from safesteer.devices import resolve_device

            bb = load_backbone(model, device=resolve_device(device))
        bb.check_layer(layer)
        if ds.d_model != bb.d_model:
            raise SafesteerError(f"directions have size {ds.d_model} but {model} has d_model {bb.d_model}; build them for this model")
        with console.status("evaluating…") as status:
            def progress(msg: str) -> None:
                status.update(msg)
                console.log(msg)

            result = run_suite(bb, ds, cfg, probes=probes, progress=progress, interventions=interventions)
        paths = write_outputs(result, out, plots=plots)
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
        delta = "" if r["strategy"] == "unsteered" else format_ci(r["delta"], r["delta_low"], r["delta_high"], signed=True)
        p = "" if r["strategy"] == "unsteered" else f"{r['p_value']:.3g}"
        table.add_row(str(r["strategy"]), f"{r['alpha']:g}", str(r["metric"]), f"{r['value']:.4f}", delta, p)
    console.print(table)
