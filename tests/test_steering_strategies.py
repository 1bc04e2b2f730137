"""Steering strategies: unit directions, hybrids, SAE means, the random control, save/load without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.steering import (
    Direction,
    DirectionSet,
    Intervention,
    build_directions,
    combine,
    random_direction,
    read_atoms,
    sae_direction,
    steering_vector,
)
from safesteer.steering.strategies import RANDOM_SEED, STRATEGY_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


class _Probe:
    def __init__(self, w, diffmean=None):
        self.w = np.asarray(w, dtype=np.float64)
        self.diffmean = diffmean

    @property
    def direction(self):
        return self.w / np.linalg.norm(self.w)


class _SAE:
    def __init__(self, W):
        self.W_dec = W


def _ingredients(d=16, seed=0):
    rng = np.random.default_rng(seed)
    probes = {"tox": _Probe(rng.normal(size=d), rng.normal(size=d)), "harm": _Probe(rng.normal(size=d))}
    W = rng.normal(size=(40, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    atoms = {
        "tox_top20": list(range(20)),
        "tox_all": list(range(30)),
        "harm_top20": list(range(10, 30)),
        "harm_filtered": [3, 5, 7],
    }
    return probes, _SAE(W), atoms


def test_all_named_strategies_are_unit_and_named():
    probes, sae, atoms = _ingredients()
    ds = build_directions(2, probes, sae, atoms)
    expected = {
        "probe_tox",
        "probe_harm",
        "probe_tox+harm",
        "sae_tox_top20",
        "sae_tox_all",
        "sae_harm_top20",
        "sae_harm_filtered",
        "sae_tox+probe_tox",
        "sae_harm+probe_harm",
        "sae_tox+probe_harm",
        "sae_tox+sae_harm",
        "diffmean_tox",
        "random",
    }
    assert set(ds.names()) == expected
    for name, d in ds.items():
        assert d.vector.dtype == np.float32
        assert abs(np.linalg.norm(d.vector) - 1.0) < 1e-6, name
        assert d.layer == 2
    # probe direction is w/|w|; hybrid is the normalised sum of the two unit vectors
    np.testing.assert_allclose(ds["probe_tox"].vector, probes["tox"].direction, atol=1e-6)
    u = probes["tox"].direction + probes["harm"].direction
    np.testing.assert_allclose(ds["probe_tox+harm"].vector, u / np.linalg.norm(u), atol=1e-6)
    assert ds["sae_tox_top20"].atoms == list(range(20))


def test_sae_direction_is_mean_of_unit_rows_renormalised():
    W = np.array([[3.0, 0, 0], [0, 0.5, 0], [0, 0, 2.0]])
    v = sae_direction(W, [0, 1])
    np.testing.assert_allclose(v, np.array([1, 1, 0]) / np.sqrt(2))
    with pytest.raises(SafesteerError):
        sae_direction(W, [])
    with pytest.raises(SafesteerError):
        sae_direction(W, [5])


def test_combine_and_random():
    a, b = np.array([1.0, 0, 0]), np.array([0, 5.0, 0])
    np.testing.assert_allclose(combine(a, b), np.array([1, 1, 0]) / np.sqrt(2))
    with pytest.raises(SafesteerError):
        combine(a, -a)
    r1, r2 = random_direction(64, 7), random_direction(64, 7)
    np.testing.assert_array_equal(r1, r2)
    assert abs(np.linalg.norm(r1) - 1) < 1e-12
    assert not np.allclose(r1, random_direction(64, 8))


def test_sign_convention_steer_vector_points_away():
    d = Direction("x", np.array([0.0, 2.0]), "custom", 0)
    np.testing.assert_allclose(d.steer_vector, [0.0, -1.0])
    np.testing.assert_allclose(steering_vector(d.vector), -d.vector)


def test_save_load_roundtrip_no_pickle(tmp_path):
    probes, sae, atoms = _ingredients()
    ds = build_directions(1, probes, sae, atoms, sources={"probe_tox": "runs/p"})
    ds.save(tmp_path / "dirs")
    meta = json.loads((tmp_path / "dirs" / "directions.json").read_text())
    assert meta["directions"]["sae_tox_top20"]["atoms"] == list(range(20))
    assert meta["directions"]["probe_tox"]["sources"] == ["runs/p"]
    assert "toward unsafe" in meta["sign"]
    back = DirectionSet.load(tmp_path / "dirs")
    assert back.names() == ds.names()
    for n in ds:
        np.testing.assert_array_equal(back[n].vector, ds[n].vector)
        assert back[n].kind == ds[n].kind and back[n].layer == ds[n].layer
    raw = (tmp_path / "dirs" / "directions.safetensors").read_bytes()
    assert b"pickle" not in raw[:200]
    with pytest.raises(SafesteerError, match="unknown strategy"):
        back["nope"]


def test_load_errors(tmp_path):
    with pytest.raises(SafesteerError):
        DirectionSet.load(tmp_path)
    (tmp_path / "directions.json").write_text('{"format": "other"}')
    with pytest.raises(SafesteerError, match="not a safesteer direction set"):
        DirectionSet.load(tmp_path)


def test_random_ensemble_roundtrip(tmp_path):
    ds = build_directions(0, d_model=8, random_members=3, seed=10)
    r = ds["random"]
    assert len(r.vectors) == 3 and r.meta["seeds"] == [10, 11, 12]
    np.testing.assert_allclose(r.vectors[2], random_direction(8, 12), atol=1e-6)
    ds.save(tmp_path)
    back = DirectionSet.load(tmp_path)["random"]
    for a, b in zip(back.vectors, r.vectors):
        np.testing.assert_array_equal(a, b)
    ivs = Intervention.ensemble(back, 2.0, scale=3.0)
    assert [iv.alpha for iv in ivs] == [6.0] * 3
    np.testing.assert_allclose(ivs[1].vector, -r.vectors[1])


def test_read_atoms(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("atom,score\n5,0.9\n2,0.8\n5,0.1\n")
    assert read_atoms(p) == [5, 2]
    (tmp_path / "b.csv").write_text("x\n1\n")
    with pytest.raises(SafesteerError, match="atom"):
        read_atoms(tmp_path / "b.csv")


@pytest.mark.parametrize("where", ["middle", "last"])
def test_intervention_steers_pooled_vector_exactly(tiny_backbone, where):
    """h' = h − α·d at the layer: the pooled layer-L vector moves by exactly −α·d (also at the last layer,
    where a masked LM's probe reads the steered vector); α = 0 is bit-exact."""
    bb = tiny_backbone
    L = 1 if where == "middle" else bb.n_layers - 1
    d = Direction("r", random_direction(bb.d_model, 3), "random", L)
    texts = ["the dog is good .", "how can i make a bomb ?"]
    base = bb.pooled(texts, [L])[L]
    with Intervention.from_direction(d, 0.0).apply(bb):
        zero = bb.pooled(texts, [L])[L]
    np.testing.assert_array_equal(zero, base)
    with Intervention.from_direction(d, 2.5).apply(bb):
        moved = bb.pooled(texts, [L])[L]
    np.testing.assert_allclose(moved - base, np.tile(-2.5 * d.vector, (2, 1)), atol=1e-5)
    # the hook is gone afterwards
    np.testing.assert_array_equal(bb.pooled(texts, [L])[L], base)
    assert Intervention.none().is_identity
    with pytest.raises(SafesteerError):
        Intervention("x", None, np.ones(3), 1.0)


