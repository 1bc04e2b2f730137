"""Integration (SmolLM2 + ../shared/data): held-out probe AUROCs at layer 15, then map → filtered atoms
offline.

One small extraction (~330 texts, 64 tokens max) feeds everything: ``safesteer probe`` for toxicity and
harmfulness, ``map`` over a stand-in sparse dictionary (planted DiffMean atoms + random unit atoms,
top-k ReLU codes), and ``atoms --mode filtered`` with the offline judge, causal screening and MiniLM
de-duplication.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from safesteer.cartography.atoms import run_atoms
from safesteer.cartography.map import run_map
from safesteer.extract import ExtractConfig, extract
from safesteer.probes.labels import get_spec
from safesteer.probes.train import run_probe
from safesteer.store import ActivationStore

pytestmark = pytest.mark.integration

LAYER = 15
SAMPLE = {
    "toxigen": 80,
    "realtoxicityprompts": 120,
    "go_emotions": 60,
    "advbench": 50,
    "donotanswer": 50,
    "xstest": 70,
    "hh_rlhf_harmless": 60,
}


def _rows(data_dir):
    from safesteer.data import load

    specs = [get_spec("toxicity"), get_spec("harmfulness")]
    for name, n in SAMPLE.items():
        for rec in load(name, split="all", data_dir=data_dir, max_rows=n, seed=0):
            if any(not math.isnan(s.y_from_record(name, rec.labels)) for s in specs):
                yield name, rec


@pytest.fixture(scope="module")
def acts(smollm2, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    cfg = ExtractConfig(
        model="smollm2-135m",
        datasets=list(SAMPLE),
        layers=[LAYER],
        split="all",
        shard_size=128,
        dtype="float32",
        batch_size=16,
        max_length=64,
        precision="fp32",
        bucket_window=0,
    )
    old = smollm2.max_length
    smollm2.max_length = 64
    try:
        extract(smollm2, _rows(shared_data), root / "acts", cfg, progress=False)
    finally:
        smollm2.max_length = old
    return root


@pytest.mark.parametrize("label", ["toxicity", "harmfulness"])
def test_probe_heldout_auroc(acts, label):
    m = run_probe(acts / "acts", label, acts / f"probe-{label}", balanced=True)
    print(
        f"\n[integration] {label}: held-out AUROC {m['auroc']:.4f} acc {m['accuracy']:.4f} F1 {m['f1']:.4f} "
        f"DiffMean AUROC {m['diffmean_auroc']:.4f} (C={m['C']:g}, train {m['n_train']}, test {m['n_test']})"
    )
    assert m["n_test"] >= 20
    assert m["auroc"] > 0.8


class _Latents:
    """Stand-in for an SAE's latent store: random atoms on standardised H, plus planted atoms that
    fire with the toxicity / harmfulness probe logits (ReLU), so their decoder rows are the probes'
    raw-space directions."""

    def __init__(self, store, planted: dict[int, object], n_atoms=64, seed=0):
        self.store, self.planted = store, planted
        self.n_latents, self.n_rows = n_atoms, store.n_rows
        H = store.load_all(with_labels=False).H
        self.mu, self.sd = H.mean(0), H.std(0) + 1e-6
        R = np.random.default_rng(seed).normal(size=(n_atoms, store.d))
        self.R = R / np.linalg.norm(R, axis=1, keepdims=True) * 3.0

    def iter_shards(self):
        for idx, H, ids in self.store.iter_shards():
            H = np.asarray(H, dtype=np.float64)
            A = np.maximum(((H - self.mu) / self.sd) @ self.R.T, 0)
            for j, probe in self.planted.items():
                A[:, j] = np.maximum(probe.decision_function(H), 0)
            yield idx, sp.csr_matrix(A.astype(np.float32)), ids


@pytest.mark.slow
def test_filtered_atoms_offline(acts, smollm2, shared_data):
    from safesteer.cartography.dedup import MiniLMEmbedder
    from safesteer.probes import load_probe

    for label in ("toxicity", "harmfulness"):
        if not (acts / f"probe-{label}" / "probe.json").is_file():
            run_probe(acts / "acts", label, acts / f"probe-{label}", balanced=True)
    store = ActivationStore(acts / "acts")
    tox, harm = load_probe(acts / "probe-toxicity"), load_probe(acts / "probe-harmfulness")
    lat = _Latents(store, {3: tox, 7: harm})
    W = lat.R / np.linalg.norm(
        lat.R, axis=1, keepdims=True
    )  # random atoms' decoder rows (raw space, arbitrary)
    W[3], W[7] = tox.direction, harm.direction
    summary = run_map(
        lat,
        acts / "acts",
        acts / "map",
        heldout=0.25,
        min_per_class=5,
        probe_dirs=[acts / "probe-toxicity", acts / "probe-harmfulness"],
        show_progress=False,
    )
    assert summary["top_atoms"]["toxicity"][0]["atom"] == 3
    assert summary["top_atoms"]["harmfulness"][0]["atom"] == 7
    rep = run_atoms(
        acts / "map",
        acts / "atoms",
        mode="filtered",
        candidates=3,
        judge="offline",
        screen=True,
        categories=("toxicity", "harm"),
        read_layer=20,
        readout_rows=12,
        screen_texts=8,
        data_dir=shared_data,
        backbone=smollm2,
        judge_backbone=smollm2,
        embedder=MiniLMEmbedder(),
        W_dec=W.astype(np.float32),
        show_progress=False,
    )
    print(f"\n[integration] filtered atoms: {json.dumps(rep, default=str)}")
    cand = pd.read_csv(acts / "atoms" / "candidates.csv")
    assert set(cand.verdict) <= {"GENUINE", "CONTEXT", "NOISE"}
    assert (acts / "atoms" / "final_steering_atoms.csv").is_file()
    screened = cand[cand.screen_pass.notna()]
    for atom in (3, 7):
        row = cand[cand.atom == atom]
        assert len(row) == 1
        if row.verdict.iloc[0] == "GENUINE":  # a planted concept direction replicates and moves its read-out
            assert bool(row.replicates.iloc[0])
    print(
        cand[
            [
                "atom",
                "category",
                "concept",
                "verdict",
                "label",
                "replicates",
                "effect",
                "screen_pass",
                "flag",
                "selected",
            ]
        ].to_string()
    )
    assert len(screened) == int((cand.verdict == "GENUINE").sum())
