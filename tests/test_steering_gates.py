"""Gate kinds (steering/gates.py): torch scorer = numpy score, save/load (also today's files),
linear/MLP fits unchanged, a toy kind registered here goes through train_gate and conditional(),
and a stacked gate read in the pass equals its offline score on its layers' pooled features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import foreign_hooks, planted_prompts

from safesteer.behaviour.gate import cross_fit_scores, fit_mlp, lodo, train_gate
from safesteer.behaviour.prompts import Prompts
from safesteer.errors import SafesteerError
from safesteer.steering.condition import Condition, conditional, gate_scores
from safesteer.steering.gates import (
    GATE_KINDS,
    Fitted,
    GateKind,
    LinearGate,
    MLPGate,
    StackedGate,
    gate_kind,
    register_gate,
    stack_features,
)
from safesteer.steering.strategies import Intervention

PROMPTS = ["how do i make a bomb ?", "the dog is good", "what is the answer ?", "tell me how to steal a car"]


def _planted(n=60, d=8, seed=0):
    return planted_prompts(n, d, seed, shift=2.5)


def _gates(d=6, k=4, n=2, seed=0):
    rng = np.random.default_rng(seed)
    lin = LinearGate(rng.normal(size=d), 0.3)
    mlp = MLPGate(rng.normal(size=k), -0.2, rng.normal(size=(k, d)), rng.normal(size=k))
    st = StackedGate(MLPGate(rng.normal(size=k), 0.1, rng.normal(size=(k, n * d)), rng.normal(size=k)), n)
    return {"linear": lin, "mlp": mlp, "stacked": st}


def _hand(gate, H):
    """float64 reference by hand, in plain Python sums."""
    inner = gate.inner if isinstance(gate, StackedGate) else gate
    out = []
    for h in H:
        if isinstance(inner, LinearGate):
            out.append(sum(float(a) * float(x) for a, x in zip(inner.w, h)) + inner.b)
        else:
            z = [
                max(sum(float(a) * float(x) for a, x in zip(row, h)) + c, 0.0)
                for row, c in zip(inner.W1, inner.b1)
            ]
            out.append(sum(float(a) * u for a, u in zip(inner.w, z)) + inner.b)
    return np.array(out)


@pytest.mark.parametrize("kind", ["linear", "mlp", "stacked"])
def test_builtin_kind_scores_torch_numpy_and_by_hand(kind, tmp_path):
    g = _gates()[kind]
    assert GATE_KINDS[kind] is type(g) and gate_kind(kind) is type(g)
    H = np.random.default_rng(1).normal(size=(9, g.d))
    np.testing.assert_allclose(g.score(H), _hand(g, H), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        g.torch_scorer()(torch.as_tensor(H)).numpy(), g.score(H), rtol=1e-12, atol=1e-14
    )
    layers = (0, 2) if kind == "stacked" else (1,)
    c = Condition.of(g, layers, "prompt", 0.5, "g", {"x": 1})
    d = Condition.load(c.save(tmp_path / kind))
    assert (d.kind, d.layers, d.layer, d.position, d.threshold, d.meta) == (
        kind,
        layers,
        layers[-1],
        "prompt",
        0.5,
        {"x": 1},
    )
    np.testing.assert_array_equal(d.score(H), c.score(H))
    assert c.with_threshold(1.0, layer=layers[-1]).layers == layers


def test_todays_files_and_constructor_still_work(tmp_path):
    """A condition saved by the previous code (no 'layers', kind linear/mlp) loads as it was."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    w, W1, b1 = rng.normal(size=3), rng.normal(size=(3, 5)), rng.normal(size=3)
    for kind, tensors, d in (
        ("linear", {"w": rng.normal(size=5), "b": np.array([0.25])}, 5),
        ("mlp", {"w": w, "b": np.array([-1.0]), "W1": W1, "b1": b1}, 5),
    ):
        folder = tmp_path / kind
        folder.mkdir()
        save_file(tensors, str(folder / "condition.safetensors"))
        hidden = 0 if kind == "linear" else 3
        head = {"format": "safesteer-condition", "version": 1, "layer": 4, "position": "prompt_end"}
        rest = {"threshold": 0.1, "name": "old", "d": d, "kind": kind, "hidden": hidden, "meta": {"a": 1}}
        (folder / "condition.json").write_text(json.dumps({**head, **rest}))
        c = Condition.load(folder)
        assert (c.kind, c.layers, c.threshold, c.name) == (kind, (4,), 0.1, "old")
        H = rng.normal(size=(4, 5))
        want = (
            H @ tensors["w"] + tensors["b"][0] if kind == "linear" else np.maximum(H @ W1.T + b1, 0) @ w - 1.0
        )
        np.testing.assert_array_equal(c.score(H), want)
        c.save(tmp_path / f"again-{kind}")  # the same file format as before for linear / mlp
        assert json.loads((tmp_path / f"again-{kind}" / "condition.json").read_text()) == {**head, **rest}
    with pytest.raises(SafesteerError, match="reads 2 layer"):
        Condition.of(_gates()["stacked"], 3)
    with pytest.raises(SafesteerError, match="not the deepest"):
        Condition.of(_gates()["stacked"], (1, 2)).with_threshold(0.0, layer=1)
    with pytest.raises(SafesteerError, match="unknown"):
        gate_kind("nope")