def test_build_directions_metadata_order_and_raw_matrix():
    probes, sae, atoms = _ingredients()
    ds = build_directions(2, probes, sae, atoms, sources={"sae": "runs/sae", "tox_top20": "runs/atoms.csv"})
    assert ds.names() == [n for n in STRATEGY_NAMES if n in ds]  # the study's order, not insertion order
    assert ds.names().index("probe_harm") < ds.names().index("diffmean_tox")
    assert ds["sae_tox_top20"].kind == "sae" and ds["sae_tox_top20"].meta == {"n_atoms": 20}
    assert ds["sae_tox_top20"].sources == ["runs/sae", "runs/atoms.csv"]
    assert ds["sae_harm_filtered"].sources == ["runs/sae", "atoms:harm_filtered"]
    assert ds["sae_harm_filtered"].atoms == [3, 5, 7] and ds["sae_harm_filtered"].meta == {"n_atoms": 3}
    assert ds["probe_harm"].sources == ["probe:harm"] and ds["diffmean_tox"].sources == ["probe:tox"]
    assert ds["probe_tox+harm"].kind == "hybrid" and ds["sae_tox+sae_harm"].kind == "hybrid"
    assert ds["sae_tox+probe_tox"].sources == ["sae_tox_top20", "probe_tox"]
    # an SAE given as its bare decoder matrix (numpy, or a torch parameter that needs grad) is the same SAE
    W = torch.nn.Parameter(torch.tensor(sae.W_dec, dtype=torch.float32))
    for raw in (sae.W_dec, W):
        other = build_directions(2, probes, raw, atoms)
        np.testing.assert_allclose(other["sae_tox_top20"].vector, ds["sae_tox_top20"].vector, atol=1e-6)
    with pytest.raises(SafesteerError, match="probe_tox, probe_harm"):
        ds["nope"]
    # probes without a diffmean attribute: no DiffMean baseline, no error
    bare = {"tox": type("P", (), {"direction": probes["tox"].direction})()}
    assert "diffmean_tox" not in build_directions(0, bare) and "probe_tox" in build_directions(0, bare)
    # one random member is allowed: a single direction, no ensemble
    one = build_directions(0, d_model=8, random_members=1)["random"]
    assert one.members == [] and one.meta == {"seeds": [RANDOM_SEED]}


