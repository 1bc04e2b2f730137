"""Conditional steering: gate read unsteered in the same pass, held across generated tokens,
unflagged rows bit-identical to unsteered, threshold at a target false-positive rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import foreign_hooks

from safesteer.errors import SafesteerError
from safesteer.models.hooks import answer_starts
from safesteer.steering.condition import Condition, conditional, gate_flags, gate_scores, threshold_for_fpr
from safesteer.steering.strategies import Intervention

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} <s> "
    "answer {% endif %}"
)
PROMPTS = ["how do i make a bomb ?", "the dog is good", "what is the answer ?", "tell me how to steal a car"]


def _steer(bb, layer=1, alpha=8.0, seed=0):
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(seed)).numpy()
    return Intervention("v", layer, v / np.linalg.norm(v), alpha)


def _gate(bb, layer, flag_rows, position="prompt_end"):
    """A condition whose threshold separates the rows in ``flag_rows`` from the others (planted)."""
    H = bb.pooled(PROMPTS, [layer], position=position)[layer].astype(np.float64)
    w = H[list(flag_rows)].mean(0) - np.delete(H, list(flag_rows), 0).mean(0)
    s = H @ w
    inside, outside = s[list(flag_rows)], np.delete(s, list(flag_rows))
    assert inside.min() > outside.max()
    return Condition(w, 0.0, layer, position, float((inside.min() + outside.max()) / 2))


def _ids(bb, prompts, n=6):
    enc = bb.tokenize(prompts, padding_side="left", add_special_tokens=False)
    out = bb.model.generate(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=bb.tokenizer.pad_token_id,
    )
    return out[:, enc.input_ids.shape[1] :]


def test_threshold_hits_target_fpr_on_planted_scores():
    rng = np.random.default_rng(0)
    s = rng.normal(size=200)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for_fpr(s, fpr)
        assert np.mean(s > t) <= fpr + 1e-12
        assert np.mean(s >= t) > fpr  # the lowest such threshold: one step lower exceeds the target
    assert threshold_for_fpr([1.0, 1.0, 1.0, 0.0], 0.5) == 1.0  # ties never push the FPR above target
    with pytest.raises(SafesteerError, match="at least one harmless"):
        threshold_for_fpr([], 0.05)


def test_unflagged_rows_bit_identical_and_flagged_rows_steered_for_every_token(tiny_llama, one_thread):
    bb = tiny_llama
    iv = _steer(bb, layer=1)
    cond = _gate(bb, 1, [0, 3])
    base = _ids(bb, PROMPTS)
    with iv.apply(bb):
        full = _ids(bb, PROMPTS)
    with conditional(bb, cond, iv) as st:
        got = _ids(bb, PROMPTS)
    assert st.flags.tolist() == [True, False, False, True]
    assert len(st.flagged) == 1  # decided once for the batch, then held over the KV-cached steps
    assert torch.equal(got[[1, 2]], base[[1, 2]])  # not flagged: the unsteered answer, bit for bit
    assert torch.equal(got[[0, 3]], full[[0, 3]])  # flagged: steered at every generated token too
    assert not torch.equal(full[[0, 3]], base[[0, 3]])  # (the steering does change those answers)
    enc = bb.tokenize(PROMPTS, padding_side="left", add_special_tokens=False)
    l0 = bb.logits(enc.input_ids, enc.attention_mask)
    with conditional(bb, cond, iv):
        l1 = bb.logits(enc.input_ids, enc.attention_mask)
    assert torch.equal(l1[[1, 2]], l0[[1, 2]]) and not torch.equal(l1[0], l0[0])
    assert foreign_hooks(bb.layers) == 0 and bb.steer_layers == ()


@pytest.mark.parametrize("templated", [False, True])
@pytest.mark.parametrize("position", ["prompt_end", "prompt"])
def test_gate_reads_the_unsteered_residual_in_the_same_pass(tiny_llama, one_thread, position, templated):
    bb = tiny_llama
    tok = bb.tokenizer
    old = getattr(tok, "chat_template", None)
    if (
        templated
    ):  # the template's tail repeats the user header's "<s>": prompt must still start at the user text
        tok.chat_template = TEMPLATE
        tok.__dict__.pop("_safesteer_prompt_end", None)
    try:
        _same_pass(bb, position)
    finally:
        tok.chat_template = old
        tok.__dict__.pop("_safesteer_prompt_end", None)


def _same_pass(bb, position):
    cond = _gate(bb, 1, [0, 3], position)
    want = gate_scores(bb, cond, PROMPTS)
    # steering at the gate's own layer along the gate's weights would flip the decision if read after it
    iv = Intervention("anti", 1, -cond.w / np.linalg.norm(cond.w), 50.0)
    chats = [bb.chat_prompt(p) for p in PROMPTS]
    enc = bb.tokenize(chats, padding_side="left", add_special_tokens=False)
    with conditional(bb, cond, iv) as st:
        bb.logits(enc.input_ids, enc.attention_mask)
    np.testing.assert_allclose(st.scores[0], want, rtol=1e-4, atol=1e-4)
    assert st.flags.tolist() == gate_flags(bb, cond, PROMPTS).tolist() == [True, False, False, True]


def test_gate_after_the_steering_layer_decides_in_an_unsteered_first_pass(tiny_llama, one_thread):
    bb = tiny_llama
    cond = _gate(bb, 2, [1])
    iv = _steer(bb, layer=0, alpha=20.0)
    base = _ids(bb, PROMPTS)
    with conditional(bb, cond, iv) as st:
        got = _ids(bb, PROMPTS)
    assert st.flags.tolist() == [False, True, False, False]
    assert torch.equal(got[[0, 2, 3]], base[[0, 2, 3]])


def test_fixed_flags_and_errors(tiny_llama, one_thread):
    bb = tiny_llama
    iv = _steer(bb)
    cond = _gate(bb, 1, [0])
    base = _ids(bb, PROMPTS)
    with conditional(bb, cond, iv, flags=[False] * 4) as st:
        assert torch.equal(_ids(bb, PROMPTS), base)
    assert st.flags.tolist() == [False] * 4
    with pytest.raises(SafesteerError, match="3 fixed gate flags for a batch of 4"):
        with conditional(bb, cond, iv, flags=[True] * 3):
            _ids(bb, PROMPTS)
    with pytest.raises(SafesteerError, match="needs an intervention"):
        with conditional(bb, cond, Intervention.none()):
            pass
    with pytest.raises(SafesteerError, match="gate position 'answer'"):
        Condition(cond.w, 0.0, 1, "answer")
    assert foreign_hooks(bb.layers) == 0


def test_condition_save_load_roundtrip(tmp_path):
    c = Condition(np.arange(4.0), -1.5, 3, "prompt_end", 0.25, "harm_gate", {"auroc": 0.9})
    c.save(tmp_path / "g")
    d = Condition.load(tmp_path / "g")
    assert np.array_equal(d.w, c.w) and (d.b, d.layer, d.position, d.threshold, d.name) == (
        -1.5,
        3,
        "prompt_end",
        0.25,
        "harm_gate",
    )
    assert d.meta == {"auroc": 0.9}
    H = np.random.default_rng(0).normal(size=(5, 4))
    np.testing.assert_allclose(d.score(H), H @ np.arange(4.0) - 1.5)


def _mlp_gate(bb, layer, position, k=6, seed=0):
    """A random one-hidden-layer gate whose threshold flags the two highest-scoring prompts."""
    rng = np.random.default_rng(seed)
    H = bb.pooled(PROMPTS, [layer], position=position)[layer].astype(np.float64)
    W1 = rng.normal(size=(k, bb.d_model))
    b1 = -(H @ W1.T).mean(0)  # about half the units active
    c = Condition(rng.normal(size=k), 0.3, layer, position, 0.0, "mlp", W1=W1, b1=b1)
    s = np.sort(c.score(H))
    return c.with_threshold(float((s[-2] + s[-3]) / 2))


@pytest.mark.parametrize("position", ["prompt_end", "prompt"])
def test_mlp_gate_in_pass_equals_pooled_scores_and_holds_unflagged_rows(tiny_llama, one_thread, position):
    bb = tiny_llama
    cond = _mlp_gate(bb, 1, position)
    want = gate_scores(bb, cond, PROMPTS)
    H = bb.pooled(PROMPTS, [1], position=position)[1].astype(np.float64)
    np.testing.assert_allclose(want, np.maximum(H @ cond.W1.T + cond.b1, 0) @ cond.w + cond.b, rtol=1e-12)
    iv = _steer(bb, layer=1, alpha=30.0)
    chats = [bb.chat_prompt(p) for p in PROMPTS]
    enc = bb.tokenize(chats, padding_side="left", add_special_tokens=False)
    l0 = bb.logits(enc.input_ids, enc.attention_mask)
    with conditional(bb, cond, iv) as st:
        l1 = bb.logits(enc.input_ids, enc.attention_mask)
    np.testing.assert_allclose(st.scores[0], want, rtol=1e-4, atol=1e-4)
    flags = st.flags
    assert flags.sum() == 2 and flags.tolist() == (want > cond.threshold).tolist()
    assert torch.equal(l1[~torch.as_tensor(flags)], l0[~torch.as_tensor(flags)])
    assert not torch.equal(l1[torch.as_tensor(flags)], l0[torch.as_tensor(flags)])


def test_mlp_condition_roundtrip_and_shape_errors(tmp_path):
    rng = np.random.default_rng(1)
    W1, b1, w = rng.normal(size=(3, 5)), rng.normal(size=3), rng.normal(size=3)
    c = Condition(w, 0.5, 2, "prompt", 1.0, "g", {}, W1, b1)
    assert (c.kind, c.d) == ("mlp", 5)
    d = Condition.load(c.save(tmp_path / "m"))
    assert d.kind == "mlp" and np.array_equal(d.W1, W1) and np.array_equal(d.b1, b1)
    H = rng.normal(size=(7, 5))
    np.testing.assert_allclose(d.score(H), np.maximum(H @ W1.T + b1, 0) @ w + 0.5, rtol=1e-12)
    np.testing.assert_allclose(d.torch_scorer()(torch.as_tensor(H)).numpy(), d.score(H), rtol=1e-12)
    assert np.array_equal(d.with_threshold(2.0).W1, W1)
    with pytest.raises(SafesteerError, match="both hidden weights"):
        Condition(w, 0.0, 1, W1=W1)
    with pytest.raises(SafesteerError, match="shapes disagree"):
        Condition(rng.normal(size=4), 0.0, 1, W1=W1, b1=b1)
    with pytest.raises(SafesteerError, match="rows × 5 activations"):
        c.score(rng.normal(size=(2, 3)))


def test_prompt_only_conditional_steers_flagged_prompts_and_leaves_answers_unsteered(tiny_llama, one_thread):
    bb = tiny_llama
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(0)).numpy()
    iv = Intervention("v", 1, v / np.linalg.norm(v), 8.0, where="prompt")
    cond = _gate(bb, 1, [0, 3])
    base = _ids(bb, PROMPTS)
    with iv.apply(bb):
        prompt_only = _ids(bb, PROMPTS)
    with Intervention("v", 1, v / np.linalg.norm(v), 8.0).apply(bb):
        every = _ids(bb, PROMPTS)
    with conditional(bb, cond, iv) as st:
        got = _ids(bb, PROMPTS)
    assert st.flags.tolist() == [True, False, False, True]
    assert torch.equal(got[[1, 2]], base[[1, 2]])  # unflagged: bit-identical
    assert torch.equal(got[[0, 3]], prompt_only[[0, 3]])  # flagged: the same as prompt-only steering alone
    assert not torch.equal(prompt_only[[0, 3]], every[[0, 3]])  # (which differs from steering every token)
    # teacher-forced answer scoring with fixed flags: flagged rows equal prompt-only steering with the answer
    # starts
    enc = bb.tokenize(PROMPTS, padding_side="left", add_special_tokens=False)
    seq = torch.cat([enc.input_ids, base], 1)
    att = torch.cat([enc.attention_mask, torch.ones_like(base)], 1)
    starts = [enc.input_ids.shape[1]] * len(PROMPTS)
    l0 = bb.logits(seq, att)
    with iv.apply(bb), answer_starts(bb, starts):
        l_po = bb.logits(seq, att)
    with conditional(bb, cond, iv, flags=[True, False, False, True]), answer_starts(bb, starts):
        l_c = bb.logits(seq, att)
    assert torch.equal(l_c[[1, 2]], l0[[1, 2]]) and torch.equal(l_c[[0, 3]], l_po[[0, 3]])
    assert not torch.equal(l_po[0, starts[0] :], l0[0, starts[0] :])
    assert foreign_hooks(bb.layers) == 0 and not bb.model.model._forward_pre_hooks


def test_with_threshold_changes_what_it_is_given_and_keeps_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    c = Condition(rng.normal(size=4), 0.5, 2, "prompt", 1.0, "g", {"source": "x"})
    same = c.with_threshold(2.0)
    assert (same.threshold, same.layers, same.position, same.name, same.meta) == (
        2.0,
        (2,),
        "prompt",
        "g",
        {"source": "x"},
    )
    moved = c.with_threshold(3.0, layer=1, position="last", name="h", meta={"k": 1})
    assert (moved.layers, moved.position, moved.name, moved.meta) == ((1,), "last", "h", {"k": 1})
    with pytest.raises(SafesteerError, match="no field"):
        c.with_threshold(1.0, colour="red")
    # saving makes the folder (and its parents); a file without "kind" (older format) is read by its tensors
    W1, b1 = rng.normal(size=(3, 4)), rng.normal(size=3)
    mlp = Condition(rng.normal(size=3), 0.1, 2, "prompt", 0.4, "m", W1=W1, b1=b1)
    folder = mlp.save(tmp_path / "a" / "b")
    meta = json.loads((folder / "condition.json").read_text())
    meta.pop("kind")
    (folder / "condition.json").write_text(json.dumps(meta))
    back = Condition.load(folder)
    X = rng.normal(size=(5, 4))
    assert back.kind == "mlp" and np.allclose(back.score(X), mlp.score(X), rtol=0, atol=1e-12)


def test_gate_flags_read_the_prompts_with_the_system_message(tiny_llama, one_thread):
    """A system message changes what the gate reads; the flags are the scores with it, at the threshold."""
    prompts = ["how do i make a bomb ?", "the dog is good", "what is the capital of france ?", "a b c"]
    c = _gate(tiny_llama, 1, [True, False, False, False], position="prompt")
    system = "You are a terse assistant. Answer in one word."
    with_sys = gate_scores(tiny_llama, c, prompts, system=system)
    assert not np.allclose(with_sys, gate_scores(tiny_llama, c, prompts))
    for t in np.sort(with_sys):
        c.threshold = float(t)
        assert gate_flags(tiny_llama, c, prompts, system=system).tolist() == (with_sys > t).tolist()


def test_condition_scores_in_float64_and_names_the_valid_positions():
    rng = np.random.default_rng(1)
    w = rng.normal(size=6)
    c = Condition(w, 0.3, 1, "prompt")
    H = rng.normal(size=(4, 6)).astype(np.float32)
    assert np.array_equal(c.score(H), H.astype(np.float64) @ w + 0.3)
    with pytest.raises(SafesteerError, match="valid choices: prompt_end, prompt, last, mean$"):
        Condition(w, 0.3, 1, "middle")
