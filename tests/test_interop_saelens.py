"""SAELens round trip, checked by SAELens' own code (sae-lens pinned in the test extras).

Real activations: block outputs of the embedded SmolLM2 on XSTest prompts. A safesteer SAE trained
on them (training scale folded on save) must open with ``sae_lens.SAE.load_from_disk`` and give
our codes/reconstructions; SAELens-saved gated and standard SAEs must load into safesteer and give
SAELens' numbers (encode, cartography statistics, steering with clamps).
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.sae import TrainConfig, Trainer, array_batches, load_sae, save_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE, GatedSAE, GatedSAEConfig, StandardSAE, StandardSAEConfig  # noqa: E402

pytestmark = pytest.mark.integration
LAYER = 3


@pytest.fixture(scope="module")
def acts(smollm2, shared_data):
    """Token-level outputs of blocks 2..4 (rows x 576) for 40 XSTest prompts, plus HF's own hidden_states."""
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="") as fh:
        texts = [r["prompt"] for r in csv.DictReader(fh)][:40]
    enc = smollm2.tokenize(texts)
    with torch.no_grad():
        ours = smollm2.forward_layers(enc.input_ids, enc.attention_mask, [LAYER])
        hf = smollm2.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
        ).hidden_states
    m = enc.attention_mask.bool()
    return {"ours": ours[LAYER][m].float(), "hf": [h[m].float() for h in hf]}


@pytest.fixture(scope="module")
def trained(acts, smollm2, tmp_path_factory):
    """A safesteer Gated SAE trained on layer-3 activations (scale folded into the saved weights)."""
    X = acts["ours"].numpy()
    out = tmp_path_factory.mktemp("sae")
    cfg = TrainConfig(
        expansion=2, l1=1e-3, lr=1e-3, lr_warmup_steps=5, batch_size=128, epochs=3, patience=3, init_rows=1024
    )
    meta = {
        "model_name": smollm2.name,
        "hook_layer": LAYER,
        "activations": "token-level block outputs (test)",
    }
    tr = Trainer(cfg, X.shape[1], out, sae_metadata=meta)
    tr.fit(array_batches(X[::2], 128, seed=0))
    assert (
        abs(tr.scale - 1.0) > 1e-2
    )  # the scale folding is really exercised (SmolLM2's residual norms are ~150)
    return out / "sae", X[1::2]


