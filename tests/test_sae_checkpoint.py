"""Trainer checkpoints: one TrainerState round-trips exactly; corruption and foreign configs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.sae import TrainConfig, Trainer, array_batches
from safesteer.sae.checkpoint import KEEP_CHECKPOINTS, TrainerState, list_checkpoints, load_latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(expansion=2, l1=0.1, lr=5e-3, batch_size=32, epochs=1, init_rows=128, beta1=0.5, max_steps=7)
    base.update(kw)
    return TrainConfig(**base)


def _trained(tmp_path):
    X = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    tr = Trainer(_cfg(), 6, tmp_path / "run")
    tr.fit(array_batches(X, 32, seed=1))
    return tr


def test_state_round_trips_exactly(tmp_path):
    tr = _trained(tmp_path)
    before: TrainerState = tr.state()
    ckpts = list_checkpoints(tr.ckpt_dir)
    assert len(ckpts) == 1 and ckpts[0].name == "ckpt-0000000007"
    torch.manual_seed(123)  # loading restores the RNG saved with the checkpoint
    got = load_latest_checkpoint(
        tr.ckpt_dir, tr.fingerprint, torch.device("cpu"), lambda s: "?", tr._trainable(), 0.5
    )
    assert got is not None
    st, path = got
    assert path == ckpts[0]
    for k, t in before.tensors().items():
        assert torch.equal(st.tensors()[k], t), k
    assert st.scalars() == json.loads(json.dumps(before.scalars()))
    assert (
        st.params["W_enc"].stride() == tr.params["W_enc"].stride()
    )  # the (d_sae x d_in) memory layout is restored
    # a fresh trainer continues from exactly that state
    tr2 = Trainer(_cfg(), 6, tmp_path / "run")
    tr2.load_state(st)
    assert tr2.step == 7 and tr2.adam_m.keys() == tr.adam_m.keys()


def test_pruning_corruption_and_foreign_fingerprint(tmp_path):
    tr = _trained(tmp_path)
    for _ in range(3):
        tr.step += 1
        tr.save_checkpoint()
    assert len(list_checkpoints(tr.ckpt_dir)) == KEEP_CHECKPOINTS
    with pytest.raises(SafesteerError, match="another configuration \\(why\\)"):
        load_latest_checkpoint(
            tr.ckpt_dir, "other", torch.device("cpu"), lambda s: "why", tr._trainable(), 0.5
        )
    latest = list_checkpoints(tr.ckpt_dir)[-1]
    with open(latest / "tensors.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(SafesteerError, match="sha256 mismatch.*previous checkpoint"):
        load_latest_checkpoint(
            tr.ckpt_dir, tr.fingerprint, torch.device("cpu"), lambda s: "", tr._trainable(), 0.5
        )
    assert (
        load_latest_checkpoint(tmp_path / "nothing", "x", torch.device("cpu"), lambda s: "", [], 0.0) is None
    )
