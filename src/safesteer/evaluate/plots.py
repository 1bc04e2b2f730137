"""Figures of the evaluation suite (matplotlib, Agg backend, PNG).

* :func:`plot_safety` — mean toxicity / harm per strategy with 95 % CIs, unsteered as a dashed line
  (the original study's Fig. 3);
* :func:`plot_bias` — CrowS-Pairs and StereoSet SS / ICAT per strategy, unsteered dashed, 50 dotted (Fig. 4);
* :func:`plot_choice_deltas` — ΔP(Yes) and ΔP(No) per prompt type and strategy with CIs (Fig. 5;
  P(No) = 1 − P(Yes) after normalising over the two answers, so ΔP(No) = −ΔP(Yes));
* :func:`plot_alpha_sweep` — safety gain and fluency loss against α on validation, per strategy;
* :func:`plot_entanglement` — heatmap of z = Δ/SE(Δ) for every strategy × metric.

Every function takes the long results table (a DataFrame with the columns of ``results.csv``) or
the calibration records, writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safesteer.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _metric_bars(ax, df, metric: str, title: str, ref: float | None = None) -> bool:
    sub = df[(df["metric"] == metric) & (df["strategy"] != "unsteered")]
    if sub.empty:
        ax.set_visible(False)
        return False
    x = np.arange(len(sub))
    err = np.vstack([sub["value"] - sub["ci_low"], sub["ci_high"] - sub["value"]])
    colors = ["0.6" if str(s).startswith("random") else "C0" for s in sub["strategy"]]
    ax.bar(x, sub["value"], yerr=np.clip(err, 0, None), color=colors, capsize=3)
    base = float(sub["baseline"].iloc[0])
    ax.axhline(base, color="k", linestyle="--", linewidth=1, label=f"unsteered {base:.3f}")
    if ref is not None:
        ax.axhline(ref, color="C3", linestyle=":", linewidth=1, label=f"ideal {ref:g}")
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{s}\nα={a:g}" for s, a in zip(sub["strategy"], sub["alpha"])], rotation=60, ha="right", fontsize=7
    )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return True


def plot_safety(
    df, path: Path, metrics: Sequence[str] = ("tox_probe", "harm_probe", "yes_harmful", "yes_toxic")
) -> Path | None:
    present = [m for m in metrics if (df["metric"] == m).any()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 4), squeeze=False)
    titles = {
        "tox_probe": "mean P(toxic), toxic texts",
        "harm_probe": "mean P(harmful), harmful prompts",
        "yes_harmful": "P(Yes), harmful prompts",
        "yes_toxic": "P(Yes), toxic statements",
    }
    for ax, m in zip(axes[0], present):
        _metric_bars(ax, df, m, titles.get(m, m))
    fig.suptitle("Safety per strategy (95% CI; dashed = unsteered)", fontsize=10)
    return _save(fig, path)


def plot_bias(df, path: Path) -> Path | None:
    spec = [
        ("crows", "CrowS-Pairs metric score", 50.0),
        ("stereoset_ss", "StereoSet SS", 50.0),
        ("stereoset_icat", "StereoSet ICAT", None),
        ("stereoset_lms", "StereoSet LMS", None),
    ]
    present = [s for s in spec if (df["metric"] == s[0]).any()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 4), squeeze=False)
    for ax, (m, title, ref) in zip(axes[0], present):
        _metric_bars(ax, df, m, title, ref)
    fig.suptitle("Bias per strategy (95% CI; dashed = unsteered)", fontsize=10)
    return _save(fig, path)


def plot_choice_deltas(df, path: Path) -> Path | None:
    types = [("yes_harmful", "harmful", 1.0), ("yes_toxic", "toxic", 1.0), ("no_safe", "XSTest safe", -1.0)]
    present = [t for t in types if (df["metric"] == t[0]).any()]
    strategies = [s for s in dict.fromkeys(df["strategy"]) if s != "unsteered"]
    if not present or not strategies:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(strategies) * len(present)), 4), squeeze=False)
    width = 0.8 / len(present)
    for k, (label, sign_yes) in enumerate((("ΔP(Yes)", 1.0), ("ΔP(No)", -1.0))):
        ax = axes[0][k]
        for j, (metric, name, sign_metric) in enumerate(present):
            sub = (
                df[(df["metric"] == metric) & (df["strategy"] != "unsteered")]
                .set_index("strategy")
                .reindex(strategies)
            )
            # no_safe holds P(No); the others P(Yes)
            s = sign_yes * sign_metric
            d = s * sub["delta"].to_numpy()
            lo, hi = s * sub["delta_low"].to_numpy(), s * sub["delta_high"].to_numpy()
            err = np.vstack([d - np.minimum(lo, hi), np.maximum(lo, hi) - d])
            ax.bar(
                np.arange(len(strategies)) + j * width,
                d,
                width,
                yerr=np.clip(np.nan_to_num(err), 0, None),
                capsize=2,
                label=name,
            )
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(np.arange(len(strategies)) + width * (len(present) - 1) / 2)
        ax.set_xticklabels(strategies, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{label} vs unsteered, per prompt type (95% CI)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_alpha_sweep(calibrations: dict[str, Any], path: Path) -> Path | None:
    records = {k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in calibrations.items()}
    records = {k: v for k, v in records.items() if v.get("points")}
    if not records:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for i, (name, rec) in enumerate(records.items()):
        pts = sorted(rec["points"], key=lambda p: p["alpha"])
        a = [p["alpha"] for p in pts]
        axes[0][0].plot(a, [p["gain"] for p in pts], marker="o", color=f"C{i % 10}", label=name)
        axes[0][1].plot(a, [p["loss"] for p in pts], marker="o", color=f"C{i % 10}", label=name)
        chosen = rec["alpha"]
        axes[0][0].axvline(chosen, color=f"C{i % 10}", linestyle=":", linewidth=0.8)
    budget = next(iter(records.values()))["budget"]
    axes[0][1].axhline(budget, color="k", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    axes[0][0].axhline(0, color="k", linewidth=0.8)
    axes[0][0].set_title("safety gain vs α (validation; dotted = chosen α)", fontsize=9)
    axes[0][1].set_title("fluency loss (relative NLL increase) vs α", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("α")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_entanglement(matrix, path: Path, clip: float = 10.0) -> Path | None:
    """``matrix``: DataFrame strategies × metrics of z = Δ/SE(Δ)."""
    if matrix is None or matrix.size == 0:
        return None
    vals = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * vals.shape[1], 1.0 + 0.45 * vals.shape[0]))
    im = ax.imshow(
        np.clip(np.nan_to_num(vals), -clip, clip), cmap="RdBu_r", vmin=-clip, vmax=clip, aspect="auto"
    )
    ax.set_xticks(range(vals.shape[1]))
    ax.set_xticklabels(matrix.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(vals.shape[0]))
    ax.set_yticklabels(matrix.index, fontsize=7)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.3g}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="z = Δ / SE(Δ)  (clipped)")
    ax.set_title("Entanglement: effect of each strategy on every metric", fontsize=9)
    return _save(fig, path)


def plot_all(result: Any, out_dir: Path) -> dict[str, Path]:
    """Every figure for a :class:`~safesteer.evaluate.suite.SuiteResult`; returns name → path."""
    out_dir = Path(out_dir)
    df = result.table()
    made = {
        "plot_safety": plot_safety(df, out_dir / "safety.png"),
        "plot_bias": plot_bias(df, out_dir / "bias.png"),
        "plot_choice": plot_choice_deltas(df, out_dir / "choice_deltas.png"),
        "plot_alpha": plot_alpha_sweep(result.calibrations, out_dir / "alpha_sweep.png"),
        "plot_entanglement": plot_entanglement(result.entanglement("z"), out_dir / "entanglement.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
