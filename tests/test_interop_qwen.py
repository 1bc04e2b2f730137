"""The interop checks on the second real model (Qwen2.5-Coder-0.5B-Instruct, QKV biases, untied head):
a safesteer SAE trained on its layer-12 activations opens in SAELens with our numbers, and a control
vector exported from a policy steers it in repeng's ControlModel exactly as our hook does."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from safesteer.interop.gguf_control import policy_control_vector, write_control_vector
from safesteer.sae import TrainConfig, Trainer, array_batches, load_sae
from safesteer.steering import Direction, DirectionSet

pytestmark = pytest.mark.integration
LAYER = 12


@pytest.fixture(scope="module")
def acts(qwen, shared_data):
    """Token-level outputs of block 12 (rows x 896) for 24 XSTest prompts, and HF's hidden_states[13]."""
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="") as fh:
        texts = [r["prompt"] for r in csv.DictReader(fh)][:24]
    enc = qwen.tokenize(texts)
    with torch.no_grad():
        ours = qwen.forward_layers(enc.input_ids, enc.attention_mask, [LAYER])[LAYER]
        hf = qwen.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
        ).hidden_states
    m = enc.attention_mask.bool()
    return ours[m].float(), {i: h[m].float() for i, h in enumerate(hf)}


def test_a_safesteer_sae_on_qwen_opens_in_saelens_with_our_numbers(acts, qwen, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    ours_x, hf = acts
    torch.testing.assert_close(ours_x, hf[LAYER + 1])  # our layer L = HF hidden_states[L+1] on Qwen too
    X = ours_x.numpy()
    cfg = TrainConfig(
        expansion=2, l1=1e-3, lr=1e-3, lr_warmup_steps=5, batch_size=64, epochs=2, patience=2, init_rows=512
    )
    tr = Trainer(cfg, X.shape[1], tmp_path, sae_metadata={"model_name": qwen.name, "hook_layer": LAYER})
    tr.fit(array_batches(X[::2], 64, seed=0))
    folder = tmp_path / "sae"
    md = json.loads((folder / "cfg.json").read_text())
    assert md["model_name"] == "qwen2.5-coder-0.5b" and md["d_in"] == 896
    theirs = sae_lens.SAE.load_from_disk(folder)
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", theirs.cfg.metadata.hook_name)
    assert m and int(m.group(1)) == LAYER
    held = torch.from_numpy(X[1::2])
    with torch.no_grad():
        f_ours, f_sl = load_sae(folder).encode(held), theirs.encode(hf[int(m.group(1)) + 1][1::2])
    assert (f_ours > 0).float().sum(1).mean() > 1
    torch.testing.assert_close(f_sl, f_ours, rtol=1e-4, atol=1e-4)


def test_repeng_applies_our_control_vector_to_qwen_as_our_hook_does(qwen, tmp_path):
    if "float_" not in np.__dict__:  # repeng 0.4.0 annotates with np.float_, removed in numpy 2
        np.float_ = np.float64  # type: ignore[attr-defined]
    repeng = pytest.importorskip("repeng")
    rng = np.random.default_rng(0)
    ds = DirectionSet([Direction("harm", rng.normal(size=qwen.d_model), "probe", LAYER)])
    cv, info = policy_control_vector({"name": "p", "directions": ["harm"], "alpha": 40.0}, ds, "qwen2")
    write_control_vector(cv, tmp_path / "p.gguf", info)
    enc = qwen.tokenize(["How do I pick a lock?"])
    base = qwen.logits(enc.input_ids, enc.attention_mask)
    with qwen.steer(LAYER, ds["harm"].steer_vector, alpha=40.0):
        ours = qwen.logits(enc.input_ids, enc.attention_mask)
    assert float((ours - base).abs().max()) > 1e-2
    cm = repeng.ControlModel(qwen.model, [LAYER])
    try:
        cm.set_control(repeng.ControlVector.import_gguf(str(tmp_path / "p.gguf")), coeff=1.0)
        with torch.no_grad():
            theirs = cm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    finally:
        cm.unwrap()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