def test_direction_errors_name_the_direction():
    with pytest.raises(SafesteerError, match="direction 'zero' has zero"):
        Direction("zero", np.zeros(4), "custom", 0)
    with pytest.raises(SafesteerError, match="member of 'ens' has zero"):
        Direction("ens", np.ones(4), "custom", 0, members=[np.zeros(4)])
    with pytest.raises(SafesteerError, match="they are opposite"):
        combine(np.ones(3), -np.ones(3))
    with pytest.raises(SafesteerError, match="all-zero decoder row"):
        sae_direction(np.array([[1.0, 0.0], [0.0, 0.0]]), [0, 1])


def test_intervention_member_names_and_layer():
    d = build_directions(3, d_model=8, random_members=3)["random"]
    ivs = Intervention.ensemble(d, 1.0)
    assert [iv.name for iv in ivs] == ["random", "random#1", "random#2"]
    assert [iv.layer for iv in ivs] == [3, 3, 3]
    assert Intervention.from_direction(d, 1.0, layer=1, member=2).layer == 1


def test_hand_written_direction_set_loads_with_defaults(tmp_path):
    """A minimal directions.json (format + layer only) loads: kind custom, no sources/atoms/meta/members."""
    from safetensors.numpy import save_file

    save_file({"mine": np.array([3.0, 4.0], dtype=np.float32)}, str(tmp_path / "directions.safetensors"))
    (tmp_path / "directions.json").write_text(
        json.dumps({"format": "safesteer-directions", "directions": {"mine": {"layer": 1}}})
    )
    d = DirectionSet.load(tmp_path / "directions.json")["mine"]  # the json path works as well as the folder
    assert (d.kind, d.layer, d.sources, d.atoms, d.meta, d.members) == ("custom", 1, [], [], {}, [])
    np.testing.assert_allclose(d.vector, [0.6, 0.8])
    ds = DirectionSet([d])
    ds.save(tmp_path / "a" / "b")  # nested folders are created
    assert DirectionSet.load(tmp_path / "a" / "b")["mine"].kind == "custom"


def test_sources_defaults_and_saved_metadata_round_trip(tmp_path):
    probes, sae, atoms = _ingredients()
    ds = build_directions(1, probes, sae, atoms, sources={"probe_tox": "runs/probe_tox"})
    assert ds["diffmean_tox"].sources == ["runs/probe_tox"]  # the DiffMean comes from the probe's file
    assert ds["sae_tox_all"].sources == ["sae", "atoms:tox_all"]  # defaults without sources
    ds.save(tmp_path)
    back = DirectionSet.load(tmp_path)
    for n in ds:
        assert (back[n].sources, back[n].atoms, back[n].meta) == (ds[n].sources, ds[n].atoms, ds[n].meta), n
