"""The causal screen of candidate atoms (beyond the original study's LLM filter).

A candidate is kept only if (1) its association
replicates on a held-out split (same sign, |r_heldout| ≥ ``r_threshold``) and (2) adding its decoder
direction at the steering layer moves a concept read-out probe the expected way on validation
texts (central difference: mean P(concept) with +α·d minus with −α·d, sign must equal the sign of
the atom's association). Atoms that move it the wrong way are flagged ``would make the model less
safe``: steering with them (e.g. subtracting a "toxicity" atom) would push the concept up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.probes import train_probe
from safesteer.probes.labels import collect_texts

UNSAFE_FLAG = "would make the model less safe"


def pooled_by_length(backbone, texts: Sequence[str], layer: int, batch_size: int = 16) -> np.ndarray:
    """``backbone.pooled`` for one layer with texts batched by length (less padding), rows in input order."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, backbone.d_model), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    H = backbone.pooled([texts[i] for i in order], [layer], batch_size=batch_size)[layer]
    out = np.empty_like(H)
    out[order] = H
    return out


@dataclass
class ScreenResult:
    atom: int
    label: str
    expected_sign: int
    r: float
    r_heldout: float
    replicates: bool
    effect: float  # Δ mean P(concept): (+α) − (−α), halved
    effect_logit: float
    passes: bool
    flag: str = ""


class CausalScreen:
    """Replication + steering-effect screen of atoms against concept read-out probes.

    ``readouts``: ``{label: (Probe, eval_texts)}`` — a probe on pooled activations at
    ``read_layer`` and the validation texts to steer. Steering adds ±α·d (d the atom's unit decoder
    row) at ``layer``. When ``read_layer == layer`` the effect is computed exactly without running
    the model (the pooled vector shifts by α·d), otherwise by steered forward passes.

    Step size α: an explicit ``alpha``; else per atom ``alpha_scale`` × the atom's largest observed
    activation (what the SAE itself writes along d at its strongest), when the caller knows it;
    else ``alpha_scale`` × √d × the median per-dimension std of the pooled activations at ``layer``
    (a robust typical norm: a few massive-activation dimensions do not inflate it).
    Read-outs with held-out AUROC below ``min_readout_auroc`` cannot verify anything: their atoms
    do not pass and are flagged as unverified.
    """

    def __init__(
        self,
        backbone,
        layer: int,
        read_layer: int,
        readouts: dict[str, tuple[Any, list[str]]],
        alpha: float | None = None,
        alpha_scale: float = 1.0,
        r_threshold: float = 0.05,
        min_effect: float = 0.0,
        min_readout_auroc: float = 0.7,
        batch_size: int = 16,
    ):
        self.backbone = backbone
        self.layer = backbone.check_layer(layer)
        self.read_layer = backbone.check_layer(read_layer)
        if self.read_layer < self.layer:
            raise SafesteerError(
                f"the read-out layer ({read_layer}) must not precede the steering layer ({layer})"
            )
        self.readouts = readouts
        self.r_threshold = r_threshold
        self.min_effect = min_effect
        self.min_readout_auroc = min_readout_auroc
        self.batch_size = batch_size
        self.alpha_scale = float(alpha_scale)
        self._base: dict[str, np.ndarray] = {}
        self._fixed_alpha = float(alpha) if alpha is not None else None
        self._typical: float | None = None

    @property
    def alpha(self) -> float:
        """The fallback step (explicit alpha, or the robust typical-norm rule)."""
        if self._fixed_alpha is not None:
            return self._fixed_alpha
        if self._typical is None:
            texts = [t for _, ts in self.readouts.values() for t in ts][:64]
            if len(texts) < 2:
                self._typical = 1.0
            else:
                H = pooled_by_length(self.backbone, texts, self.layer, self.batch_size)
                self._typical = float(np.sqrt(H.shape[1]) * np.median(H.std(axis=0)))
        return self.alpha_scale * self._typical

    def alpha_for(self, max_act: float | None = None) -> float:
        if self._fixed_alpha is not None:
            return self._fixed_alpha
        if max_act is not None and math.isfinite(max_act) and max_act > 0:
            return self.alpha_scale * float(max_act)
        return self.alpha

    def _pooled(self, texts: list[str], vector: np.ndarray | None, alpha: float) -> np.ndarray:
        if vector is None:
            return pooled_by_length(self.backbone, texts, self.read_layer, self.batch_size)
        with self.backbone.steer(self.layer, vector.astype(np.float32), alpha):
            return pooled_by_length(self.backbone, texts, self.read_layer, self.batch_size)

    def effect(self, label: str, direction: np.ndarray, alpha: float | None = None) -> tuple[float, float]:
        """(Δ mean probability, Δ mean logit) of the label's probe, central difference over ±α."""
        if label not in self.readouts:
            raise SafesteerError(f"no read-out probe for label '{label}'")
        probe, texts = self.readouts[label]
        a = self.alpha if alpha is None else float(alpha)
        d = np.asarray(direction, dtype=np.float64)
        d = d / (np.linalg.norm(d) or 1.0)
        if self.read_layer == self.layer:
            if label not in self._base:
                self._base[label] = self._pooled(texts, None, 0.0)
            H0 = self._base[label]
            Hp, Hm = H0 + a * d, H0 - a * d
        else:
            Hp = self._pooled(texts, d, a)
            Hm = self._pooled(texts, d, -a)
        dp = float(probe.predict_proba(Hp).mean() - probe.predict_proba(Hm).mean()) / 2
        dl = float(probe.decision_function(Hp).mean() - probe.decision_function(Hm).mean()) / 2
        return dp, dl

    def replicates(self, r: float, r_heldout: float) -> bool:
        if r_heldout is None or not math.isfinite(r_heldout) or not math.isfinite(r):
            return False
        return bool(np.sign(r) == np.sign(r_heldout) and abs(r_heldout) >= self.r_threshold)

    def readout_auroc(self, label: str) -> float:
        probe = self.readouts[label][0]
        v = (getattr(probe, "metrics", None) or {}).get("auroc")
        return float(v) if v is not None else float("nan")

    def screen_one(
        self,
        atom: int,
        label: str,
        r: float,
        r_heldout: float,
        direction: np.ndarray,
        max_act: float | None = None,
    ) -> ScreenResult:
        sign = 1 if r >= 0 else -1
        rep = self.replicates(r, r_heldout)
        auc = self.readout_auroc(label) if label in self.readouts else float("nan")
        rh = float(r_heldout) if r_heldout is not None else float("nan")
        if label not in self.readouts or (math.isfinite(auc) and auc < self.min_readout_auroc):
            why = (
                "no read-out probe"
                if label not in self.readouts
                else f"read-out probe too weak (AUROC {auc:.2f})"
            )
            return ScreenResult(
                int(atom),
                label,
                sign,
                float(r),
                rh,
                rep,
                float("nan"),
                float("nan"),
                False,
                f"not causally verified: {why}",
            )
        dp, dl = self.effect(label, direction, self.alpha_for(max_act))
        moved = abs(dl) > 0 and abs(dp) >= self.min_effect
        right = moved and np.sign(dl) == sign
        wrong = moved and np.sign(dl) == -sign
        flag = ""
        if wrong:
            flag = f"{UNSAFE_FLAG}: steering along it moves the {label} probe the wrong way (dP={dp:+.4f})"
        elif not rep:
            flag = "association does not replicate on the held-out split"
        elif not right:
            flag = "steering effect too small"
        return ScreenResult(int(atom), label, sign, float(r), rh, rep, dp, dl, bool(rep and right), flag)


