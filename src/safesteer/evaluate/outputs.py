"""What a suite run returns (:class:`SuiteResult`) and the files written from it (:func:`write_outputs`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safesteer.evaluate.calibrate import Calibration
from safesteer.evaluate.stats import format_ci
from safesteer.io import atomic_path, write_json


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]]
    calibrations: dict[str, Calibration]
    baseline: dict[str, Any]
    extras: dict[str, Any]
    config: dict[str, Any]
    scale: float

    def table(self):
        import pandas as pd  # pandas: safesteer.serve loads this package and no pandas

        return pd.DataFrame(self.rows)

    def entanglement(self, key: str = "z"):
        """strategies × metrics matrix of ``key`` (``z`` = Δ/SE(Δ) or ``delta``)."""
        df = self.table()
        df = df[df["strategy"] != "unsteered"]
        return df.pivot_table(index="strategy", columns="metric", values=key, sort=False)


def _merge_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """One member: its extras; an ensemble: per-member extras, answers concatenated."""
    if len(extras) == 1:
        return _jsonable_extra(extras[0])
    out: dict[str, Any] = {
        "members": [
            _jsonable_extra({k: v for k, v in e.items() if k not in ("answers", "prompts")}) for e in extras
        ]
    }
    if all("answers" in e for e in extras):
        out["answers"] = [a for e in extras for a in e["answers"]]
        out["prompts"] = [p for e in extras for p in e["prompts"]]
    return out


def _jsonable_extra(extra: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in extra.items():
        if k in ("scores", "p_yes"):
            continue  # per-item arrays stay out of the JSON summary
        out[k] = v
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def write_outputs(result: SuiteResult, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """results.csv (long), table.csv (strategy × metric, "value [lo, hi]" and Δ), results.json,
    entanglement.csv, calibration.json, generation samples, and the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = result.table()
    paths: dict[str, Path] = {}
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    paths["results_csv"] = out / "results.csv"

    wide = {}
    for _, r in df.iterrows():
        row = wide.setdefault(r["strategy"], {"strategy": r["strategy"], "alpha": r["alpha"]})
        row[r["metric"]] = format_ci(r["value"], r["ci_low"], r["ci_high"])
        if r["strategy"] != "unsteered":
            row[f"{r['metric']}_delta"] = (
                format_ci(r["delta"], r["delta_low"], r["delta_high"], signed=True) + f" p={r['p_value']:.3g}"
            )
    import pandas as pd  # pandas: as in SuiteResult.table

    with atomic_path(out / "table.csv") as tmp:
        pd.DataFrame(list(wide.values())).to_csv(tmp, index=False)
    paths["table_csv"] = out / "table.csv"

    ent = result.entanglement("z")
    with atomic_path(out / "entanglement.csv") as tmp:
        ent.to_csv(tmp)
    paths["entanglement_csv"] = out / "entanglement.csv"

    samples = {}
    for name, info in result.extras.get("strategies", {}).items():
        for g, extra in info.get("groups", {}).items():
            if "answers" in extra:
                samples.setdefault(name, []).extend(
                    {"group": g, "prompt": p, "answer": a} for p, a in zip(extra["prompts"], extra["answers"])
                )
    for g, extra in result.baseline.get("groups", {}).items():
        if "answers" in extra:
            samples.setdefault("unsteered", []).extend(
                {"group": g, "prompt": p, "answer": a} for p, a in zip(extra["prompts"], extra["answers"])
            )
    if samples:
        sdir = out / "samples"
        sdir.mkdir(exist_ok=True)
        for name, rows in samples.items():
            fname = sdir / f"generations_{name.replace('+', '_plus_')}.jsonl"
            with atomic_path(fname) as tmp:
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths["samples"] = sdir

    def strip_answers(d: dict) -> dict:
        return {
            k: (
                {
                    gk: {kk: vv for kk, vv in gv.items() if kk not in ("answers", "prompts")}
                    for gk, gv in v.items()
                }
                if k == "groups"
                else v
            )
            for k, v in d.items()
        }

    payload = {
        "config": result.config,
        "alpha_scale": result.scale,
        "rows": result.rows,
        "calibration": {k: v.as_dict() for k, v in result.calibrations.items()},
        "baseline": strip_answers(result.baseline),
        "strategies": {k: strip_answers(v) for k, v in result.extras.get("strategies", {}).items()},
        "entanglement_z": {
            s: {m: v for m, v in row.items()} for s, row in ent.to_dict(orient="index").items()
        },
    }
    write_json(out / "results.json", _clean(payload))
    write_json(out / "calibration.json", _clean(payload["calibration"]))
    paths["results_json"] = out / "results.json"
    if plots:
        from safesteer.evaluate.plots import plot_all  # matplotlib: only when plotting

        paths.update(plot_all(result, out / "plots"))
    return paths


__all__ = ["SuiteResult", "write_outputs"]
