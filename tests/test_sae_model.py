"""Gated SAE model: exact gradients (autograd and finite differences), aux path, constraint, saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.sae import GatedSAE, SAEConfig, TrainConfig, load_sae, loss_and_grads, reference_loss, save_sae
from safesteer.sae.gated import PARAM_NAMES, gated_forward
from safesteer.sae.saving import fold_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_sae(variant: str, d: int = 6, s: int = 16, seed: int = 0, dtype=torch.float64) -> GatedSAE:
    sae = GatedSAE(SAEConfig(d_in=d, d_sae=s, variant=variant), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_gate.copy_(torch.randn(s, generator=g, dtype=dtype) * 0.3)
        sae.b_mag.copy_(torch.randn(s, generator=g, dtype=dtype) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g, dtype=dtype) * 0.1)
        if variant == "paper":
            sae.r_mag.copy_(torch.randn(s, generator=g, dtype=dtype) * 0.3)
    return sae


def _params(sae: GatedSAE) -> dict[str, torch.Tensor]:
    return {n: getattr(sae, n).detach().clone() for n in PARAM_NAMES}


@pytest.mark.parametrize("variant", ["paper", "article"])
@pytest.mark.parametrize("threshold", [0.0, 1.1])  # dense path, sparse (CSR) path
def test_fused_gradients_match_autograd(variant, threshold):
    sae = _random_sae(variant)
    x = torch.randn(11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = sae.loss(x, 0.07)
    out["loss"].backward()
    # chunk_elems forces several row chunks: the result must be the same sum
    grads, st = loss_and_grads(_params(sae), x, 0.07, variant, sparse_threshold=threshold, chunk_elems=16 * 4)
    assert st.path == ("sparse" if threshold > 1 else "dense")
    assert st.loss == pytest.approx(out["loss"].detach().item(), abs=1e-12)
    assert st.l0 == pytest.approx(float((out["f"] > 0).sum(1).double().mean()))
    for n in PARAM_NAMES:
        ref = getattr(sae, n).grad
        ref = torch.zeros_like(grads[n]) if ref is None else ref
        torch.testing.assert_close(grads[n], ref, atol=1e-12, rtol=1e-10, msg=f"{variant} {n}")
    # reused workspace buffers (one chunk and several) give the very same numbers, call after call
    ws: dict = {}
    for chunk in (1 << 27, 16 * 4, 1 << 27):
        g_ws, _ = loss_and_grads(
            _params(sae), x, 0.07, variant, sparse_threshold=threshold, chunk_elems=chunk, workspace=ws
        )
        g_plain, _ = loss_and_grads(
            _params(sae), x, 0.07, variant, sparse_threshold=threshold, chunk_elems=chunk
        )
        for n in PARAM_NAMES:
            assert torch.equal(g_ws[n], g_plain[n]), n


@pytest.mark.parametrize("threshold", [0.0, 1.1])
def test_bf16_matmuls_stay_close_to_fp32(threshold):
    sae = _random_sae("paper", d=16, s=64, dtype=torch.float32)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    g32, s32 = loss_and_grads(_params(sae), x, 0.05, "paper", sparse_threshold=threshold)
    g16, s16 = loss_and_grads(_params(sae), x, 0.05, "paper", sparse_threshold=threshold, bf16=True)
    assert s16.loss == pytest.approx(s32.loss, rel=3e-2)
    for n in ("W_enc", "W_dec", "b_dec"):
        cos = torch.nn.functional.cosine_similarity(g16[n].reshape(-1), g32[n].reshape(-1), dim=0)
        assert float(cos) > 0.98, n


@pytest.mark.parametrize("variant", ["paper", "article"])
def test_gradients_match_finite_differences(variant):
    sae = _random_sae(variant, d=5, s=12, seed=4)
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    p = _params(sae)
    grads, _ = loss_and_grads(p, x, 0.05, variant)
    frozen = {"W_dec": p["W_dec"].clone(), "b_dec": p["b_dec"].clone()}

    def loss(q):
        # stop-gradient = the aux term sees the decoder as a constant
        main = reference_loss(q, x, 0.05, variant)
        a = torch.relu((x - q["b_dec"]) @ q["W_enc"] + q["b_gate"])
        aux = (x - (a @ frozen["W_dec"] + frozen["b_dec"])).pow(2).sum(-1).mean()
        return float(main["mse"] + 0.05 * main["l1"] + aux)

    eps = 1e-6
    g = torch.Generator().manual_seed(0)
    checked = 0
    for n in PARAM_NAMES:
        if variant == "article" and n == "r_mag":
            continue
        flat = p[n].view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:6].tolist():
            old = float(flat[i])
            flat[i] = old + eps
            lp = loss(p)
            flat[i] = old - eps
            lm = loss(p)
            flat[i] = old
            fd = (lp - lm) / (2 * eps)
            assert grads[n].reshape(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), f"{n}[{i}]"
            checked += 1
    assert checked >= 25


def test_aux_term_gives_no_gradient_to_decoder():
    sae = _random_sae("paper")
    x = torch.randn(10, 6, dtype=torch.float64)
    out = sae.loss(x, 0.1)
    g_wdec, g_bdec = torch.autograd.grad(
        out["aux"], [sae.W_dec, sae.b_dec], allow_unused=True, retain_graph=True
    )
    assert g_wdec is None or float(g_wdec.abs().max()) == 0.0
    # b_dec reaches the aux term only as the encoder's input centring (x - b_dec), as in the paper's
    # pi_gate(x) and dictionary_learning: with a separate leaf for that role, the output-bias role gets
    # nothing
    b_in = sae.b_dec.detach().clone().requires_grad_(True)
    b_out = sae.b_dec.detach().clone().requires_grad_(True)
    a = torch.relu((x - b_in) @ sae.W_enc + sae.b_gate)
    aux = (x - (a @ sae.W_dec.detach() + b_out.detach())).pow(2).sum(-1).mean()
    g_in = torch.autograd.grad(aux, [b_in])[0]
    torch.testing.assert_close(g_bdec, g_in)
    # the fused kernel: the decoder gradients of the full loss are those of the reconstruction alone
    grads, _ = loss_and_grads(_params(sae), x, 0.1, "paper")
    g_mse = torch.autograd.grad(out["mse"], [sae.W_dec, sae.b_dec], retain_graph=True)
    torch.testing.assert_close(grads["W_dec"], g_mse[0])
    # b_dec also receives the (encoder-input) gradients of every term through x - b_dec
    g_enc_side = torch.autograd.grad(out["loss"], [sae.b_dec])[0]
    torch.testing.assert_close(grads["b_dec"], g_enc_side)
    # and the aux term does move the gate path
    g_gate = torch.autograd.grad(sae.loss(x, 0.1)["aux"], [sae.b_gate, sae.W_enc])
    assert float(g_gate[0].abs().sum()) > 0 and float(g_gate[1].abs().sum()) > 0


def test_encode_is_the_gated_formula_and_article_is_r_mag_zero():
    sae = _random_sae("paper", dtype=torch.float32)
    x = torch.randn(20, 6)
    pre = (x - sae.b_dec) @ sae.W_enc
    f = ((pre + sae.b_gate) > 0).float() * torch.relu(torch.exp(sae.r_mag) * pre + sae.b_mag)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec)
    art = _random_sae("article", dtype=torch.float32)
    assert float(art.r_mag.abs().max()) == 0.0 and not art.r_mag.requires_grad


def test_constrained_adam_keeps_unit_decoder_rows():
    from safesteer.sae.trainer import Trainer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 8)).astype(np.float32) * 3
    cfg = TrainConfig(expansion=4, l1=0.05, lr=5e-2, lr_warmup_steps=0, batch_size=64, epochs=1)
    tr = Trainer(cfg, 8)
    tr._init_from_data(lambda e, s: iter([X]))
    for i in range(40):
        tr.train_step(torch.from_numpy(X[(i * 64) % 512 : (i * 64) % 512 + 64]) * tr.scale)
        norms = tr.params["W_dec"].norm(dim=1)
        assert float((norms - 1).abs().max()) <= 1e-5
    assert torch.equal(tr.params["W_dec"], tr.make_sae(scaled=True).W_dec.detach())


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(SafesteerError, match="expansion"):
        TrainConfig(expansion=0)
    with pytest.raises(SafesteerError, match="expansion"):
        TrainConfig(expansion=-4)
    with pytest.raises(SafesteerError, match="L1"):
        TrainConfig(l1=0.0)
    with pytest.raises(SafesteerError, match="L1"):
        TrainConfig(l1=-1e-4)
    with pytest.raises(SafesteerError, match="variant"):
        TrainConfig(variant="jumprelu")
    sae = GatedSAE(SAEConfig(d_in=6, d_sae=12))
    with pytest.raises(SafesteerError, match="width 7"):
        sae.encode(torch.zeros(2, 7))


def test_nan_and_wrong_width_batches_stop_training():
    from safesteer.sae.trainer import Trainer

    X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    bad = X.copy()
    bad[70, 3] = np.nan

    def batches(epoch, split):
        if split == "val":
            return iter([X[:32]])
        return iter([X[:64], bad[64:128], X[128:]])

    cfg = TrainConfig(expansion=2, l1=0.1, batch_size=64, epochs=1, init_rows=64)
    with pytest.raises(SafesteerError, match=r"NaN/Inf.*batch 1 of epoch 0 at step 1"):
        Trainer(cfg, 8).fit(batches)
    with pytest.raises(SafesteerError, match="width|rows x 9"):
        Trainer(cfg, 9).fit(batches)


@pytest.mark.parametrize("variant", ["paper", "article"])
def test_save_load_round_trip_and_saelens_layout(tmp_path, variant):
    from safetensors.torch import load_file

    sae = _random_sae(variant, d=8, s=24, dtype=torch.float32)
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["d_in"] == 8 and cfg["d_sae"] == 24
    assert (
        cfg["normalize_activations"] == "none"
        and cfg["apply_b_dec_to_input"] is True
        and cfg["variant"] == variant
    )
    t = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "W_enc": (8, 24),
        "b_gate": (24,),
        "r_mag": (24,),
        "b_mag": (24,),
        "W_dec": (24, 8),
        "b_dec": (8,),
    }
    back = load_sae(tmp_path / "sae")
    assert back.cfg.variant == variant
    for n in PARAM_NAMES:
        assert torch.equal(getattr(back, n), getattr(sae, n)), n
    x = torch.randn(5, 8)
    assert torch.equal(back(x), sae(x))
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SafesteerError, match="corrupted"):
        load_sae(tmp_path / "sae")


def test_scale_folding_keeps_unit_rows_and_reconstruction():
    sae = _random_sae("paper", d=8, s=24, dtype=torch.float32)
    c = 0.037
    raw = GatedSAE(SAEConfig(d_in=8, d_sae=24))
    with torch.no_grad():
        for n, v in fold_scale(_params(sae), c).items():
            getattr(raw, n).copy_(v)
    x = torch.randn(50, 8) * 30
    torch.testing.assert_close(raw(x), sae(c * x) / c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.encode(x), sae.encode(c * x) / c, rtol=1e-5, atol=1e-6)
    assert torch.equal(raw.W_dec, sae.W_dec)


def _old_encode(sae, x):
    """The module's encode as it was written before the shared forward."""
    pre = (x - sae.b_dec) @ sae.W_enc
    gate = (pre + sae.b_gate) > 0
    return torch.relu(pre * torch.exp(sae.r_mag) + sae.b_mag) * gate


