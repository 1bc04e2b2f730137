"""End-to-end CLI on a tiny model: extract → probe → map (fake latent store) → atoms (topk / all-positive /
filtered)."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from safesteer.cli.main import main
from safesteer.data.records import Record
from safesteer.extract import ExtractConfig, extract
from safesteer.io import save_npy
from safesteer.store import ActivationStore

TOXIC = "hate cruel stupid idiot kill enemy bad".split()
NICE = "love kind happy friend good calm nice".split()
HARM = "make bomb weapon drug steal kill harm".split()
SAFE = "how can i help the dog cat school book".split()


def _records():
    rng = random.Random(0)
    recs = []

    def add(ds, words, labels, n):
        for i in range(n):
            text = (
                " ".join(rng.choice(words) for _ in range(6))
                + " "
                + " ".join(rng.choice(SAFE) for _ in range(2))
            )
            recs.append((ds, Record(f"{ds}:{i}", text, "train" if i % 5 else "test", dict(labels), "local")))

    add("toxigen", TOXIC, {"toxic": 1}, 40)
    add("go_emotions", NICE, {"joy": 1, "anger": 0}, 40)
    add("advbench", HARM, {"harmful": 1}, 30)
    add("xstest", SAFE, {"unsafe": 0}, 30)
    rng.shuffle(recs)
    return recs


class FakeLatents:
    """Stands in for safesteer.sae.latents.LatentStore: ReLU(H·W_decᵀ), keeping the top 6 per row."""

    def __init__(self, store, W):
        self.store, self.W = store, W
        self.n_latents, self.n_rows = W.shape[0], store.n_rows
        self.b_dec = store.load_all(with_labels=False).H.mean(0)

    def iter_shards(self):
        for idx, H, ids in self.store.iter_shards():
            A = np.maximum((np.asarray(H) - self.b_dec) @ self.W.T, 0)
            thr = np.sort(A, axis=1)[:, -6][:, None]
            yield idx, sp.csr_matrix(np.where(A >= thr, A, 0.0).astype(np.float32)), ids


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("atoms")
    cfg = ExtractConfig(
        model="tiny",
        datasets=["mixed"],
        layers=[1],
        shard_size=60,
        dtype="float32",
        batch_size=16,
        precision="fp32",
    )
    extract(tiny_llama, _records(), root / "acts", cfg, progress=False)
    model_dir = root / "tiny-model"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    return root


def test_probe_map_atoms(workspace, monkeypatch, capsys):
    root = workspace
    acts = root / "acts" / "layer-1"
    assert (
        main(
            [
                "probe",
                "--acts",
                str(acts),
                "--label",
                "toxicity",
                "--out",
                str(root / "probe-tox"),
                "--balanced",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out AUROC" in out
    metrics = json.loads((root / "probe-tox" / "metrics.json").read_text())
    assert metrics["n_test"] > 0 and metrics["auroc"] > 0.8 and "dataset split" in metrics["holdout"]
    assert np.load(root / "probe-tox" / "direction.npy").shape == (32,)
    assert (
        main(
            [
                "probe",
                "--acts",
                str(acts),
                "--label",
                "harmfulness",
                "--out",
                str(root / "probe-harm"),
                "--holdout",
                "id",
                "--no-balanced",
            ]
        )
        == 0
    )

    store = ActivationStore(acts)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(24, 32))
    W[5] = np.load(root / "probe-tox" / "diffmean.npy")  # a planted "toxicity atom"
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    (root / "sae").mkdir()
    save_npy(root / "sae" / "W_dec.npy", W.astype(np.float32))
    monkeypatch.setattr("safesteer.cartography.map._open_latents", lambda path: FakeLatents(store, W))
    assert (
        main(
            [
                "map",
                "--latents",
                str(root / "lat"),
                "--acts",
                str(acts),
                "--out",
                str(root / "map"),
                "--heldout",
                "0.2",
                "--probe",
                str(root / "probe-tox"),
                "--sae",
                str(root / "sae"),
                "--min-per-class",
                "3",
            ]
        )
        == 0
    )
    amap = pd.read_parquet(root / "map" / "atom_map.parquet")
    assert {"toxicity", "harmfulness"} <= set(amap.label) and len(amap) == 24 * amap.label.nunique()
    summary = json.loads((root / "map" / "summary.json").read_text())
    assert summary["n_rows"] == 140 and summary["acts"]["layer"] == 1
    assert summary["top_atoms"]["toxicity"][0]["atom"] == 5
    link = json.loads((root / "map" / "link.json").read_text())
    assert link["toxicity:diffmean"]["atoms"][0] == 5 and link["toxicity:diffmean"]["cosine"] > 0.999
    assert 0 < link["toxicity"]["cosine"] <= 1
    corr = pd.read_parquet(root / "map" / "probe_atom_corr.parquet")
    assert corr.sort_values("corr", ascending=False).atom.iloc[0] == 5

    assert (
        main(["atoms", "--map", str(root / "map"), "--mode", "topk", "--k", "3", "--out", str(root / "topk")])
        == 0
    )
    topk = pd.read_csv(root / "topk" / "atoms_topk.csv")
    assert topk[topk.label == "toxicity"].atom.iloc[0] == 5 and topk.groupby("label").size().max() == 3
    assert (
        main(["atoms", "--map", str(root / "map"), "--mode", "all-positive", "--out", str(root / "allpos")])
        == 0
    )
    assert (pd.read_csv(root / "allpos" / "atoms_all_positive.csv").dmu > 0).all()

    assert (
        main(
            [
                "atoms",
                "--map",
                str(root / "map"),
                "--mode",
                "filtered",
                "--sae",
                str(root / "sae"),
                "--judge",
                "none",
                "--no-dedup",
                "--no-screen",
                "--candidates",
                "3",
                "--model",
                str(root / "tiny-model"),
                "--out",
                str(root / "filtered"),
            ]
        )
        == 0
    )
    final = pd.read_csv(root / "filtered" / "final_steering_atoms.csv")
    assert list(final.columns[:6]) == ["atom", "category", "label", "concept", "verdict", "reason"]
    assert 5 in final.atom.tolist() and final.selected.all()
    cards = json.loads((root / "filtered" / "atom_cards.json").read_text())
    assert all(len(c["tokens"]) == 10 for c in cards)
    assert any(t["id"].startswith("toxigen:") for c in cards if c["atom"] == 5 for t in c["top_texts"])


def test_cli_errors(workspace, capsys):
    root = workspace
    assert main(["atoms", "--map", str(root / "nope"), "--mode", "topk", "--out", str(root / "x")]) == 2
    assert "error: " in capsys.readouterr().err
    assert (
        main(
            [
                "probe",
                "--acts",
                str(root / "acts" / "layer-1"),
                "--label",
                "emotion:grief",
                "--out",
                str(root / "p"),
            ]
        )
        == 2
    )
    assert "no row" in capsys.readouterr().err
    assert (
        main(
            [
                "probe",
                "--acts",
                str(root / "acts" / "layer-1"),
                "--label",
                "toxicity",
                "--out",
                str(root / "p"),
                "--cs",
                "a,b",
            ]
        )
        == 2
    )


def test_real_sae_and_latent_store(workspace):
    """The map/atoms commands read the SAE engineer's formats (GatedSAE folder, LatentStore) directly."""
    pytest.importorskip("safesteer.sae.latents")
    from safesteer.cartography.map import load_decoder
    from safesteer.sae import GatedSAE, SAEConfig, save_sae
    from safesteer.sae.latents import encode_store

    root = workspace
    acts = root / "acts" / "layer-1"
    sae = GatedSAE(SAEConfig(d_in=32, d_sae=64), seed=0)
    save_sae(sae, root / "gsae")
    encode_store(sae, acts, root / "latents", batch_size=64, progress=False)
    W = load_decoder(root / "gsae")
    np.testing.assert_allclose(W, sae.W_dec.detach().numpy(), rtol=1e-6)
    assert (
        main(
            [
                "map",
                "--latents",
                str(root / "latents"),
                "--acts",
                str(acts),
                "--out",
                str(root / "map-real"),
                "--min-per-class",
                "3",
            ]
        )
        == 0
    )
    amap = pd.read_parquet(root / "map-real" / "atom_map.parquet")
    assert amap.atom.max() == 63 and set(amap.label) >= {"toxicity", "harmfulness"}
    assert (
        main(
            [
                "atoms",
                "--map",
                str(root / "map-real"),
                "--mode",
                "topk",
                "--k",
                "2",
                "--sae",
                str(root / "gsae"),
                "--out",
                str(root / "topk-real"),
            ]
        )
        == 0
    )


