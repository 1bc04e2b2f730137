"""``safesteer export …`` / ``safesteer import …``: hand policies and SAEs to other tools, and take theirs.

* ``export control-vector`` — a policy as a llama.cpp control-vector GGUF (α folded in).
* ``import control-vector`` — a control-vector GGUF (ours, repeng's, llama.cpp's) as a direction set
  (+ a policy per layer, α = the vector's norm) for ``safesteer serve``.
* ``export lm-eval`` — a policy as lm-evaluation-harness' steering CSV.
* ``import saelens`` — a SAELens SAE folder (gated or standard) as a safesteer SAE folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json


def _policy_and_directions(policy: Path, directions: Path):
    from safesteer.steering import DirectionSet

    if not policy.is_file():
        raise SafesteerError(
            f"no policy file at {policy}; write one (the body of PUT /v1/policies/NAME) or use the "
            "serve policies folder"
        )
    raw = read_json(policy)
    if not isinstance(raw, dict):
        raise SafesteerError(f"{policy} is not a policy (expected a JSON object)")
    raw = dict(raw)
    if raw.get("format") != "safesteer-policy":
        raw.setdefault("name", policy.stem)
    return raw, DirectionSet.load(directions)


def _model_hint(model: str) -> str:
    from transformers import AutoConfig

    from safesteer.models.registry import resolve_model

    return str(AutoConfig.from_pretrained(resolve_model(model).path).model_type)


def export_control_vector(
    policy: Path = typer.Option(
        ..., "--policy", help="Policy JSON (a serve policies/*.json file or a PUT body)."
    ),
    directions: Path = typer.Option(
        ..., "--directions", help="Direction-set folder the policy names directions from."
    ),
    out: Path = typer.Option(..., "--out", help="Control-vector file to write (.gguf)."),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="Model the policy is for (its type becomes controlvector.model_hint)."
    ),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", help="Override the policy's alpha (folded into the vector)."
    ),
) -> None:
    """Write a policy's steering as a llama.cpp control vector: use it with --control-vector FILE (strength
    1)."""
    from safesteer.interop.gguf_control import policy_control_vector, write_control_vector

    pol, ds = _policy_and_directions(policy, directions)
    cv, info = policy_control_vector(pol, ds, _model_hint(model), alpha)
    write_control_vector(cv, out, info)
    typer.echo(
        f"wrote {out}: direction.{info['layer']} = {info['alpha']:g} * -d ({cv.d_model} values, "
        f"model_hint {cv.model_hint}); llama.cpp: --control-vector {out}"
    )


def import_control_vector(
    path: Path = typer.Argument(..., help="Control-vector GGUF."),
    out: Path = typer.Option(..., "--out", help="Folder for the direction set and policies/."),
    name: str = typer.Option("cvec", "--name", help="Direction (and policy) name."),
) -> None:
    """Read a control vector into a direction set (unit direction toward unsafe = -v/|v|) and one policy per
    layer (alpha = |v|)."""
    from safesteer.interop.gguf_control import read_control_vector, to_directions

    cv = read_control_vector(path)
    ds, alphas = to_directions(cv, name)
    ds.save(out)
    for key, a in alphas.items():
        write_json(
            out / "policies" / f"{key}.json",
            {
                "directions": [key],
                "alpha": a,
                "description": f"imported from {path.name} (model_hint {cv.model_hint or '?'})",
            },
        )
    typer.echo(
        f"wrote {out}: {len(ds)} direction(s) at layer(s) {', '.join(str(d.layer) for _, d in ds.items())}; "
        f"serve with --directions {out} --policies {out / 'policies'}"
    )


def export_lm_eval_csv(
    policy: Path = typer.Option(..., "--policy", help="Policy JSON."),
    directions: Path = typer.Option(..., "--directions", help="Direction-set folder."),
    out: Path = typer.Option(
        ..., "--out", help="CSV to write (a <stem>.features/ folder is written beside it)."
    ),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Override the policy's alpha."),
) -> None:
    """Write a policy as lm-evaluation-harness' steering CSV (model 'safesteer-steered', see the README)."""
    from safesteer.interop.lm_eval import export_lm_eval

    pol, ds = _policy_and_directions(policy, directions)
    export_lm_eval(pol, ds, out, alpha)
    typer.echo(
        f'wrote {out}; run: python -c "import safesteer.interop.lm_eval as s, sys; '
        's.cli_evaluate(sys.argv[1:])" '
        f"--model safesteer-steered --model_args pretrained=MODEL_PATH,steer_path={out} --tasks TASK"
    )


def import_saelens(
    path: Path = typer.Argument(..., help="SAELens SAE folder (cfg.json + sae_weights.safetensors)."),
    out: Path = typer.Option(..., "--out", help="safesteer SAE folder to write."),
) -> None:
    """Convert a SAELens SAE (gated or standard ReLU) into a safesteer SAE folder (encode, map, steer)."""
    from safesteer.interop.saelens import import_saelens as _import

    _import(path, out)
    cfg = json.loads((out / "cfg.json").read_text())
    typer.echo(
        f"wrote {out}: d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, layer {cfg['metadata'].get('hook_layer')}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``export`` and ``import`` command groups."""
    exp = typer.Typer(help="Hand policies to other tools (llama.cpp, lm-eval).", no_args_is_help=True)
    exp.command("control-vector")(export_control_vector)
    exp.command("lm-eval")(export_lm_eval_csv)
    imp = typer.Typer(
        help="Take other tools' artefacts (control vectors, SAELens SAEs).", no_args_is_help=True
    )
    imp.command("control-vector")(import_control_vector)
    imp.command("saelens")(import_saelens)
    app.add_typer(exp, name="export")
    app.add_typer(imp, name="import")