def test_safesteer_sae_opens_in_saelens_with_our_numbers(trained, acts):
    folder, held = trained
    cfg = json.loads((folder / "cfg.json").read_text())
    assert "scaling_factor" not in cfg and cfg["normalize_activations"] == "none"
    ours = load_sae(folder)
    theirs = SAE.load_from_disk(folder)
    assert isinstance(theirs, GatedSAE)
    md = theirs.cfg.metadata
    assert md.model_name == "smollm2-135m" and md.sae_lens_version >= "6"
    # SAELens users hook ``hook_name``: parse it as TransformerLens would and take that tensor from HF's own
    # hidden_states (blocks.N.hook_resid_post = output of block N = hidden_states[N + 1]) -- independent of
    # our hooks
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", md.hook_name)
    assert m, md.hook_name
    at_hook = acts["hf"][int(m.group(1)) + 1]
    x = torch.from_numpy(held)
    with torch.no_grad():
        f_ours, xhat_ours = ours.encode(x), ours(x)
        # the SAELens user's path: activations at the named hook, SAELens' encode/decode
        at_hook_held = at_hook[1::2]
        f_sl = theirs.encode(at_hook_held)
        xhat_sl = theirs.decode(f_sl)
    assert (f_ours > 0).float().sum(1).mean() > 1  # codes are not trivially zero
    # float32: equal up to the rounding of SAELens' W_enc * exp(r_mag) vs our exp(r_mag) * (x~ W_enc)
    torch.testing.assert_close(f_sl, f_ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xhat_sl, xhat_ours, rtol=1e-4, atol=1e-3)
    # float64 (SAELens' dtype option, our module cast): the same function to 1e-5 and far below
    theirs64, ours64 = SAE.load_from_disk(folder, dtype="float64"), load_sae(folder).double()
    with torch.no_grad():
        x64 = at_hook_held.double()
        f64 = theirs64.encode(x64)
        torch.testing.assert_close(f64, ours64.encode(x.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs64.decode(f64), ours64(x.double()), rtol=1e-5, atol=1e-5)
    fvu = float(((x - xhat_sl) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 0.5, fvu  # it reconstructs raw-scale activations: the training scale was folded, not dropped


def _saelens_sae(kind: str, d: int, s: int, seed: int, apply_b_dec: bool = True):
    torch.manual_seed(seed)
    meta = {"model_name": "smollm2-135m", "hook_name": f"blocks.{LAYER}.hook_resid_post"}
    if kind == "gated":
        sae = GatedSAE(
            GatedSAEConfig(d_in=d, d_sae=s, apply_b_dec_to_input=apply_b_dec, metadata=meta_obj(meta))
        )
    else:
        sae = StandardSAE(
            StandardSAEConfig(d_in=d, d_sae=s, apply_b_dec_to_input=apply_b_dec, metadata=meta_obj(meta))
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # SAELens' init, then non-trivial biases and decoder norms (not unit rows)
        sae.W_dec.mul_(torch.rand(s, 1, generator=g) + 0.5)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 5)
        for name in ("b_enc", "b_gate", "b_mag"):
            p = getattr(sae, name, None)
            if p is not None:
                p.copy_(torch.randn(s, generator=g) * 2)
        if kind == "gated":
            sae.r_mag.copy_(torch.randn(s, generator=g) * 0.3)
    return sae


def meta_obj(d):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(**d)


@pytest.mark.parametrize(
    "kind,apply_b_dec", [("gated", True), ("standard", True), ("standard", False), ("gated", False)]
)
def test_saelens_saved_sae_loads_into_safesteer(kind, apply_b_dec, acts, tmp_path):
    x = acts["ours"][:200]
    theirs = _saelens_sae(kind, x.shape[1], 256, seed=1, apply_b_dec=apply_b_dec)
    theirs.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    assert ours.cfg.metadata["hook_layer"] == LAYER
    norms = theirs.W_dec.detach().norm(dim=1)
    with torch.no_grad():
        f_sl, f_ours = theirs.encode(x), ours.encode(x)
        assert 0.02 < float((f_sl > 0).float().mean()) < 0.98  # both sides of the ReLU/gate are exercised
        # safesteer keeps unit atoms: its codes are SAELens' times the decoder-row norms; reconstructions are
        # equal
        torch.testing.assert_close(f_ours, f_sl * norms, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(ours(x), theirs.decode(f_sl), rtol=1e-4, atol=1e-3)
    assert torch.allclose(ours.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)


def test_saelens_sae_drives_encode_cartography_and_steering(acts, tmp_path, smollm2):
    from safesteer.cartography.stats import StreamingStats
    from safesteer.sae.latents import encode_rows
    from safesteer.steering import ClampEdit, sae_direction

    x = acts["ours"][:240]
    theirs = _saelens_sae("standard", x.shape[1], 128, seed=2)
    theirs.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    # encode: the CSR store rows are SAELens' codes (times the row norms)
    indptr, indices, values = encode_rows(ours, x.numpy())
    import scipy.sparse as sp

    Z = sp.csr_matrix((values, indices, indptr), shape=(x.shape[0], 128)).toarray()
    with torch.no_grad():
        ref = (theirs.encode(x) * theirs.W_dec.norm(dim=1)).numpy()
    np.testing.assert_allclose(Z, ref, rtol=1e-4, atol=1e-3)
    # cartography: per-atom mean activation by label equals numpy's on SAELens' codes
    y = (np.arange(x.shape[0]) % 3 == 0).astype(np.int8)
    st = StreamingStats(128, ["lab"])
    st.update(sp.csr_matrix(Z), y[:, None])
    means = st.sums / st.n[:, None, :]  # (side, atom, label)
    np.testing.assert_allclose(means[1, :, 0], ref[y == 1].mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(means[0, :, 0], ref[y == 0].mean(0), rtol=1e-4, atol=1e-4)
    # steering: an SAE direction is the (unit) SAELens decoder row; a clamp edits the block output of layer 3
    atom = int(np.argmax(ref.mean(0)))
    w = theirs.W_dec.detach()[atom]
    np.testing.assert_allclose(
        sae_direction(ours.W_dec.detach().numpy(), [atom]), (w / w.norm()).numpy(), rtol=1e-5, atol=1e-6
    )
    enc = smollm2.tokenize(["How do I kill a Python process?"])
    base = smollm2.logits(enc.input_ids, enc.attention_mask)
    with smollm2.steer(LAYER, edit=ClampEdit(ours, [atom], mode="zero")):
        clamped = smollm2.logits(enc.input_ids, enc.attention_mask)
    assert float((clamped - base).abs().max()) > 1e-3


def test_article_variant_runs_in_saelens_but_has_no_training_architecture(tmp_path, acts):
    from safesteer.interop.saelens import saelens_training_config
    from safesteer.sae import GatedSAE as OurGated
    from safesteer.sae import SAEConfig

    sae = OurGated(SAEConfig(d_in=576, d_sae=64, variant="article", metadata={"hook_layer": LAYER}), seed=3)
    with torch.no_grad():
        sae.b_gate.copy_(torch.randn(64) * 5)
        sae.b_mag.copy_(torch.randn(64) * 5)
        sae.b_dec.copy_(acts["ours"].mean(0))
    save_sae(sae, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["metadata"]["safesteer_variant"] == "article"
    assert "no SAELens architecture" in cfg["metadata"]["training_objective"]
    theirs = SAE.load_from_disk(tmp_path / "a")
    x = acts["ours"][:100]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SafesteerError, match="no SAELens architecture") as exc:
        saelens_training_config(sae.cfg)
    assert "\n" not in exc.value.message
    assert saelens_training_config(SAEConfig(d_in=576, d_sae=64))["architecture"] == "gated"
    # an 'article' cfg.json over weights with r_mag != 0 (e.g. edited in SAELens) is not representable:
    # refused
    from safetensors.torch import load_file, save_file

    from safesteer.io import sha256_file

    t = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))
    t["r_mag"] = torch.full((64,), 0.1)
    save_file(t, str(tmp_path / "a" / "sae_weights.safetensors"))
    cfg["weights_sha256"] = sha256_file(tmp_path / "a" / "sae_weights.safetensors")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SafesteerError, match="article variant cannot represent it"):
        load_sae(tmp_path / "a")


def test_unrepresentable_saelens_saes_are_refused_in_one_line(tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig

    TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)).save_model(tmp_path / "topk")
    with pytest.raises(SafesteerError, match="'topk' SAE") as exc:
        load_sae(tmp_path / "topk")
    assert "\n" not in exc.value.message
    StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, normalize_activations="layer_norm")).save_model(
        tmp_path / "ln"
    )
    with pytest.raises(SafesteerError, match="normalize_activations='layer_norm'"):
        load_sae(tmp_path / "ln")