def _old_reference(p, x, l1, variant):
    xt = x - p["b_dec"]
    pre = xt @ p["W_enc"]
    pi_gate = pre + p["b_gate"]
    gate = (pi_gate > 0).to(x.dtype)
    pi_mag = pre * torch.exp(p["r_mag"]) + p["b_mag"] if variant == "paper" else pre + p["b_mag"]
    m = torch.relu(pi_mag)
    f = gate * m
    x_hat = f @ p["W_dec"] + p["b_dec"]
    a = torch.relu(pi_gate)
    x_aux = a @ p["W_dec"].detach() + p["b_dec"].detach()
    mse = (x - x_hat).pow(2).sum(-1).mean()
    aux = (x - x_aux).pow(2).sum(-1).mean()
    sparsity = (a if variant == "paper" else m).sum(-1).mean()
    return {"loss": mse + l1 * sparsity + aux, "mse": mse, "aux": aux, "l1": sparsity, "f": f, "x_hat": x_hat}


def _old_eval_pieces(p, xc, variant):
    """Trainer.evaluate's forward as it was written before the shared forward."""
    xt = xc - p["b_dec"]
    pre = xt @ p["W_enc"]
    gate = (pre + p["b_gate"]) > 0
    if variant == "paper":
        m = torch.relu(pre * torch.exp(p["r_mag"]) + p["b_mag"])
        l1_term = torch.relu(pre + p["b_gate"]).sum(1)
    else:
        m = torch.relu(pre + p["b_mag"])
        l1_term = m.sum(1)
    f = m * gate
    x_hat = f @ p["W_dec"] + p["b_dec"]
    x_aux = torch.relu(pre + p["b_gate"]) @ p["W_dec"] + p["b_dec"]
    return f, x_hat, x_aux, l1_term


