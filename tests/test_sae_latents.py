"""Sparse latent store (encode H -> Z), and the train-sae / encode commands on a real store folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from safesteer.errors import SafesteerError
from safesteer.sae import GatedSAE, SAEConfig, load_sae
from safesteer.sae.latents import LatentStore, decode_sparse, encode_store, index_dtype

pytest.importorskip("safesteer.store")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_store(folder: Path, X: np.ndarray, shard_rows: int = 500) -> Path:
    """A minimal activation store in the extraction layout (manifest + shard/ids .npy)."""
    from safesteer.io import sha256_file
    from safesteer.store.layout import FORMAT, shard_files

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(X), shard_rows)):
        files = shard_files(i)
        H = X[start : start + shard_rows]
        np.save(folder / files["H"], H, allow_pickle=False)
        np.save(
            folder / files["ids"],
            np.array([f"r{j}" for j in range(start, start + len(H))]),
            allow_pickle=False,
        )
        shards.append(
            {
                "index": i,
                "rows": len(H),
                "files": {"H": files["H"], "ids": files["ids"]},
                "sha256": {"H": sha256_file(folder / files["H"]), "ids": sha256_file(folder / files["ids"])},
            }
        )
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "d": int(X.shape[1]),
                "dtype": str(X.dtype),
                "layer": 3,
                "model": "synthetic",
                "shards": shards,
                "complete": True,
            }
        )
    )
    return folder


def _data(n=1100, d=8, seed=0):
    g = np.random.default_rng(seed)
    D = g.normal(size=(16, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = (g.random((n, 16)) < 0.15) * g.uniform(0.5, 2.0, size=(n, 16))
    return (Z @ D * 20 + 3).astype(np.float32)  # raw activations: large norm and an offset


def _sae(d=8, s=32, seed=0):
    sae = GatedSAE(SAEConfig(d_in=d, d_sae=s), seed=seed)
    with torch.no_grad():
        sae.b_gate.fill_(-2.0)
        sae.b_dec.fill_(3.0)
    return sae


def test_encode_store_matches_dense_path_and_resumes(tmp_path):
    X = _data()
    acts = make_store(tmp_path / "acts", X)
    sae = _sae()
    z = encode_store(sae, acts, tmp_path / "z", batch_size=128, progress=False)
    assert z.n_rows == len(X) and z.n_latents == 32 and len(z.shards) == 3
    m = z.manifest
    assert m["format"] == "safesteer-sparse-z/1" and m["d_in"] == 8 and m["sae"]["weights_sha256"]
    assert m["dense_fp16_bytes_per_row"] == 64 and 0 < m["bytes_per_row"] < 64
    start = 0
    for index, Z, ids in z.iter_shards():
        assert isinstance(Z, sp.csr_matrix) and Z.dtype == np.float32 and Z.shape[1] == 32
        x = torch.from_numpy(X[start : start + Z.shape[0]])
        with torch.no_grad():
            f = sae.encode(x)
            # sparse store -> decode == dense path on the same (float16-rounded) codes
            torch.testing.assert_close(
                decode_sparse(sae, Z), sae.decode(f.half().float()), rtol=1e-5, atol=1e-4
            )
            torch.testing.assert_close(decode_sparse(sae, Z), sae(x), rtol=2e-3, atol=2e-2)
        assert list(ids) == [f"r{j}" for j in range(start, start + Z.shape[0])]
        files = z.shards[index]["files"]
        assert np.load(z.path / files["indices"]).dtype == np.uint16
        assert np.load(z.path / files["indptr"]).dtype == np.int64
        assert np.load(z.path / files["values"]).dtype == np.float16
        start += Z.shape[0]
    # resume: intact shards are skipped, a damaged one is re-encoded
    f0 = z.path / z.shards[0]["files"]["values"]
    f1 = z.path / z.shards[1]["files"]["values"]
    t0 = os.stat(f0).st_mtime_ns
    f1.write_bytes(b"broken")
    z2 = encode_store(sae, acts, tmp_path / "z", progress=False)
    assert os.stat(f0).st_mtime_ns == t0
    assert z2.manifest["shards"][1]["sha256"] == m["shards"][1]["sha256"]
    # another SAE into the same folder is refused; a wrong width too
    with pytest.raises(SafesteerError, match="another SAE"):
        encode_store(_sae(seed=1), acts, tmp_path / "z", progress=False)
    with pytest.raises(SafesteerError, match="width 8"):
        encode_store(_sae(d=6), acts, tmp_path / "z6", progress=False)


def test_wide_dictionaries_use_int32_indices(tmp_path):
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.int32
    acts = make_store(tmp_path / "acts", _data(n=40, d=2))
    sae = GatedSAE(SAEConfig(d_in=2, d_sae=70000), seed=0)
    z = encode_store(sae, acts, tmp_path / "z", progress=False)
    assert np.load(z.path / z.shards[0]["files"]["indices"]).dtype == np.int32
    _, Z, _ = next(z.iter_shards())
    assert Z.shape == (40, 70000) and Z.nnz > 0


def test_cli_train_sae_and_encode(tmp_path, capsys):
    from safesteer.cli.main import main

    acts = make_store(tmp_path / "acts", _data(n=1200))
    out = tmp_path / "run"

    def args(epochs=2, l1="0.05", resume=False):
        a = [
            "train-sae",
            "--acts",
            str(acts),
            "--out",
            str(out),
            "--expansion",
            "4",
            "--l1",
            l1,
            "--epochs",
            str(epochs),
            "--batch-size",
            "64",
            "--lr",
            "3e-3",
            "--lr-warmup",
            "10",
            "--no-progress",
            "--shuffle-buffer",
            "256",
        ]
        return a + (["--resume"] if resume else [])

    assert main(args()) == 0
    text = capsys.readouterr().out
    assert "| epoch | train loss" in text and "SAE ->" in text
    sae = load_sae(out / "sae")
    assert sae.cfg.d_in == 8 and sae.cfg.d_sae == 32 and sae.cfg.metadata.get("hook_layer") == 3
    # re-running into the same folder without --resume is refused (one line, exit 2)
    assert main(args()) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume with more epochs continues; with another L1 it is refused
    assert main(args(epochs=3, resume=True)) == 0
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"] == 3
    capsys.readouterr()
    assert main(args(epochs=3, l1="0.5", resume=True)) == 2
    assert "another configuration (l1: checkpoint 0.05, now 0.5)" in capsys.readouterr().err
    # bad values
    assert (
        main(
            [
                "train-sae",
                "--acts",
                str(acts),
                "--out",
                str(tmp_path / "x"),
                "--expansion",
                "0",
                "--no-progress",
            ]
        )
        == 2
    )
    assert (
        main(["train-sae", "--acts", str(acts), "--out", str(tmp_path / "x"), "--l1", "-1", "--no-progress"])
        == 2
    )
    capsys.readouterr()
    # encode
    assert (
        main(
            [
                "encode",
                "--sae",
                str(out / "sae"),
                "--acts",
                str(acts),
                "--out",
                str(tmp_path / "z"),
                "--no-progress",
            ]
        )
        == 0
    )
    msg = capsys.readouterr().out
    assert "bytes/row vs 64 bytes/row as dense float16" in msg
    assert LatentStore(tmp_path / "z").n_rows == 1200