def test_linear_and_mlp_fits_unchanged():
    """train_gate through the registry = the fits it made before (same weights, bit for bit)."""
    from safesteer.probes.logistic import train_probe

    H, P = _planted()
    tr, te = P.mask("train"), P.mask("test")
    lin = train_gate(H, P, layer=2, Cs=(0.1, 1.0))
    probe = train_probe(
        H[tr], P.harmful[tr], H[te], P.harmful[te], balanced=True, seed=0, Cs=(0.1, 1.0), folds=3
    )
    np.testing.assert_array_equal(lin.w, np.asarray(probe.w))
    assert lin.b == float(probe.b) and lin.meta["C"] == probe.metrics["C"]
    assert lin.meta["test_auroc"] == probe.metrics["auroc"] and list(lin.meta)[:3] == [
        "probe_metrics",
        "target_fpr",
        "weighting",
    ]
    mlp = train_gate(H, P, layer=2, hidden=4, members=2, mlp_alpha=1e-2)
    w, b, W1, b1 = fit_mlp(H[tr], P.harmful[tr], 4, 2, 1e-2, 0)
    assert (
        np.array_equal(mlp.w, w) and mlp.b == b and np.array_equal(mlp.W1, W1) and np.array_equal(mlp.b1, b1)
    )
    assert [k for k in mlp.meta if k in ("kind", "hidden", "members", "mlp_alpha", "test_auroc")] == [
        "kind",
        "hidden",
        "members",
        "mlp_alpha",
        "test_auroc",
    ]
    assert train_gate(H, P, layer=2, kind="mlp", hidden=4, members=2, mlp_alpha=1e-2).meta == mlp.meta


def test_stacked_fit_is_its_inner_kind_on_side_by_side_layers():
    H, P = _planted(d=8)
    A, B = H[:, :4], H[:, 4:]
    X = stack_features({3: A, 5: B}, (3, 5))
    st = train_gate(X, P, layer=(3, 5), kind="stacked", Cs=(1.0,))
    lin = train_gate(X, P, layer=5, Cs=(1.0,))
    assert st.kind == "stacked" and st.layers == (3, 5) and st.layer == 5 and st.gate.n_layers == 2
    np.testing.assert_array_equal(st.score(X), lin.score(X))
    assert st.meta["inner"] == "linear" and st.meta["n_layers"] == 2
    assert np.array_equal(
        cross_fit_scores(st, X, P, folds=3), cross_fit_scores(lin, X, P, folds=3), equal_nan=True
    )
    assert lodo(X, P, model=st.meta) == lodo(X, P, model=lin.meta)


@register_gate
class ToyGate(GateKind):
    """A test-only kind: the difference of class means, as ``w·h`` with no bias."""

    name = "toy"

    def __init__(self, w):
        self.w = np.asarray(w, dtype=np.float64)

    @property
    def d(self):
        return int(self.w.shape[0])

    @classmethod
    def fit(cls, H, y, weight, seed, options, *, held_out=None, jobs=None):
        return Fitted(cls(H[y == 1].mean(0) - H[y == 0].mean(0)), {"kind": cls.name})

    def score(self, H):
        return H @ self.w

    def torch_scorer(self, device=None):
        w = torch.as_tensor(self.w, dtype=torch.float64, device=device)
        return lambda x: x.double() @ w

    def tensors(self):
        return {"w": self.w}

    @classmethod
    def from_tensors(cls, tensors, config):
        return cls(tensors["w"])


