"""From run to service: the recommended conditional policy with everything it needs, in one folder.

``safesteer run`` writes ``<run>/policies/`` (from the behaviour stage's ``policy/``):

* ``recommended.json`` — the calibrated conditional policy in the service's policy file format
  (:mod:`safesteer.serve.policies`): the chosen direction, the steering layer, α in raw units
  (α × the layer's median residual norm), and a condition on the harm gate with the calibrated
  logit threshold at its position (``prompt`` or ``prompt_end``); ``provenance`` records the validation choice
  and the test figures. Or ``NONE.txt`` — one line saying why no policy is recommended;
* ``gate/`` — the gate (:class:`~safesteer.steering.condition.Condition`: w, b, W1, b1 for an MLP gate, layer,
  position);
* ``directions/`` — a :class:`~safesteer.steering.DirectionSet` with the policy's direction.

``safesteer serve --run runs/NAME`` loads the model named in the run's config, these directions,
the gate (as probe ``harm_gate``) and the folder's policies (:func:`load_bundle`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safesteer.config import load_config
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json
from safesteer.serve.engine import GateProbe, ServedProbe
from safesteer.steering.condition import Condition
from safesteer.steering.strategies import DirectionSet

POLICY_NAME = "recommended"
GATE_PROBE = "harm_gate"
NONE_FILE = "NONE.txt"
GATE_DIR, DIRECTIONS_DIR = "gate", "directions"


def _none(out: Path, reason: str) -> bool:
    with atomic_path(out / NONE_FILE) as tmp:
        tmp.write_text(f"no policy recommended: {reason}\n")
    return False


def write_bundle(
    summary: dict[str, Any] | None,
    study_dir: str | Path,
    out_dir: str | Path,
    model: str,
    require_gain: bool = True,
) -> bool:
    """Write the service bundle of a behaviour study into ``out_dir``; True when a policy is recommended
    (the feasible conditional policy chosen on validation, when it raised harmful refusal there;
    ``require_gain=False`` packages it even without a gain)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if summary is None:
        return _none(out, "the behaviour stage did not run (see its summary.json)")
    res = (summary.get("test") or {}).get("conditional")
    if not res:
        return _none(
            out,
            f"no conditional strategy met the constraints on validation (XSTest-safe over-refusal <= "
            f"+{summary['config']['max_safe_pp']} pp, harmless fluency within "
            f"{100 * summary['config']['max_fluency_rel']:.0f}%)",
        )
    c = res["policy"]
    if require_gain and not c["harmful_gain_pp"] > 0:
        return _none(
            out,
            f"the best feasible conditional policy ({c['strategy']} alpha={c['alpha']}) did not raise "
            "harmful refusal on validation",
        )
    study = Path(study_dir)
    scale = float(summary["directions"]["scale_median_norm"])
    layer = int(summary["config"]["layer"])
    gate = Condition.load(study / GATE_DIR).with_threshold(float(c["threshold"]))
    gate.name = GATE_PROBE
    gate.save(out / GATE_DIR)
    dirs = DirectionSet.load(study / DIRECTIONS_DIR)
    keep = DirectionSet()
    keep.add(dirs[c["strategy"]])
    keep.save(out / DIRECTIONS_DIR)
    raw = float(c["alpha"]) * scale
    test = {k: res[k] for k in ("harmful_refusal", "safe_refusal", "p_yes", "harmless_fluency") if k in res}
    where = str(summary["config"].get("steer_positions", "all"))
    policy = {
        "description": (
            f"{c['strategy']} at layer {layer} ({where} positions), alpha {c['alpha']} x median norm, "
            "only when the harm gate "
            f"(layer {gate.layer}, {gate.position}) fires; calibrated on validation to "
            f"{100 * c['fpr']:g}% gate FPR"
        ),
        "directions": [c["strategy"]],
        "layer": layer,
        "alpha": raw,
        "alpha_min": 0.0,
        "alpha_max": raw,
        "condition": {
            "probe": GATE_PROBE,
            "score_threshold": float(c["threshold"]),
            "position": gate.position,
            **({"segments": True} if gate.meta.get("segments") else {}),
        },
        "positions": where,
    }
    write_json(
        out / f"{POLICY_NAME}.json",
        {
            "format": "safesteer-policy",
            "name": POLICY_NAME,
            "version": 1,
            "updated_at": 0.0,
            "policy": policy,
            "provenance": {
                "model": model,
                "strategy": c["strategy"],
                "alpha_norm": float(c["alpha"]),
                "scale_median_norm": scale,
                "gate_fpr": c["fpr"],
                "validation": c,
                "test": test,
                "max_new_tokens": int(summary["config"]["max_new_tokens"]),
                "gate": GATE_DIR,
                "directions": DIRECTIONS_DIR,
            },
        },
    )
    return True


def publish(bundle_dir: str | Path, run_dir: str | Path) -> Path:
    """Copy a stage's bundle to ``<run>/policies`` (replacing the previous one as a whole)."""
    src, dst = Path(bundle_dir), Path(run_dir) / "policies"
    tmp = dst.with_name(".policies.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(".policies.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def load_bundle(run_dir: str | Path) -> dict[str, Any]:
    """What ``serve --run`` needs: model name, policies folder, directions and the gate probe."""
    run = Path(run_dir)
    pol = run / "policies"
    if not (run / "config.toml").is_file():
        raise SafesteerError(
            f"{run} is not a run folder (no config.toml); pass the folder `safesteer run --out` wrote"
        )
    if not pol.is_dir():
        raise SafesteerError(
            f"{run} has no policies/ folder; finish the run (`safesteer run`) so that it writes one"
        )
    cfg = load_config(run / "config.toml")
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "policies": pol,
        "directions": None,
        "probes": {},
        "none": None,
        "provenance": None,
    }
    if (pol / NONE_FILE).is_file():
        out["none"] = (pol / NONE_FILE).read_text().strip()
    if (pol / DIRECTIONS_DIR / "directions.json").is_file():
        out["directions"] = DirectionSet.load(pol / DIRECTIONS_DIR)
    if (pol / GATE_DIR / "condition.json").is_file():
        gate = Condition.load(pol / GATE_DIR)
        out["probes"][GATE_PROBE] = ServedProbe(GATE_PROBE, GateProbe(gate), gate.layer, gate.position)
    if (pol / f"{POLICY_NAME}.json").is_file():
        out["provenance"] = read_json(pol / f"{POLICY_NAME}.json").get("provenance")
    return out
