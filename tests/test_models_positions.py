"""Pooling positions (mean / last / prompt_end / answer) against manual computations on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.extract import ExtractConfig, extract
from safesteer.models.positions import (
    chat_inputs,
    last_index,
    pool,
    prompt_end_length,
    prompt_starts,
    span_mask,
    user_header,
)
from safesteer.store.layout import layer_dir

USERS = ["how do i make a bomb ?", "the dog is good", "what is the answer to the question ?"]
ANSWERS = ["no , i will not", "yes", "the answer is no"]

# a ChatML-like template for the tiny word-level tokenizer: the template's tail after the user
# content is "</s> <s> answer" (three tokens), like SmolLM2's "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} <s> "
    "answer {% endif %}"
)


def _hidden(bb, ids, mask, layer):
    with torch.inference_mode():
        return (
            bb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            .hidden_states[layer + 1]
            .double()
        )


def test_pool_mean_last_and_span_equal_manual():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(pool(h, mask, "mean")[0], h[0, :3].mean(0))
    np.testing.assert_allclose(pool(h, mask, "mean")[1], h[1, 2:].mean(0))
    assert last_index(mask).tolist() == [2, 5, 5]
    assert torch.equal(pool(h, mask, "last"), torch.stack([h[0, 2], h[1, 5], h[2, 5]]))
    spans = [(1, 3), (4, 6), (0, 1)]
    assert span_mask(spans, 6).sum(1).tolist() == [2, 2, 1]
    got = pool(h, mask, "answer", spans)
    for i, (s, e) in enumerate(spans):
        np.testing.assert_allclose(got[i], h[i, s:e].mean(0))
    with pytest.raises(SafesteerError, match="needs token spans"):
        pool(h, mask, "prompt_end")
    with pytest.raises(SafesteerError, match="unknown position 'middle'"):
        pool(h, mask, "middle")
    with pytest.raises(SafesteerError, match="empty 'answer' span"):
        pool(h, mask, "answer", [(3, 3), (4, 6), (0, 1)])


@pytest.fixture
def templated_llama(tiny_llama):
    tok = tiny_llama.tokenizer
    old = getattr(tok, "chat_template", None)
    tok.chat_template = TEMPLATE
    yield tiny_llama
    tok.chat_template = old


def test_chat_spans_are_the_template_tail_and_the_answer_tokens(templated_llama):
    bb = templated_llama
    ci = chat_inputs(bb, USERS, ANSWERS)
    tok = bb.tokenizer
    for i, (_u, a) in enumerate(zip(USERS, ANSWERS)):
        s, e = ci.prompt_end[i]
        assert tok.convert_ids_to_tokens(ci.ids[i][s:e]) == ["</s>", "<s>", "answer"]
        s, e = ci.answer[i]
        assert tok.decode(ci.ids[i][s:e]) == a
        assert e == len(ci.ids[i])
    assert prompt_end_length(bb) == 3
    for i, u in enumerate(USERS):  # prompt = the user's tokens and the template's tail
        s, e = ci.prompt[i]
        assert tok.convert_ids_to_tokens(ci.ids[i][s:e]) == u.split() + ["</s>", "<s>", "answer"]
        assert e == ci.prompt_end[i][1]


def test_prompt_starts_finds_the_last_user_header_before_the_template_tail(templated_llama):
    bb = templated_llama
    tok = bb.tokenizer
    assert user_header(bb) == tuple(tok.convert_tokens_to_ids(["<s>"]))
    ci = chat_inputs(bb, USERS)
    ids, mask, spans = ci.batch([0, 1, 2], 0, "left")
    last = last_index(mask)
    got = prompt_starts(ids, mask, user_header(bb), last - prompt_end_length(bb) + 1)
    assert got.tolist() == spans["prompt"][:, 0].tolist()  # the tail's own "<s>" is not taken for the header
    assert prompt_starts(ids, mask, user_header(bb)).tolist() == last.tolist()  # (it would be, unbounded)
    two = torch.tensor([[5, 9, 9, 7, 9, 8, 8]])  # the header occurs twice: the last one counts
    assert prompt_starts(two, torch.ones_like(two), (9,)).tolist() == [5]
    assert prompt_starts(two, torch.ones_like(two), (4, 4)).tolist() == [0]  # absent: from the start


def test_backbone_pooled_at_every_position_equals_manual(templated_llama):
    bb, layer = templated_llama, 1
    tok = bb.tokenizer
    for position in ("prompt_end", "prompt", "answer"):
        got = bb.pooled(USERS, [layer], batch_size=2, position=position, answers=ANSWERS)[layer]
        for i, (u, a) in enumerate(zip(USERS, ANSWERS)):
            chat = bb.chat_prompt(u)
            ids = tok(chat + a, add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(chat, add_special_tokens=False)["input_ids"])
            h = _hidden(bb, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), layer)[0]
            n_user = len(u.split())
            want = {
                "prompt_end": h[n_prompt - 3 : n_prompt],
                "prompt": h[n_prompt - 3 - n_user : n_prompt],
                "answer": h[n_prompt:],
            }[position].mean(0)
            np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5, rtol=1e-5)
    enc = bb.tokenize(USERS)
    h = _hidden(bb, enc.input_ids, enc.attention_mask, layer)
    last = bb.pooled(USERS, [layer], position="last")[layer]
    for i in range(len(USERS)):
        n = int(enc.attention_mask[i].sum())
        np.testing.assert_allclose(last[i], h[i, n - 1].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(
        bb.pooled(USERS, [layer])[layer], bb.pooled(USERS, [layer], position="mean")[layer]
    )
    with pytest.raises(SafesteerError, match="needs the answers"):
        bb.pooled(USERS, [layer], position="answer")


def test_without_a_template_prompt_end_is_the_last_prompt_token(tiny_llama):
    ci = chat_inputs(tiny_llama, USERS)
    for ids, (s, e) in zip(ci.ids, ci.prompt_end):
        assert (s, e) == (len(ids) - 1, len(ids))


def test_left_padded_batches_shift_spans(templated_llama):
    ci = chat_inputs(templated_llama, USERS, ANSWERS)
    ids, mask, spans = ci.batch([0, 1, 2], 0, "left")
    for r in range(3):
        s, e = spans["answer"][r].tolist()
        assert e == ids.shape[1] and ids[r, s:e].tolist() == ci.ids[r][ci.answer[r][0] :]


def test_extract_records_position_and_reads_prompt_end(templated_llama, tmp_path):
    from safesteer.data.records import Record

    rows = [
        ("toy", Record(f"toy:{i}", u, "train", {"harmful": i % 2}, "memory")) for i, u in enumerate(USERS)
    ]
    cfg = ExtractConfig(
        model="tiny", datasets=["toy"], layers=[1], position="prompt_end", shard_size=2, precision="fp32"
    )
    extract(templated_llama, rows, tmp_path / "pe", cfg, progress=False)
    import json

    man = json.loads((layer_dir(tmp_path / "pe", 1) / "manifest.json").read_text())
    assert man["position"] == "prompt_end" and man["identity"]["position"] == "prompt_end"
    H = np.concatenate([np.load(layer_dir(tmp_path / "pe", 1) / s["files"]["H"]) for s in man["shards"]])
    want = templated_llama.pooled(USERS, [1], position="prompt_end")[1]
    np.testing.assert_allclose(H, want, atol=1e-5)
    assert (
        "position" not in ExtractConfig(model="m", datasets=["d"], layers=[0]).identity()
    )  # old stores unchanged
    with pytest.raises(SafesteerError, match="unknown extraction position"):
        extract(
            templated_llama,
            rows,
            tmp_path / "x",
            ExtractConfig(model="t", datasets=["toy"], layers=[1], position="answer"),
            progress=False,
        )


def test_pooled_at_several_positions_equals_one_call_per_position(templated_llama):
    from safesteer.models.positions import pooled_at

    bb = templated_llama
    got = pooled_at(bb, USERS, [0, 1], ("prompt_end", "prompt"), batch_size=2)
    for p in ("prompt_end", "prompt"):
        one = bb.pooled(USERS, [0, 1], batch_size=2, position=p)
        for l in (0, 1):
            np.testing.assert_array_equal(got[p][l], one[l])
    assert not np.allclose(got["prompt"][1], got["prompt_end"][1])
    with pytest.raises(SafesteerError, match="one kind"):
        pooled_at(bb, USERS, [1], ("mean", "prompt"))
