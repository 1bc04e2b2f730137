"""SAE training: planted-dictionary recovery, bit-exact resume, checkpoint refusals, metrics, grid."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safesteer.errors import SafesteerError
from safesteer.sae import TrainConfig, Trainer, array_batches, load_sae
from safesteer.sae.gated import PARAM_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(
    n: int = 8000, d: int = 32, m: int = 64, k: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows = sparse non-negative combinations of ``m`` unit atoms in ``d`` dims (``k`` per row)."""
    g = np.random.default_rng(seed)
    D = g.normal(size=(m, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = np.argsort(g.random((n, m)), axis=1)[:, :k]
    Z = np.zeros((n, m))
    np.put_along_axis(Z, idx, g.uniform(0.5, 1.5, size=(n, k)), axis=1)
    return (Z @ D).astype(np.float32), D


@pytest.mark.parametrize("variant,l1", [("paper", 1.0), ("article", 0.3)])
def test_planted_dictionary_is_recovered(variant, l1):
    X, D = planted()
    cfg = TrainConfig(
        expansion=4,
        l1=l1,
        variant=variant,
        lr=1e-2,
        lr_warmup_steps=20,
        batch_size=128,
        epochs=10,
        patience=10,
        init_rows=4096,
    )
    res = Trainer(cfg, 32).fit(array_batches(X, 128, seed=1))
    W = res.sae.W_dec.detach().numpy()
    best_cos = (D @ W.T).max(1)
    assert best_cos.mean() >= 0.9, f"mean best cosine {best_cos.mean():.3f}"
    last = res.history[-1]["val"]
    assert last["fvu"] < 0.3 and 1.0 < last["l0"] < 12.0


def _small_data(n=640, d=8, seed=0):
    X, _ = planted(n=n, d=d, m=12, k=2, seed=seed)
    return X


def _cfg(**kw):
    base = dict(
        expansion=4,
        l1=0.1,
        lr=5e-3,
        lr_warmup_steps=7,
        l1_warmup_steps=11,
        batch_size=32,
        epochs=3,
        patience=5,
        init_rows=256,
        beta1=0.5,
    )
    base.update(kw)
    return TrainConfig(**base)


def _tensors(folder):
    return load_file(str(folder / "sae" / "sae_weights.safetensors"))


class Killed(RuntimeError):
    pass


def test_resume_is_bit_exact(tmp_path):
    X = _small_data()
    batches = array_batches(X, 32, seed=3)
    full = Trainer(_cfg(), 8, tmp_path / "full").fit(batches)
    assert full.stopped == "epochs" and full.steps > 40

    # (1) stop after 23 steps (mid-epoch) with a checkpoint, then resume
    part = Trainer(_cfg(max_steps=23, checkpoint_every=5), 8, tmp_path / "a").fit(batches)
    assert part.stopped == "max_steps" and part.steps == 23
    resumed = Trainer(_cfg(checkpoint_every=5), 8, tmp_path / "a").fit(batches, resume=True)

    # (2) a crash inside the data stream at step ~31: resume from the step-30 checkpoint
    calls = {"n": 0}

    def crashing(epoch, split):
        for b in batches(epoch, split):
            if split == "train":
                calls["n"] += 1
                if calls["n"] == 32:
                    raise Killed("simulated kill")
            yield b

    with pytest.raises(Killed):
        Trainer(_cfg(checkpoint_every=5), 8, tmp_path / "b").fit(crashing)
    resumed2 = Trainer(_cfg(checkpoint_every=5), 8, tmp_path / "b").fit(batches, resume=True)

    ref = _tensors(tmp_path / "full")
    for folder in ("a", "b"):
        got = _tensors(tmp_path / folder)
        for n in PARAM_NAMES:
            assert torch.equal(got[n], ref[n]), f"{folder}: {n} differs after resume"
    for res in (resumed, resumed2):
        assert res.steps == full.steps
        assert [h["val"]["loss"] for h in res.history] == [h["val"]["loss"] for h in full.history]
    # only the last two checkpoints are kept
    assert len(list((tmp_path / "a" / "checkpoints").glob("ckpt-*"))) == 2


def test_checkpoint_refusals(tmp_path):
    X = _small_data()
    batches = array_batches(X, 32, seed=3)
    Trainer(_cfg(epochs=2), 8, tmp_path / "r").fit(batches)
    # another configuration
    with pytest.raises(SafesteerError, match=r"another configuration \(l1: checkpoint 0.1, now 0.2"):
        Trainer(_cfg(epochs=3, l1=0.2), 8, tmp_path / "r").fit(batches, resume=True)
    # an existing run without --resume
    with pytest.raises(SafesteerError, match="--resume"):
        Trainer(_cfg(epochs=3), 8, tmp_path / "r").fit(batches)
    # a corrupted latest checkpoint: refused, the previous one is still there
    ckpts = sorted((tmp_path / "r" / "checkpoints").glob("ckpt-*"))
    assert len(ckpts) == 2
    t = ckpts[-1] / "tensors.safetensors"
    raw = bytearray(t.read_bytes())
    raw[-100] ^= 0xFF
    t.write_bytes(bytes(raw))
    with pytest.raises(
        SafesteerError, match=rf"{ckpts[-1].name} is corrupted.*previous checkpoint {ckpts[0].name} is kept"
    ):
        Trainer(_cfg(epochs=3), 8, tmp_path / "r").fit(batches, resume=True)
    assert ckpts[0].is_dir()
    shutil.rmtree(ckpts[-1])
    res = Trainer(_cfg(epochs=3), 8, tmp_path / "r").fit(batches, resume=True)
    assert len(res.history) == 3
    (
        ckpts[0].parent / sorted((tmp_path / "r" / "checkpoints").glob("ckpt-*"))[-1].name / "state.json"
    ).write_text("{not json")
    with pytest.raises(SafesteerError, match="corrupted"):
        Trainer(_cfg(epochs=4), 8, tmp_path / "r").fit(batches, resume=True)


def test_metrics_early_stopping_and_scale_folding(tmp_path):
    X = _small_data()
    base = array_batches(X, 32, seed=3)

    def batches(epoch, split):
        if split == "val":  # validation gets harder every epoch: epoch 1 stays the best
            return (b * (1.0 + 0.5 * epoch) for b in base(epoch, split))
        return base(epoch, split)

    tr = Trainer(_cfg(epochs=6, patience=2), 8, tmp_path / "m")
    res = tr.fit(batches)
    assert res.stopped == "early_stopping" and len(res.history) == 3 and res.best_epoch == 1
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    v = m["history"][0]["val"]
    for k in ("mse", "fvu", "l0", "gamma", "loss", "explained_variance"):
        assert np.isfinite(v[k]), k
    assert 0 <= m["history"][0]["dead_fraction"] <= 1
    assert "| epoch | train loss | val loss" in (tmp_path / "m" / "convergence.md").read_text()
    # the saved SAE holds the best epoch's weights, scale folded back into the biases
    sae = load_sae(tmp_path / "m" / "sae")
    scaled = tr.make_sae(tr.best, scaled=True)
    x = torch.from_numpy(X[:64])
    with torch.no_grad():
        torch.testing.assert_close(sae(x), scaled(x * tr.scale) / tr.scale, rtol=1e-5, atol=1e-5)
    norms = sae.W_dec.detach().norm(dim=1)
    assert float((norms - 1).abs().max()) <= 1e-5
    assert abs(sae.cfg.scaling_factor - tr.scale) < 1e-12


def test_grid_sorts_by_val_loss_and_continues_the_best(tmp_path):
    from safesteer.sae.grid import run_grid

    X = _small_data(n=480)
    batches = array_batches(X, 48, seed=0)
    res = run_grid(
        batches,
        8,
        _cfg(batch_size=48),
        tmp_path,
        expansions=(2, 4),
        l1s=(0.3, 0.05),
        grid_epochs=1,
        grid_patience=1,
        final_epochs=3,
        final_patience=3,
    )
    losses = [r["best_val_loss"] for r in res.rows]
    assert losses == sorted(losses) and len(res.rows) == 4
    assert all(r["l0"] is not None for r in res.rows)
    assert len(res.final.history) == 3  # the winner went on from its grid checkpoint
    assert res.final.config.expansion == res.best["expansion"] and res.final.config.l1 == res.best["l1"]
    assert (tmp_path / "grid.md").read_text().count("\n") == 6
    assert load_sae(tmp_path / "sae").cfg.d_sae == 8 * res.best["expansion"]


def test_reduce_grads_hook_and_non_writer(tmp_path):
    """reduce_grads sees every step's gradients before the update; a non-writer trains the same but writes
    nothing."""
    X = _small_data()
    batches = array_batches(X, 32, seed=3)
    ref = Trainer(_cfg(epochs=1), 8).fit(batches)
    seen = []

    def mean_of_two_ranks(
        grads,
    ):  # both "ranks" saw the same batch: the all-reduce mean is the gradient itself
        seen.append(sorted(grads))
        for g in grads.values():
            g.copy_((g + g) / 2)

    res = Trainer(_cfg(epochs=1), 8, tmp_path / "w", reduce_grads=mean_of_two_ranks, is_writer=False).fit(
        batches
    )
    assert len(seen) == ref.steps and set(seen[0]) >= {"W_enc", "W_dec", "b_gate", "b_mag", "b_dec"}
    for n in PARAM_NAMES:
        assert torch.equal(getattr(res.sae, n), getattr(ref.sae, n)), n
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*"))

    def frozen(grads):
        for g in grads.values():
            g.zero_()

    tr = Trainer(_cfg(epochs=1, max_steps=5), 8, reduce_grads=frozen)
    tr.fit(batches)
    init = Trainer(_cfg(epochs=1, max_steps=5), 8)
    torch.manual_seed(0)
    init._init_from_data(batches)
    for n in ("b_gate", "b_mag", "b_dec", "W_enc"):
        assert torch.equal(tr.params[n], init.params[n]), n
