"""lm-evaluation-harness export: lm-eval's own CSV loader reads our file into the policy's vector, and its
steered model (``safesteer-steered``) gives the logits of safesteer's hook."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.interop.lm_eval import COLUMNS, export_lm_eval, register
from safesteer.steering import Direction, DirectionSet

pytest.importorskip("lm_eval")
pytest.importorskip("sparsify")


def _directions(d: int = 32) -> DirectionSet:
    rng = np.random.default_rng(1)
    return DirectionSet(
        [Direction("harm", rng.normal(size=d), "probe", 2), Direction("tox", rng.normal(size=d), "probe", 2)]
    )


@pytest.mark.parametrize("alpha", [3.0, -1.5])
def test_lm_eval_parses_our_csv_into_the_policy_vector(tmp_path, alpha):
    from lm_eval.models.hf_steered import SteeredModel

    ds = _directions()
    out = export_lm_eval({"name": "p", "directions": ["harm"], "alpha": alpha}, ds, tmp_path / "p.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 1
    cfg = SteeredModel.derive_steer_config(
        str(out)
    )  # lm-eval's own loader (sparsify's SparseCoder.load_from_disk)
    assert list(cfg) == ["layers.2"]
    info = cfg["layers.2"]
    assert info["action"] == "add" and info["steering_coefficient"] == pytest.approx(alpha)
    v = info["steering_vector"].detach().numpy()
    # coefficient * vector is the policy's added vector, -alpha * d
    np.testing.assert_allclose(
        info["steering_coefficient"] * v, -alpha * ds["harm"].vector, rtol=1e-6, atol=1e-6
    )


def test_steered_model_runs_the_policy_like_our_hook(tmp_path, tiny_llama, one_thread):
    ds = _directions(tiny_llama.d_model)
    model = tmp_path / "model"
    tiny_llama.model.save_pretrained(model)
    tiny_llama.tokenizer.save_pretrained(model)
    out = export_lm_eval({"name": "p", "directions": ["harm", "tox"], "alpha": 5.0}, ds, tmp_path / "p.csv")
    cls = register()
    lm = cls(pretrained=str(model), steer_path=str(out), device="cpu", batch_size=1)
    enc = tiny_llama.tokenize(["how do i build a bomb"])
    with torch.no_grad():
        theirs = lm._model_call(enc.input_ids)
    from safesteer.steering import steering_vector, unit

    vec = steering_vector(unit(unit(ds["harm"].vector) + unit(ds["tox"].vector)))
    with tiny_llama.steer(2, vec, alpha=5.0):
        ours = tiny_llama.logits(enc.input_ids, torch.ones_like(enc.input_ids))
    base = tiny_llama.logits(enc.input_ids, torch.ones_like(enc.input_ids))
    assert float((ours - base).abs().max()) > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_stock_steered_model_refuses_csv_add_rows_which_is_why_we_register_ours(tmp_path, tiny_llama):
    """lm-eval 0.4.13 sets bias = b_dec for CSV rows, then asserts bias is None for action=add."""
    from lm_eval.models.hf_steered import SteeredModel

    model = tmp_path / "model"
    tiny_llama.model.save_pretrained(model)
    tiny_llama.tokenizer.save_pretrained(model)
    out = export_lm_eval(
        {"name": "p", "directions": ["harm"], "alpha": 1.0}, _directions(), tmp_path / "p.csv"
    )
    with pytest.raises(AssertionError, match="Bias is not supported"):
        SteeredModel(pretrained=str(model), steer_path=str(out), device="cpu", batch_size=1)


def test_zero_alpha_and_clamp_policies_are_refused(tmp_path):
    with pytest.raises(SafesteerError, match="alpha is 0"):
        export_lm_eval({"name": "p", "directions": ["harm"], "alpha": 0.0}, _directions(), tmp_path / "p.csv")
    with pytest.raises(SafesteerError, match="clamps"):
        export_lm_eval(
            {"name": "p", "directions": ["harm"], "alpha": 1.0, "clamps": [{"atoms": [0]}]},
            _directions(),
            tmp_path / "q.csv",
        )