@pytest.mark.parametrize("variant", ["paper", "article"])
def test_one_forward_for_module_reference_and_evaluation(variant):
    """encode, reference_loss and the trainer's evaluation all run gated_forward, bit-equal to the old
    formulas."""
    from safesteer.sae.gated import gated_forward
    from safesteer.sae.metrics import ReconSums
    from safesteer.sae.trainer import Trainer

    sae = _random_sae(variant, d=6, s=16, dtype=torch.float32)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(sae.encode(x), _old_encode(sae, x))
        assert torch.equal(sae(x), _old_encode(sae, x) @ sae.W_dec + sae.b_dec)
    p = _params(sae)
    new, old = reference_loss(p, x, 0.3, variant), _old_reference(p, x, 0.3, variant)
    for k in old:
        assert torch.equal(new[k], old[k]), k
    # the same autograd graph: identical gradients
    pg = {n: t.clone().requires_grad_(True) for n, t in p.items()}
    g_new = torch.autograd.grad(
        reference_loss(pg, x, 0.3, variant)["loss"], list(pg.values()), allow_unused=True
    )
    g_old = torch.autograd.grad(
        _old_reference(pg, x, 0.3, variant)["loss"], list(pg.values()), allow_unused=True
    )
    for n, a, b in zip(pg, g_new, g_old):
        assert (a is None and b is None) or torch.equal(a, b), n
    fw = gated_forward(p, x, variant)
    f, x_hat, x_aux, l1_term = _old_eval_pieces(p, x, variant)
    assert torch.equal(fw.f, f) and torch.equal(fw.x_hat, x_hat) and torch.equal(fw.x_aux, x_aux)
    assert torch.equal(fw.sparsity(variant), l1_term)
    assert torch.equal(gated_forward(p, x, variant, decode=False).sparsity(variant), l1_term)
    # Trainer.evaluate on these weights equals ReconSums over the old pieces
    tr = Trainer(TrainConfig(expansion=16 // 6 + 1, l1=0.3, variant=variant), 6)
    tr.d_sae, tr.scale = 16, 1.0
    got = tr.evaluate([x.numpy()], params=p)
    sums = ReconSums()
    sums.add(x, x_hat, f, x_aux=x_aux, l1_term=l1_term)
    want = sums.summary(0.3)
    assert got.keys() - {"mse_raw"} == want.keys()
    for k in want:
        assert got[k] == want[k], k


@pytest.mark.parametrize("variant", ["paper", "article"])
def test_sparse_path_with_an_empty_row_and_a_dead_latent(variant):
    """CSR products whose last row / last column are empty (a row with every gate shut, a latent that
    never fires) still have the right shape and values: sparse = autograd."""
    sae = _random_sae(variant, seed=4)
    with torch.no_grad():
        sae.b_gate.fill_(-0.05)
        sae.b_gate[-1] = -1e3  # the last latent never opens
        sae.b_mag.copy_(sae.b_gate)  # article: no shift, the support is the gate
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[-1] = sae.b_dec.detach()  # x~ = 0: every gate of the last row is shut
    fw = gated_forward(_params(sae), x, variant)
    assert not fw.gate[-1].any() and not fw.gate[:, -1].any() and fw.gate.any()
    out = sae.loss(x, 0.05)
    out["loss"].backward()
    grads, st = loss_and_grads(_params(sae), x, 0.05, variant, sparse_threshold=1.1)
    assert st.path == "sparse"
    for n in PARAM_NAMES:
        ref = getattr(sae, n).grad
        ref = torch.zeros_like(grads[n]) if ref is None else ref
        assert grads[n].shape == ref.shape, n
        torch.testing.assert_close(grads[n], ref, atol=1e-12, rtol=1e-10, msg=f"{variant} {n}")


@pytest.mark.parametrize("variant", ["paper", "article"])
def test_step_stats_density_and_path_labels(variant):
    """density = share of (row, latent) pairs where a gradient can flow; path names what ran."""
    sae = _random_sae(variant, seed=6)
    x = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    p = _params(sae)
    fw = gated_forward(p, x, variant)
    support = (
        fw.pi_gate > 0
        if variant == "paper"
        else (fw.pi_gate + torch.clamp(p["b_mag"] - p["b_gate"], min=0)) > 0
    )
    _, st = loss_and_grads(p, x, 0.05, variant)
    assert st.path == "dense" and st.density == pytest.approx(float(support.double().mean()), abs=1e-15)
    assert loss_and_grads(p, x, 0.05, variant, sparse_threshold=1.1)[1].path == "sparse"
    # one row per chunk and a threshold between the rows' densities: some chunks dense, some sparse
    row_density = support.double().mean(1)
    assert row_density.min() < row_density.max()
    thr = float((row_density.min() + row_density.max()) / 2)
    _, st = loss_and_grads(p, x, 0.05, variant, sparse_threshold=thr, chunk_elems=16)
    assert st.path == "mixed" and st.density == pytest.approx(float(support.double().mean()), abs=1e-15)


def test_encode_decode_accept_token_grids():
    """(batch, seq, d_in) activations give the same latents / reconstructions as their flattened rows."""
    sae = _random_sae("paper", seed=8)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    f = sae.encode(x)
    assert f.shape == (2, 5, 16)
    torch.testing.assert_close(f.reshape(10, 16), sae.encode(x.reshape(10, 6)), atol=0, rtol=0)
    torch.testing.assert_close(sae.decode(f).reshape(10, 6), sae.decode(f.reshape(10, 16)), atol=0, rtol=0)
    fw = gated_forward(_params(sae), x, "paper")
    torch.testing.assert_close(fw.sparsity("paper"), torch.relu(fw.pi_gate).sum(-1))
    assert fw.sparsity("article").shape == (2, 5)


@pytest.mark.parametrize("threshold", [0.0, 1.1])
def test_step_stats_equal_the_reference_terms(threshold):
    """StepStats mse / aux / l1 are the batch means of reference_loss; var is the total variance of x."""
    sae = _random_sae("paper", seed=10)
    x = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 2 + 1
    ref = reference_loss(_params(sae), x, 0.1, "paper")
    _, st = loss_and_grads(_params(sae), x, 0.1, "paper", sparse_threshold=threshold, chunk_elems=16 * 5)
    for k in ("mse", "aux", "l1"):
        assert getattr(st, k) == pytest.approx(float(ref[k]), rel=1e-12), k
    assert st.var == pytest.approx(float(x.var(0, unbiased=False).sum()), rel=1e-12)


def test_init_is_seeded():
    cfg = SAEConfig(d_in=6, d_sae=16)
    a, b, c = GatedSAE(cfg, seed=3), GatedSAE(cfg, seed=3), GatedSAE(cfg, seed=4)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(a.W_dec, c.W_dec)
