"""SAE-space clamping: λ = 0 is the identity, only the chosen atoms' codes change, the error is kept."""

from __future__ import annotations

import pytest
import torch
from conftest import ReluSAE

from safesteer.errors import SafesteerError
from safesteer.steering import ClampEdit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lambda_zero_is_bit_exact_identity():
    sae = ReluSAE()
    h = torch.randn(2, 5, 32)
    for mode in ("subtract", "scale"):
        out = ClampEdit(sae, [1, 2, 3], lam=0.0, mode=mode)(h)
        assert torch.equal(out, h)


def test_only_chosen_codes_change_and_error_is_added_back():
    sae = ReluSAE()
    h = torch.randn(3, 4, 32) * 2
    atoms = [0, 5, 9, 17]
    edit = ClampEdit(sae, atoms, lam=0.5, mode="subtract")
    f, f_new = edit.codes(h)
    others = [i for i in range(f.shape[1]) if i not in atoms]
    assert torch.equal(f[:, others], f_new[:, others])
    assert torch.all(f_new[:, atoms] <= f[:, atoms])
    assert torch.all(f_new[:, atoms] >= 0)  # floored at 0, never raised
    assert not torch.equal(f_new[:, atoms], f[:, atoms])
    # x' = decode(f') + (x − decode(f))
    x = h.reshape(-1, 32)
    expected = sae.decode(f_new) + (x - sae.decode(f))
    torch.testing.assert_close(edit(h).reshape(-1, 32), expected, atol=1e-5, rtol=0)


def test_zero_mode_removes_atoms_and_scale_mode():
    sae = ReluSAE()
    h = torch.randn(6, 32) * 3
    f, f0 = ClampEdit(sae, [2, 4], mode="zero").codes(h)
    assert torch.all(f0[:, [2, 4]] == 0)
    _, fs = ClampEdit(sae, [2, 4], lam=0.25, mode="scale").codes(h)
    torch.testing.assert_close(fs[:, [2, 4]], 0.75 * f[:, [2, 4]])


def test_errors():
    sae = ReluSAE()
    with pytest.raises(SafesteerError):
        ClampEdit(sae, [], lam=1.0)
    with pytest.raises(SafesteerError):
        ClampEdit(sae, [1], mode="bogus")
    with pytest.raises(SafesteerError, match="out of range"):
        ClampEdit(sae, [999], lam=1.0)(torch.randn(2, 32))


def test_clamp_as_backbone_edit(tiny_backbone):
    bb = tiny_backbone
    sae = ReluSAE(d_in=bb.d_model, d_sae=48)
    enc = bb.tokenize(["the dog is good .", "you are a stupid idiot ."])
    base = bb.logits(enc.input_ids, enc.attention_mask)
    with bb.steer(1, edit=ClampEdit(sae, [0, 1], lam=0.0)):
        same = bb.logits(enc.input_ids, enc.attention_mask)
    assert torch.equal(base, same)
    with bb.steer(1, edit=ClampEdit(sae, list(range(48)), mode="zero")):
        moved = bb.logits(enc.input_ids, enc.attention_mask)
    assert not torch.allclose(base, moved)


class _Float64SAE(ReluSAE):
    """The SAE computing in float64 (as a float32 SAE does on a bf16 model)."""

    def encode(self, x):
        return super().encode(x.float()).double()

    def decode(self, f):
        return super().decode(f.float()).double()


def test_edit_keeps_the_hidden_dtype_when_the_sae_has_another():
    h = torch.randn(2, 3, 32) * 3
    out = ClampEdit(_Float64SAE(), [1, 2], lam=1.0)(h)
    assert out.dtype == torch.float32 and out.shape == h.shape and not torch.equal(out, h)
    ref = ClampEdit(ReluSAE(), [1, 2], lam=1.0)(h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_error_messages_name_the_problem():
    sae = ReluSAE()
    with pytest.raises(SafesteerError, match="no atoms to clamp; pass at least one atom index"):
        ClampEdit(sae, [])
    with pytest.raises(SafesteerError, match="valid choices: subtract, scale, zero"):
        ClampEdit(sae, [1], mode="bogus")
    with pytest.raises(SafesteerError, match=r"clamping needs an SAE with encode\(\) and decode\(\)"):
        ClampEdit(object(), [1])

    class Bad(ReluSAE):
        def encode(self, x):
            return super().encode(x)[:2]

    with pytest.raises(SafesteerError, match=r"SAE encode returned shape \(2, 64\) for 6 rows"):
        ClampEdit(Bad(), [1], lam=1.0)(torch.randn(6, 32))