def train_readouts(
    backbone,
    read_layer: int,
    labels: Sequence[str],
    *,
    data_dir=None,
    max_per_part: int = 60,
    n_eval: int = 24,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, tuple[Any, list[str]]]:
    """Concept read-out probes at ``read_layer`` from the datasets, plus held-out texts to steer.

    For each label: up to ``max_per_part`` texts per spec part (dataset train split → probe; test
    split, falling back to a seeded 25% of the rows when a dataset has no test rows → eval texts,
    at most ``n_eval``). Labels whose data is unavailable are skipped.
    """
    out: dict[str, tuple[Any, list[str]]] = {}
    rng = np.random.default_rng(seed)
    for label in dict.fromkeys(labels):
        try:
            lt = collect_texts(
                label, split="all", max_per_part=max_per_part, data_dir=data_dir, seed=seed, max_chars=400
            )
        except SafesteerError:
            continue
        y = np.array(lt.y)
        test = np.array([s == "test" for s in lt.split])
        if test.sum() < 4 or (~test).sum() < 4 or len(set(y[~test])) < 2:
            test = rng.random(len(y)) < 0.25
        if len(set(y[~test])) < 2:
            continue
        texts = np.array(lt.texts, dtype=object)
        H = pooled_by_length(backbone, list(texts), read_layer, batch_size)
        try:
            probe = train_probe(
                H[~test], y[~test], H[test], y[test], balanced=True, seed=seed, Cs=(0.01, 0.1, 1.0), folds=3
            )
        except SafesteerError:
            continue
        eval_idx = np.flatnonzero(test)
        if len(eval_idx) > n_eval:
            eval_idx = rng.choice(eval_idx, n_eval, replace=False)
        probe.meta.update({"label": label, "layer": int(read_layer)})
        out[label] = (probe, [str(t) for t in texts[eval_idx]])
    return out


__all__ = ["UNSAFE_FLAG", "CausalScreen", "ScreenResult", "pooled_by_length", "train_readouts"]
