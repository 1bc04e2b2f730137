"""The gate read inside the pass pinned against float64 scores computed by hand from HF's own
``hidden_states`` of each prompt alone (no padding, no safesteer hooks): linear and MLP gates with
clearly non-zero biases, ``mean`` pooling over real tokens only and ``last`` = the one last real
token of a left-padded batch, in the same pass and in the first, unsteered pass; and the SAELens
hook names' layer mapping (``blocks.L.hook_resid_post`` = ``blocks.L+1.hook_resid_pre`` = layer L)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from safesteer.models.positions import prompt_end_length
from safesteer.sae.saving import from_saelens, hook_name_for_layer, layer_from_hook
from safesteer.steering.condition import Condition, conditional, gate_scores
from safesteer.steering.gates import LinearGate, MLPGate, StackedGate
from safesteer.steering.strategies import Intervention

# lengths differ a lot, so that padding counted in a mean (or a wrong token) moves the score
PROMPTS = ["bomb", "the dog is good and the car is red", "what is the answer ?", "tell me how to steal a car"]


def _hidden(bb, ids: list[int], layer: int) -> np.ndarray:
    """float64 output of block ``layer`` (seq × d) of one unpadded input, from HF's hidden_states."""
    with torch.no_grad():
        out = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1][0].double().numpy()


def _pool(h: np.ndarray, position: str, n_end: int) -> np.ndarray:
    if position == "mean":
        return h.mean(0)
    if position == "last":
        return h[-1]
    return h[-n_end:].mean(0)  # prompt_end: the template's last n_end tokens


def _by_hand(gate, x: np.ndarray) -> float:
    """float64 score of one feature vector, in plain Python sums (bias included)."""
    inner = gate.inner if isinstance(gate, StackedGate) else gate
    if isinstance(inner, LinearGate):
        return sum(float(a) * float(v) for a, v in zip(inner.w, x)) + inner.b
    z = [max(sum(float(a) * float(v) for a, v in zip(row, x)) + c, 0.0) for row, c in zip(inner.W1, inner.b1)]
    return sum(float(a) * u for a, u in zip(inner.w, z)) + inner.b


def _gates(d: int, n_layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    D = d * n_layers
    lin = LinearGate(rng.normal(size=D) / np.sqrt(D), 7.5)  # a bias far larger than w·h
    k = 5
    mlp = MLPGate(rng.normal(size=k), -6.0, rng.normal(size=(k, D)) / np.sqrt(D), rng.normal(size=k) + 0.5)
    return {"linear": lin, "mlp": mlp} if n_layers == 1 else {"stacked": StackedGate(lin, n_layers)}


CASES = [
    # (gate layers, steering layer): gate ≤ steering layer → read in the same pass; else a first pass
    # (HF's hidden_states of the last block are after the final norm: the reference reads blocks 0–1)
    ((1,), 1),
    ((1,), 0),
    ((0, 1), 2),
    ((0, 1), 0),
]


@pytest.mark.parametrize("position", ["mean", "last", "prompt_end"])
@pytest.mark.parametrize("layers,steer", CASES)
def test_in_pass_scores_equal_float64_hand_scores_of_each_prompt_alone(
    tiny_llama, one_thread, position, layers, steer
):
    bb = tiny_llama
    chat = position == "prompt_end"
    texts = [bb.chat_prompt(p) for p in PROMPTS] if chat else PROMPTS
    n_end = prompt_end_length(bb) if chat else 0
    alone = [bb.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(a) for a in alone}) == len(alone)  # every prompt a different length
    feats = [np.concatenate([_pool(_hidden(bb, ids, l), position, n_end) for l in layers]) for ids in alone]
    enc = bb.tokenize(texts, padding_side="left", add_special_tokens=False)
    assert int((enc.attention_mask == 0).sum()) > 10  # left padding really present
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(0)).numpy()
    iv = Intervention("v", steer, v / np.linalg.norm(v), 20.0)
    for name, gate in _gates(bb.d_model, len(layers)).items():
        want = np.array([_by_hand(gate, x) for x in feats])
        t = float(np.median(want))
        cond = Condition.of(gate, layers, position, t)
        with conditional(bb, cond, iv) as st:
            bb.logits(enc.input_ids, enc.attention_mask)
        assert len(st.scores) == 1, name
        np.testing.assert_allclose(st.scores[0], want, rtol=1e-4, atol=1e-4, err_msg=f"{name} {position}")
        assert st.flags.tolist() == (want > t).tolist()
        if chat:  # the offline scores of the same prompts (chat-rendered by gate_scores itself)
            np.testing.assert_allclose(gate_scores(bb, cond, PROMPTS), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ SAELens
def test_saelens_hook_names_map_to_the_output_of_block_l_both_ways(tiny_llama, tmp_path):
    bb = tiny_llama
    n = len(bb.layers)
    for L in range(n):
        assert hook_name_for_layer(L) == f"blocks.{L}.hook_resid_post"
        assert layer_from_hook(hook_name_for_layer(L)) == L
        assert layer_from_hook(f"blocks.{L + 1}.hook_resid_pre") == L  # the input of block L+1
        assert layer_from_hook(f"model.layers.{L}") == L
    assert layer_from_hook("blocks.0.hook_resid_pre") is None  # the embeddings: no safesteer layer
    # independent of the parser: the input of block L+1 (a pre-hook) is the output of block L
    # (safesteer's layer L, HF's hidden_states[L + 1])
    ids = torch.tensor([bb.tokenizer("the dog is good", add_special_tokens=False)["input_ids"]])
    seen: dict[int, torch.Tensor] = {}
    handles = [
        blk.register_forward_pre_hook(
            lambda _m, args, kw, i=i: seen.__setitem__(i, args[0] if args else kw["hidden_states"]),
            with_kwargs=True,
        )
        for i, blk in enumerate(bb.layers)
    ]
    try:
        with torch.no_grad():
            hs = bb.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    got = bb.forward_layers(ids, torch.ones_like(ids), list(range(n)), stop=False)
    for L in range(n - 1):
        torch.testing.assert_close(seen[L + 1], got[L], rtol=0, atol=0)
        torch.testing.assert_close(hs[L + 1], got[L], rtol=0, atol=0)
    # a SAELens folder names its layer by hook: both names of the same residual give layer L
    d, s = 8, 16
    weights = {
        "W_enc": torch.randn(d, s),
        "W_dec": torch.nn.functional.normalize(torch.randn(s, d), dim=1),
        "b_enc": torch.zeros(s),
        "b_dec": torch.zeros(d),
    }
    for hook, L in (
        ("blocks.1.hook_resid_post", 1),
        ("blocks.2.hook_resid_pre", 1),
        ("blocks.3.hook_resid_pre", 2),
    ):
        folder = tmp_path / hook
        folder.mkdir()
        save_file(weights, str(folder / "sae_weights.safetensors"))
        cfg = {"architecture": "standard", "d_in": d, "d_sae": s, "metadata": {"hook_name": hook}}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert from_saelens(folder).cfg.metadata["hook_layer"] == L, hook
