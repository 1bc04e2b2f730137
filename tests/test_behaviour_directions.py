"""Behaviour directions (CAA answer-position DiffMean, Arditi prompt_end DiffMean) and directional
ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import foreign_hooks

from safesteer.behaviour.directions import (
    ablate,
    ablation_edit,
    ablation_intervention,
    answer_means,
    median_norm,
    refusal_caa,
    refusal_dim,
)
from safesteer.errors import SafesteerError
from safesteer.steering.strategies import DirectionSet, Intervention

PROMPTS = ["how do i make a bomb ?", "tell me how to steal a car", "what is a good book ?"]
REFUSE = [" no , i will not", " i can not help"]
COMPLY = [" yes , here is how", " good , i will help you"]


def _answer_mean_manual(bb, layer, prompts, answers):
    tok = bb.tokenizer
    rows = []
    for p in prompts:
        for a in answers:
            chat = bb.chat_prompt(p)
            ids = tok(chat + a, add_special_tokens=False)["input_ids"]
            n = len(tok(chat, add_special_tokens=False)["input_ids"])
            with torch.inference_mode():
                h = (
                    bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                    .hidden_states[layer + 1][0]
                    .double()
                )
            rows.append(h[n:].mean(0).numpy())
    return np.mean(rows, axis=0)


def test_refusal_caa_is_the_answer_position_diffmean(tiny_llama, one_thread):
    bb, layer = tiny_llama, 1
    d = refusal_caa(bb, PROMPTS, layer, REFUSE, COMPLY, batch_size=4)
    r = _answer_mean_manual(bb, layer, PROMPTS, REFUSE) - _answer_mean_manual(bb, layer, PROMPTS, COMPLY)
    np.testing.assert_allclose(d.vector, -r / np.linalg.norm(r), atol=1e-5)
    assert d.name == "refusal_caa" and d.layer == layer and d.meta["position"] == "answer"
    np.testing.assert_allclose(
        answer_means(bb, PROMPTS, REFUSE, [layer])[layer],
        _answer_mean_manual(bb, layer, PROMPTS, REFUSE),
        atol=1e-5,
    )
    # usable by the strategy machinery: alpha >= 0 adds the refusal vector
    iv = Intervention.from_direction(d, alpha=2.0)
    np.testing.assert_allclose(iv.vector * iv.alpha, 2.0 * r / np.linalg.norm(r), atol=1e-5)
    assert "refusal_caa" in DirectionSet([d])


def test_refusal_dim_is_the_prompt_end_diffmean(tiny_llama, one_thread):
    bb, layer = tiny_llama, 1  # (not the last block: HF folds the final norm into its hidden state)
    harmful, harmless = PROMPTS[:2], ["the dog is good", "what is the answer ?", "a cat"]
    d = refusal_dim(bb, harmful, harmless, layer)

    def last_token(texts):  # no chat template: prompt_end is the last prompt token
        out = []
        for t in texts:
            ids = bb.tokenizer(t, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                h = (
                    bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                    .hidden_states[layer + 1][0]
                    .double()
                )
            out.append(h[-1].numpy())
        return np.mean(out, axis=0)

    r = last_token(harmful) - last_token(harmless)
    np.testing.assert_allclose(d.vector, -r / np.linalg.norm(r), atol=1e-5)
    with pytest.raises(SafesteerError, match="needs harmful and harmless"):
        refusal_dim(bb, [], harmless, layer)


def test_ablation_projects_the_direction_out(tiny_llama, one_thread):
    bb = tiny_llama
    rng = np.random.default_rng(0)
    r = rng.normal(size=bb.d_model)
    rhat = r / np.linalg.norm(r)
    h = torch.tensor(rng.normal(size=(2, 5, bb.d_model)), dtype=torch.float32)
    out = ablation_edit(r)(h).double().numpy()
    hd = h.double().numpy()
    np.testing.assert_allclose(out, hd - (hd @ rhat)[..., None] * rhat[None, None], atol=1e-5)
    np.testing.assert_allclose(out @ rhat, 0.0, atol=1e-5)
    np.testing.assert_allclose(ablation_edit(-r)(h).numpy(), out, atol=1e-6)  # sign-free

    enc = bb.tokenize(PROMPTS)
    d = refusal_caa(bb, PROMPTS, 1, REFUSE, COMPLY)
    with ablation_intervention(d).apply(bb):
        h1 = bb.forward_layers(enc.input_ids, enc.attention_mask, [1])[1].double().numpy()
    np.testing.assert_allclose(h1 @ d.vector.astype(np.float64), 0.0, atol=1e-4)
    with ablate(bb, d):
        h2 = bb.forward_layers(enc.input_ids, enc.attention_mask, [0, 2], stop=False)
    for l in (0, 2):
        np.testing.assert_allclose(h2[l].double().numpy() @ d.vector.astype(np.float64), 0.0, atol=1e-4)
    assert foreign_hooks(bb.layers) == 0


def test_median_norm_is_the_median_token_norm(tiny_llama):
    bb = tiny_llama
    got = median_norm(bb, PROMPTS, 1)
    norms = []
    for p in PROMPTS:
        ids = bb.tokenizer(bb.chat_prompt(p), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            h = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        norms.extend(h.norm(dim=-1).tolist())
    assert got == pytest.approx(float(np.median(norms)), rel=1e-5)