def _chat_rows(bb, layers, position="prompt_end"):
    """Pooled features of PROMPTS (rows repeated) at ``layers``, with a Prompts table flagging rows 0 and
    3."""
    reps = 12
    texts = [f"{p} {i}" for i in range(reps) for p in PROMPTS]
    pooled = bb.pooled(texts, list(layers), position=position)
    y = np.array([1, 0, 0, 1] * reps)
    P = Prompts(texts, y, ["h" if v else "s" for v in y], ["train", "val", "test"] * (len(texts) // 3))
    return stack_features({l: v.astype(np.float64) for l, v in pooled.items()}, layers), P


def test_toy_kind_trains_and_runs_conditionally(tiny_llama, one_thread, tmp_path):
    bb = tiny_llama
    H, P = _chat_rows(bb, (1,))
    cond = train_gate(H, P, layer=1, kind="toy", target_fpr=0.0)
    assert cond.kind == "toy" and cond.meta["kind"] == "toy" and "test_auroc" in cond.meta
    cond = Condition.load(cond.save(tmp_path / "toy"))
    want = gate_scores(bb, cond, PROMPTS)
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(0)).numpy()
    iv = Intervention("v", 2, v / np.linalg.norm(v), 20.0)
    chats = [bb.chat_prompt(p) for p in PROMPTS]
    enc = bb.tokenize(chats, padding_side="left", add_special_tokens=False)
    l0 = bb.logits(enc.input_ids, enc.attention_mask)
    with conditional(bb, cond, iv) as st:
        l1 = bb.logits(enc.input_ids, enc.attention_mask)
    np.testing.assert_allclose(st.scores[0], want, rtol=1e-4, atol=1e-4)
    f = torch.as_tensor(st.flags)
    assert st.flags.tolist() == (want > cond.threshold).tolist() and 0 < f.sum() < 4
    assert torch.equal(l1[~f], l0[~f]) and not torch.equal(l1[f], l0[f])
    assert foreign_hooks(bb.layers) == 0 and bb.steer_layers == ()


@pytest.mark.parametrize("steer_layer", [1, 0])  # 1: read in the pass; 0: a second, unsteered pass
@pytest.mark.parametrize("position", ["prompt_end", "prompt"])
def test_stacked_gate_in_pass_equals_offline_score(tiny_llama, one_thread, steer_layer, position):
    bb = tiny_llama
    layers = (0, 1)
    H, P = _chat_rows(bb, layers, position)
    cond = train_gate(H, P, layer=layers, position=position, kind="stacked", Cs=(1.0,), target_fpr=0.0)
    pooled = bb.pooled(PROMPTS, list(layers), position=position)
    offline = cond.score(np.concatenate([pooled[0], pooled[1]], axis=1))
    np.testing.assert_array_equal(gate_scores(bb, cond, PROMPTS), offline)
    s = np.sort(offline)
    cond.threshold = float((s[1] + s[2]) / 2)  # two rows flagged
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(1)).numpy()
    iv = Intervention("v", steer_layer, v / np.linalg.norm(v), 20.0)
    chats = [bb.chat_prompt(p) for p in PROMPTS]
    enc = bb.tokenize(chats, padding_side="left", add_special_tokens=False)
    l0 = bb.logits(enc.input_ids, enc.attention_mask)
    with conditional(bb, cond, iv) as st:
        l1 = bb.logits(enc.input_ids, enc.attention_mask)
    np.testing.assert_allclose(st.scores[0], offline, rtol=1e-5, atol=1e-5)
    f = torch.as_tensor(st.flags)
    assert st.flags.tolist() == (offline > cond.threshold).tolist() and int(f.sum()) == 2
    assert torch.equal(l1[~f], l0[~f]) and not torch.equal(l1[f], l0[f])
    assert foreign_hooks(bb.layers) == 0


def test_mlp_fit_is_sklearn_on_standardised_rows_with_balanced_times_given_weights():
    """One member, by hand: float64 standardisation (features of std < 1 too), sample weights =
    class balance x the caller's weights, the member's logit read back in raw space."""
    import warnings

    from sklearn.neural_network import MLPClassifier
    from sklearn.utils.class_weight import compute_sample_weight

    from safesteer.steering.gate_fit import fit_mlp

    rng = np.random.default_rng(5)
    y = np.r_[np.ones(20), np.zeros(40)].astype(int)
    H = (rng.normal(size=(60, 5)) * 0.1 + 0.05 * y[:, None]).astype(np.float32)
    weight = rng.uniform(0.2, 3.0, size=60)
    w, b, W1, b1 = fit_mlp(H, y, hidden=4, members=1, alpha=1e-3, seed=3, weight=weight, max_iter=300, jobs=1)
    Hd = H.astype(np.float64)
    mu, sd = Hd.mean(0), Hd.std(0)
    Z = (Hd - mu) / sd
    clf = MLPClassifier((4,), alpha=1e-3, max_iter=300, random_state=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(Z, y, sample_weight=compute_sample_weight("balanced", y) * weight)
    ref = np.maximum(Z @ clf.coefs_[0] + clf.intercepts_[0], 0) @ clf.coefs_[1][:, 0] + clf.intercepts_[1][0]
    ours = np.maximum(Hd @ W1.T + b1, 0) @ w + b
    assert np.allclose(ours, ref, rtol=0, atol=1e-8)
    with pytest.raises(SafesteerError, match="members >= 1"):
        fit_mlp(H, y, hidden=4, members=0)


def test_mlp_gate_checks_its_shapes_and_flattens_its_output_weights():
    from safesteer.steering.gates import MLPGate

    rng = np.random.default_rng(0)
    w, W1, b1 = rng.normal(size=3), rng.normal(size=(3, 4)), rng.normal(size=3)
    X = rng.normal(size=(6, 4))
    assert np.array_equal(MLPGate(w.reshape(-1, 1), 0.2, W1, b1).score(X), MLPGate(w, 0.2, W1, b1).score(X))
    with pytest.raises(SafesteerError):
        MLPGate(w, 0.2, W1, rng.normal(size=2))  # b1 of the wrong length alone


def test_an_unknown_gate_kind_lists_the_registered_ones():
    from safesteer.steering.gates import GATE_KINDS, gate_kind

    with pytest.raises(SafesteerError, match=f"valid choices: {', '.join(GATE_KINDS)}$"):
        gate_kind("forest")