def test_partial_maps_merge_to_the_full_map(workspace, capsys):
    """map --shards over disjoint latent shards, then map-merge: the same atom map as one pass over all."""
    pytest.importorskip("safesteer.sae.latents")
    from safesteer.sae import GatedSAE, SAEConfig
    from safesteer.sae.latents import LatentStore, encode_store

    root = workspace
    acts = root / "acts" / "layer-1"
    encode_store(
        GatedSAE(SAEConfig(d_in=32, d_sae=48), seed=3),
        acts,
        root / "lat-merge",
        batch_size=64,
        progress=False,
    )
    n_shards = len(LatentStore(root / "lat-merge").shards)
    assert n_shards >= 3
    common = [
        "--latents",
        str(root / "lat-merge"),
        "--acts",
        str(acts),
        "--min-per-class",
        "3",
        "--heldout",
        "0.2",
    ]
    assert main(["map", *common, "--out", str(root / "m-all")]) == 0
    assert main(["map", *common, "--out", str(root / "m-a"), "--shards", "0"]) == 0
    assert main(["map", *common, "--out", str(root / "m-b"), "--shards", f"1-{n_shards - 1}"]) == 0
    assert (
        main(
            [
                "map-merge",
                "--part",
                str(root / "m-a"),
                "--part",
                str(root / "m-b"),
                "--out",
                str(root / "m-merged"),
            ]
        )
        == 0
    )
    full = pd.read_parquet(root / "m-all" / "atom_map.parquet")
    merged = pd.read_parquet(root / "m-merged" / "atom_map.parquet")
    assert list(full.columns) == list(merged.columns) and len(full) == len(merged)
    num = full.select_dtypes("number").columns
    np.testing.assert_allclose(
        merged[num].to_numpy(float), full[num].to_numpy(float), rtol=1e-9, atol=1e-12, equal_nan=True
    )
    assert (merged["label"] == full["label"]).all()
    ta = pd.read_parquet(root / "m-all" / "top_activations.parquet").sort_values(["atom", "rank"])
    tb = pd.read_parquet(root / "m-merged" / "top_activations.parquet").sort_values(["atom", "rank"])
    np.testing.assert_allclose(tb["activation"].to_numpy(), ta["activation"].to_numpy())
    s_all, s_m = (json.loads((root / d / "summary.json").read_text()) for d in ("m-all", "m-merged"))
    assert s_m["n_rows"] == s_all["n_rows"]
    for lab, atoms in s_all["top_atoms"].items():  # same ranking, scores to rounding (merge order)
        assert [a["atom"] for a in s_m["top_atoms"][lab]] == [a["atom"] for a in atoms]
        np.testing.assert_allclose(
            [a["score"] for a in s_m["top_atoms"][lab]], [a["score"] for a in atoms], rtol=1e-12
        )
    capsys.readouterr()
    # overlapping or whole-store parts are refused with one line
    assert (
        main(
            [
                "map-merge",
                "--part",
                str(root / "m-a"),
                "--part",
                str(root / "m-a"),
                "--out",
                str(root / "bad"),
            ]
        )
        == 2
    )
    assert "both" in capsys.readouterr().err
    assert (
        main(
            [
                "map-merge",
                "--part",
                str(root / "m-all"),
                "--part",
                str(root / "m-b"),
                "--out",
                str(root / "bad"),
            ]
        )
        == 2
    )
    assert main(["map", *common, "--out", str(root / "bad"), "--shards", "99"]) == 2
    assert "does not have" in capsys.readouterr().err
