"""Backbone properties on tiny random masked and causal LMs (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import foreign_hooks

from safesteer.errors import SafesteerError
from safesteer.models.backbone import mean_pool
from safesteer.models.hooks import answer_starts

TEXTS = ["the man is good", "you are a stupid idiot and i hate you", "how do i make a bomb ?", "a"]


def test_pooled_equals_manual_masked_mean(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    assert enc.attention_mask.sum(1).tolist() != [enc.attention_mask.shape[1]] * len(TEXTS)  # padding present
    with torch.inference_mode():
        out = bb.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    layer = 1
    h = out.hidden_states[layer + 1].double()
    manual = np.stack([h[i, enc.attention_mask[i].bool()].mean(0).numpy() for i in range(len(TEXTS))])
    pooled = bb.pooled(TEXTS, [layer], batch_size=3)[layer]
    np.testing.assert_allclose(pooled, manual, atol=1e-6, rtol=1e-5)


def test_stop_at_layer_equals_full_forward(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    with torch.inference_mode():
        full = bb.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
        ).hidden_states
    for layer in range(bb.n_layers - 1):
        got = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
        assert torch.equal(got, full[layer + 1])


def test_stop_really_stops(tiny_backbone):
    bb = tiny_backbone
    calls = []
    handle = bb.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        enc = bb.tokenize(TEXTS)
        bb.forward_layers(enc.input_ids, enc.attention_mask, [0])
        assert calls == []
        bb.forward_layers(enc.input_ids, enc.attention_mask, [0], stop=False)
        assert calls == [1]
    finally:
        handle.remove()


def test_several_layers_one_pass(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    both = bb.forward_layers(enc.input_ids, enc.attention_mask, [0, 1])
    assert torch.equal(both[0], bb.forward_layers(enc.input_ids, enc.attention_mask, [0])[0])
    assert torch.equal(both[1], bb.forward_layers(enc.input_ids, enc.attention_mask, [1])[1])


def test_steer_adds_exactly_alpha_v_and_restores(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    layer = 1
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(3))
    before = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer].clone()
    logits_before = bb.logits(enc.input_ids, enc.attention_mask).clone()
    with bb.steer(layer, v, alpha=2.5):
        steered = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
        logits_steered = bb.logits(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(steered - before, (2.5 * v).expand_as(before), atol=1e-5, rtol=0)
    assert not torch.allclose(logits_steered, logits_before)
    assert torch.equal(bb.logits(enc.input_ids, enc.attention_mask), logits_before)


def test_steer_restores_when_body_raises(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    ref = bb.logits(enc.input_ids, enc.attention_mask).clone()
    hooks_before = [dict(l._forward_hooks) for l in bb.layers]
    with pytest.raises(RuntimeError):
        with bb.steer(0, torch.ones(bb.d_model), alpha=10.0):
            raise RuntimeError("boom")
    assert [dict(l._forward_hooks) for l in bb.layers] == hooks_before
    assert torch.equal(bb.logits(enc.input_ids, enc.attention_mask), ref)


def test_steer_selected_positions_and_edit(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    layer = 0
    base = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer].clone()
    v = torch.ones(bb.d_model)
    with bb.steer(layer, v, alpha=1.0, positions=[0]):
        got = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
    torch.testing.assert_close(got[:, 0] - base[:, 0], torch.ones_like(base[:, 0]))
    assert torch.equal(got[:, 1:], base[:, 1:])
    with bb.steer(layer, edit=lambda h: h * 0):
        zero = bb.forward_layers(enc.input_ids, enc.attention_mask, [layer])[layer]
    assert torch.count_nonzero(zero) == 0


def test_bad_inputs(tiny_backbone):
    bb = tiny_backbone
    with pytest.raises(SafesteerError, match="out of range"):
        bb.check_layer(bb.n_layers)
    with pytest.raises(SafesteerError, match="shape"):
        with bb.steer(0, torch.ones(bb.d_model + 1)):
            pass


def test_mean_pool_ignores_padding():
    h = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(h, mask), h[0, :2].mean(0, keepdim=True))


def test_causal_token_logprobs_match_manual(tiny_llama):
    bb = tiny_llama
    lp = bb.token_logprobs(TEXTS[:2])
    ids = [1] + bb.tokenizer(TEXTS[1])["input_ids"]  # BOS conditioned (tokenizer adds <s> already)
    ids = bb.tokenizer(TEXTS[1])["input_ids"]
    with torch.inference_mode():
        logits = bb.model(torch.tensor([ids])).logits[0].double()
    manual = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp[1].double(), manual, atol=1e-5, rtol=1e-5)


def test_masked_token_logprobs(tiny_roberta):
    bb = tiny_roberta
    enc = bb.tokenize(["the <mask> is good", "you are <mask>"])
    pos = (enc.input_ids == bb.tokenizer.mask_token_id).float().argmax(1)
    lp = bb.masked_token_logprobs(enc.input_ids, enc.attention_mask, pos)
    assert lp.shape == (2, len(bb.tokenizer))
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2), atol=1e-5, rtol=0)
    # against a manual forward of each unpadded row, read at its mask position
    assert pos.tolist() == [2, 3]
    for i in range(2):
        ids = enc.input_ids[i, enc.attention_mask[i].bool()].unsqueeze(0)
        with torch.inference_mode():
            logits = bb.model(input_ids=ids).logits[0].double()
        manual = torch.log_softmax(logits[int(pos[i])], -1)
        torch.testing.assert_close(lp[i].double(), manual, atol=1e-5, rtol=0)
        assert not torch.allclose(lp[i].double(), torch.log_softmax(logits[int(pos[i]) - 1], -1), atol=1e-3)


def _count_calls(module: torch.nn.Module):
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def test_prefix_cache_equals_full_passes_and_skips_shallow_blocks(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    layer = 1
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(5))
    base = bb.logits(enc.input_ids, enc.attention_mask).clone()
    with bb.steer(layer, v, alpha=3.0):
        ref = bb.logits(enc.input_ids, enc.attention_mask).clone()
    with bb.steer(layer, edit=lambda h: h * 0.5):
        ref_edit = bb.logits(enc.input_ids, enc.attention_mask).clone()
    first = next(bb.layers[0].children())
    calls, handle = _count_calls(first)
    hooks = foreign_hooks(bb.layers)
    with bb.prefix_cache(layer) as pc:
        assert torch.equal(bb.logits(enc.input_ids, enc.attention_mask), base)  # records
        n_full = calls[0]
        with bb.steer(layer, v, alpha=3.0):
            got = bb.logits(enc.input_ids, enc.attention_mask)
        with bb.steer(layer, edit=lambda h: h * 0.5):
            got_edit = bb.logits(enc.input_ids, enc.attention_mask)
        again = bb.logits(enc.input_ids, enc.attention_mask)
        assert calls[0] == n_full  # blocks 0..layer were skipped on the three cached passes
        assert pc.hits == 3 and pc.misses == 1
        # deeper layers through forward_layers also start from the cache
        h2 = bb.forward_layers(enc.input_ids, enc.attention_mask, [2])[2]
    handle.remove()
    assert torch.equal(got, ref)  # bit-exact, as the docs claim
    assert torch.equal(got_edit, ref_edit)
    assert torch.equal(again, base)
    assert torch.equal(h2, bb.forward_layers(enc.input_ids, enc.attention_mask, [2])[2])
    assert foreign_hooks(bb.layers) == hooks
    assert all("forward" not in vars(block) for block in bb.layers)  # stubs removed
    assert torch.equal(bb.logits(enc.input_ids, enc.attention_mask), base)


def test_prefix_cache_not_used_when_steering_a_shallower_block_or_new_inputs(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    other = bb.tokenize(TEXTS[:2])
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(6))
    with bb.steer(0, v, alpha=2.0):
        ref = bb.logits(enc.input_ids, enc.attention_mask).clone()
    ref_other = bb.logits(other.input_ids, other.attention_mask).clone()
    with bb.prefix_cache(1) as pc:
        bb.logits(enc.input_ids, enc.attention_mask)
        with bb.steer(0, v, alpha=2.0):  # block 0 feeds block 1: the cached output would be wrong
            got = bb.logits(enc.input_ids, enc.attention_mask)
        got_other = bb.logits(other.input_ids, other.attention_mask)
        assert pc.hits == 0
        with pytest.raises(SafesteerError, match="already active"):
            with bb.prefix_cache(1):
                pass
    assert torch.equal(got, ref)
    assert torch.equal(got_other, ref_other)


def test_prefix_cache_respects_memory_cap(tiny_backbone):
    bb = tiny_backbone
    enc = bb.tokenize(TEXTS)
    with bb.prefix_cache(1, max_bytes=16) as pc:
        bb.logits(enc.input_ids, enc.attention_mask)
        bb.logits(enc.input_ids, enc.attention_mask)
        assert pc.nbytes == 0 and pc.hits == 0


def test_mean_pool_per_row_counts():
    """Each row is averaged over its own valid tokens (one token: that token itself)."""
    h = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    ref = torch.stack([h[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(mean_pool(h, mask), ref, atol=1e-12, rtol=0)


def test_position_mask_bounds_bool_and_slice():
    from safesteer.models.hooks import position_mask as _position_mask

    h = torch.zeros(2, 5, 3)
    # -seq is the first token; seq (one past the end) and beyond are ignored
    assert _position_mask([-5, 5, 7, 2], h).tolist() == [[True, False, True, False, False]] * 2
    assert _position_mask(slice(3, None), h)[1].tolist() == [False, False, False, True, True]
    want = torch.tensor([[True, False, False, False, True], [False, True, False, False, False]])
    assert torch.equal(_position_mask(want, h), want)  # a (batch, seq) bool mask is used as given
    with pytest.raises(SafesteerError, match="position mask shape"):
        _position_mask(want[:, :4], h)


def test_bos_prefix_only_when_the_tokenizer_adds_none(tiny_llama):
    """Causal scoring conditions the first token on BOS; a tokenizer that adds no BOS gets one prepended."""
    from tokenizers import processors

    from safesteer.models import Backbone
    from safesteer.testing import tiny_tokenizer

    assert tiny_llama._bos_prefix() == []  # the tiny tokenizer adds <s> itself
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    bare = Backbone(tiny_llama.model, tok, name="tiny-llama-nobos")
    assert bare._bos_prefix() == [tok.bos_token_id]
    a, b = tiny_llama.token_logprobs(["the dog is good"]), bare.token_logprobs(["the dog is good"])
    torch.testing.assert_close(
        a[0][:4], b[0]
    )  # the words score the same either way (after <s>); bare adds no </s>


def test_chat_prompt_with_and_without_a_template(tiny_llama):
    from safesteer.models import Backbone
    from safesteer.testing import tiny_tokenizer

    assert tiny_llama.chat_prompt("hi") == "hi"
    assert tiny_llama.chat_prompt("hi", system="be safe") == "be safe\n\nhi"
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    bb = Backbone(tiny_llama.model, tok, name="tiny-llama-chat")
    assert bb.chat_prompt("hi") == "[user] hi\n[assistant]"
    assert bb.chat_prompt("hi", system="be safe") == "[system] be safe\n[user] hi\n[assistant]"


def test_pooled_passes_every_option_through(tiny_llama):
    from safesteer.models.positions import pooled_vectors

    texts, answers = (
        ["how do i make a bomb", "the dog is good"],
        [" no", " yes"],
    )  # no template: glued to the prompt
    got = tiny_llama.pooled(texts, [1], position="answer", answers=answers, system="be safe", max_length=40)
    ref = pooled_vectors(tiny_llama, texts, [1], 32, 40, "answer", answers, "be safe")
    np.testing.assert_array_equal(got[1], ref[1])
    assert not np.array_equal(
        got[1], pooled_vectors(tiny_llama, texts, [1], 32, 40, "answer", answers, None)[1]
    )
    long = [" ".join(["the dog is good"] * 10)]
    assert not np.array_equal(tiny_llama.pooled(long, [1], max_length=6)[1], tiny_llama.pooled(long, [1])[1])


def _greedy(bb, ids, mask, n=6):
    out = bb.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=bb.tokenizer.pad_token_id,
    )
    return out[:, ids.shape[1] :]


def test_prompt_only_steering_steers_the_prompt_and_generates_the_answer_unsteered(tiny_llama):
    bb = tiny_llama
    enc = bb.tokenize(TEXTS, padding_side="left", add_special_tokens=False)
    ids, mask = enc.input_ids, enc.attention_mask
    v = torch.randn(bb.d_model, generator=torch.Generator().manual_seed(5))
    base = _greedy(bb, ids, mask)
    with bb.steer(1, v, alpha=6.0):
        full = _greedy(bb, ids, mask)
    with bb.steer(1, v, alpha=6.0, where="prompt"):
        got = _greedy(bb, ids, mask)
    assert not torch.equal(got, base) and not torch.equal(got, full)
    assert torch.equal(got[:, 0], full[:, 0])  # the first answer token comes from the (steered) prompt
    # reference: one teacher-forced pass over prompt + answer with the steering masked to the prompt's
    # positions (the independently tested positions= mechanism): its greedy choices are the answer
    seq = torch.cat([ids, got], 1)
    att = torch.cat([mask, torch.ones_like(got)], 1)
    prompt_pos = torch.arange(seq.shape[1]).unsqueeze(0).expand(seq.shape[0], -1) < ids.shape[1]
    with bb.steer(1, v, alpha=6.0, positions=prompt_pos):
        ref = bb.logits(seq, att)
    assert torch.equal(ref[:, ids.shape[1] - 1 : -1].argmax(-1), got)
    # teacher forcing under where="prompt" needs the answer starts; then it equals the masked pass
    with bb.steer(1, v, alpha=6.0, where="prompt"), answer_starts(bb, [ids.shape[1]] * seq.shape[0]):
        tf = bb.logits(seq, att)
    torch.testing.assert_close(tf, ref, atol=0, rtol=0)
    with bb.steer(1, v, alpha=6.0):
        every = bb.logits(seq, att)
    with bb.steer(1, v, alpha=6.0, where="prompt"):  # without them every position of a new input is prompt
        torch.testing.assert_close(bb.logits(seq, att), every, atol=0, rtol=0)
    assert bb.hooks.answer_starts is None and foreign_hooks(bb.layers) == 0
    assert not bb.model.model._forward_pre_hooks
    with pytest.raises(SafesteerError, match="valid choices: all, prompt"):
        with bb.steer(1, v, where="answer"):
            pass
    with pytest.raises(SafesteerError, match="not both"):
        with bb.steer(1, v, where="prompt", positions=[0]):
            pass
    with pytest.raises(SafesteerError, match="answer starts for a pass"):
        with bb.steer(1, v, where="prompt"), answer_starts(bb, [3]):
            bb.logits(seq, att)
