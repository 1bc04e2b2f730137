"""``safesteer export`` / ``safesteer import``: control vectors, lm-eval CSV, SAELens folders (exit 2 + one
line on bad input)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from safesteer.cli.main import main
from safesteer.interop.gguf_control import read_control_vector
from safesteer.steering import Direction, DirectionSet


def _setup(tmp_path, tiny_llama):
    rng = np.random.default_rng(0)
    ds = DirectionSet([Direction("harm", rng.normal(size=32), "probe", 2)])
    ds.save(tmp_path / "dirs")
    (tmp_path / "pol.json").write_text(json.dumps({"directions": ["harm"], "alpha": 2.5}))
    model = tmp_path / "model"
    tiny_llama.model.save_pretrained(model)
    tiny_llama.tokenizer.save_pretrained(model)
    return ds, model


def test_control_vector_export_and_import(tmp_path, tiny_llama):
    ds, model = _setup(tmp_path, tiny_llama)
    assert (
        main(
            [
                "export",
                "control-vector",
                "--policy",
                str(tmp_path / "pol.json"),
                "--directions",
                str(tmp_path / "dirs"),
                "--model",
                str(model),
                "--out",
                str(tmp_path / "p.gguf"),
            ]
        )
        == 0
    )
    cv = read_control_vector(tmp_path / "p.gguf")
    assert cv.model_hint == "llama"
    np.testing.assert_allclose(cv.directions[2], -2.5 * ds["harm"].vector, rtol=1e-6)
    assert (
        main(
            [
                "import",
                "control-vector",
                str(tmp_path / "p.gguf"),
                "--out",
                str(tmp_path / "imp"),
                "--name",
                "x",
            ]
        )
        == 0
    )
    back = DirectionSet.load(tmp_path / "imp")
    np.testing.assert_allclose(back["x"].vector, ds["harm"].vector, rtol=1e-5, atol=1e-6)
    pol = json.loads((tmp_path / "imp" / "policies" / "x.json").read_text())
    assert pol["directions"] == ["x"] and pol["alpha"] == pytest.approx(2.5, rel=1e-6)


def test_lm_eval_export(tmp_path, tiny_llama):
    pytest.importorskip("sparsify")
    ds, _ = _setup(tmp_path, tiny_llama)
    assert (
        main(
            [
                "export",
                "lm-eval",
                "--policy",
                str(tmp_path / "pol.json"),
                "--directions",
                str(tmp_path / "dirs"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    (row,) = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert (
        row["hookpoint"] == "layers.2"
        and float(row["steering_coefficient"]) == 2.5
        and row["action"] == "add"
    )
    from safetensors.numpy import load_file

    w = load_file(str(tmp_path / "p.features" / "layers.2" / "sae.safetensors"))["W_dec"]
    np.testing.assert_allclose(w[0], -ds["harm"].vector, rtol=1e-6)


def test_saelens_import(tmp_path):
    sl = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = sl.StandardSAE(
        sl.StandardSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name="blocks.4.hook_resid_post"))
    )
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(32))
    sae.save_model(tmp_path / "sl")
    assert main(["import", "saelens", str(tmp_path / "sl"), "--out", str(tmp_path / "ours")]) == 0
    from safesteer.sae import load_sae

    ours = load_sae(tmp_path / "ours")
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    assert ours.cfg.metadata["hook_layer"] == 4


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_llama, capsys):
    _setup(tmp_path, tiny_llama)
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert (
        main(
            [
                "export",
                "control-vector",
                "--policy",
                str(tmp_path / "nope.json"),
                "--directions",
                str(tmp_path / "dirs"),
                "--out",
                str(tmp_path / "q.gguf"),
            ]
        )
        == 2
    )
    (tmp_path / "bad.gguf").write_bytes(b"xx")
    assert main(["import", "control-vector", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert main(["import", "saelens", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
