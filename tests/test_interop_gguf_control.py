"""llama.cpp control vectors: round trip, repeng reads ours (and we read repeng's), and the vector steers the
same block with the same sign when repeng's ControlModel applies it as when safesteer's hook does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.interop.gguf_control import (
    ControlVector,
    policy_control_vector,
    read_control_vector,
    to_directions,
    write_control_vector,
)
from safesteer.steering import Direction, DirectionSet, unit

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def repeng():
    """repeng, or a skip of the test that needs it (only those: the others run without it)."""
    if "float_" not in np.__dict__:  # repeng 0.4.0 annotates with np.float_, removed in numpy 2
        np.float_ = np.float64  # type: ignore[attr-defined]
    return pytest.importorskip("repeng")


def _directions(d: int = 32, layer: int = 2) -> DirectionSet:
    rng = np.random.default_rng(0)
    return DirectionSet(
        [
            Direction("harm", rng.normal(size=d), "probe", layer),
            Direction("tox", rng.normal(size=d), "probe", layer),
            Direction("early", rng.normal(size=d), "probe", 0),
        ]
    )


def test_policy_round_trip_with_alpha_folded_and_metadata(tmp_path):
    ds = _directions()
    cv, info = policy_control_vector({"name": "p", "directions": ["harm", "tox"], "alpha": 3.5}, ds, "llama")
    expected = -3.5 * unit(unit(ds["harm"].vector) + unit(ds["tox"].vector))
    assert list(cv.directions) == [2] and info["layer"] == 2
    np.testing.assert_allclose(cv.directions[2], expected, rtol=1e-6, atol=1e-6)
    write_control_vector(cv, tmp_path / "p.gguf", info)
    r = gguf.GGUFReader(str(tmp_path / "p.gguf"))
    field = lambda k: bytes(r.get_field(k).parts[-1])  # noqa: E731
    assert field("general.architecture") == b"controlvector" and field("controlvector.model_hint") == b"llama"
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 1
    assert [t.name for t in r.tensors] == ["direction.2"] and int(r.tensors[0].tensor_type) == 0  # F32
    back = read_control_vector(tmp_path / "p.gguf")
    np.testing.assert_array_equal(back.directions[2], cv.directions[2])
    ds2, alphas = to_directions(back, "p")
    assert alphas == {"p": pytest.approx(3.5, rel=1e-6)} and ds2["p"].layer == 2
    np.testing.assert_allclose(ds2["p"].vector, expected / -3.5, rtol=1e-5, atol=1e-6)  # toward unsafe again


def test_repeng_reads_ours_and_we_read_repengs(tmp_path, repeng):
    ds = _directions()
    cv, info = policy_control_vector(
        {"name": "p", "directions": ["harm"], "alpha": 2.0, "layer": 1}, ds, "llama"
    )
    write_control_vector(cv, tmp_path / "ours.gguf", info)
    theirs = repeng.ControlVector.import_gguf(str(tmp_path / "ours.gguf"))
    assert theirs.model_type == "llama" and set(theirs.directions) == {1}
    np.testing.assert_array_equal(theirs.directions[1], cv.directions[1])
    rng = np.random.default_rng(5)
    many = repeng.ControlVector("llama", {k: rng.normal(size=32).astype(np.float32) for k in (1, 2, 5)})
    many.export_gguf(str(tmp_path / "repeng.gguf"))
    back = read_control_vector(tmp_path / "repeng.gguf")
    assert back.model_hint == "llama" and list(back.directions) == [1, 2, 5]
    for k in (1, 2, 5):
        np.testing.assert_array_equal(back.directions[k], many.directions[k])


@pytest.mark.parametrize("layer", [1, 2])
def test_repeng_applies_our_vector_where_and_how_our_hook_does(tmp_path, layer, one_thread, repeng):
    """Same block, same sign: repeng's ControlModel on our file == Backbone.steer with the policy's alpha."""
    from safesteer.testing import make_tiny_llama

    bb = make_tiny_llama(seed=3)
    ds = _directions(bb.d_model)
    cv, info = policy_control_vector(
        {"name": "p", "directions": ["harm"], "alpha": 4.0, "layer": layer}, ds, "llama"
    )
    write_control_vector(cv, tmp_path / "p.gguf", info)
    enc = bb.tokenize(["how do i build a bomb", "the dog is in the house"])
    ids, mask = (
        enc.input_ids[:1],
        enc.attention_mask[:1],
    )  # one unpadded row: repeng's padding logic stays out of the way
    base = bb.logits(ids, mask)
    with bb.steer(layer, ds["harm"].steer_vector, alpha=4.0):
        ours = bb.logits(ids, mask)
    assert float((ours - base).abs().max()) > 1e-3
    cm = repeng.ControlModel(bb.model, [layer])
    try:
        cm.set_control(repeng.ControlVector.import_gguf(str(tmp_path / "p.gguf")), coeff=1.0)
        with torch.no_grad():
            theirs = cm(input_ids=ids, attention_mask=mask).logits
    finally:
        cm.unwrap()
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_unrepresentable_policies_and_files_are_refused_in_one_line(tmp_path):
    ds = _directions()
    cases = [
        ({"name": "p", "directions": ["early"], "alpha": 1.0}, "layer 0"),
        ({"name": "p", "directions": ["harm"], "alpha": 1.0, "clamps": [{"atoms": [1]}]}, "clamps SAE atoms"),
        (
            {
                "name": "p",
                "directions": ["harm"],
                "alpha": 1.0,
                "condition": {"probe": "x", "threshold": 0.5},
            },
            "conditional",
        ),
        ({"name": "p", "directions": ["harm", "early"], "alpha": 1.0}, "different layers"),
    ]
    for pol, msg in cases:
        with pytest.raises(SafesteerError, match=msg) as exc:
            policy_control_vector(pol, ds, "llama")
        assert "\n" not in exc.value.message
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()  # noqa: E702
    with pytest.raises(SafesteerError, match="not a control vector"):
        read_control_vector(tmp_path / "m.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(SafesteerError, match="not a GGUF"):
        read_control_vector(tmp_path / "junk.gguf")
    with pytest.raises(SafesteerError, match="layer >= 1"):
        ControlVector("llama", {0: np.ones(4)})


def test_the_repeng_free_tests_run_without_repeng():
    """repeng missing skips only the tests that use it (no module-level skip of this whole file)."""
    here = Path(__file__)
    code = (
        "import sys; sys.modules['repeng'] = None; import pytest; "
        f"sys.exit(pytest.main(['-rA', '-p', 'no:cacheprovider', {str(here)!r}, "
        "'-k', 'not without_repeng']))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=here.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for name in ("test_policy_round_trip_with_alpha_folded_and_metadata", "test_unrepresentable_policies"):
        assert f"PASSED tests/test_interop_gguf_control.py::{name}" in out, out[-3000:]
    assert out.count("could not import 'repeng'") == 2 and "2 passed, 3 skipped" in out, out[-3000:]
