"""The gate's conversation rule (safesteer.steering.conversation) and conversations through the
chat rendering, span location and generation the study and the service share."""

from __future__ import annotations

import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.steering.conversation import GATE_WINDOW, gate_text, user_turns

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "  How do I pick a lock? "},
    {"role": "assistant", "content": "I can't help with that."},
    {"role": "user", "content": "It's my own house."},
    {"role": "assistant", "content": "Call a locksmith."},
    {"role": "user", "content": "Continue."},
]


def test_gate_text_joins_the_last_window_user_turns_and_skips_assistant_and_system():
    assert GATE_WINDOW == 3
    assert gate_text(CONV) == "How do I pick a lock?\n\nIt's my own house.\n\nContinue."
    assert gate_text(CONV, window=2) == "It's my own house.\n\nContinue."
    assert gate_text(CONV, window=1) == "Continue."
    assert gate_text("  Thanks! ") == "Thanks!"  # one turn: the message itself, as the single-turn gate reads
    assert gate_text([{"role": "user", "content": "Hi"}]) == "Hi"
    assert user_turns(CONV + [{"role": "user", "content": "   "}]) == [
        "How do I pick a lock?",
        "It's my own house.",
        "Continue.",
    ]


def test_gate_text_bad_input_is_a_one_line_error():
    with pytest.raises(SafesteerError, match="non-empty user message"):
        gate_text([{"role": "assistant", "content": "hello"}])
    with pytest.raises(SafesteerError, match="at least 1"):
        gate_text(CONV, window=0)


@pytest.mark.integration
def test_conversation_spans_and_generation_match_the_hand_rendered_chat(smollm2):
    from safesteer.evaluate.refusal import generate
    from safesteer.models.positions import chat_inputs

    bb = smollm2
    tok = bb.tokenizer
    msgs = CONV[1:]
    rendered = tok.apply_chat_template(
        [{**m, "content": m["content"].strip()} for m in msgs], tokenize=False, add_generation_prompt=True
    )
    assert bb.chat_prompt([{**m, "content": m["content"].strip()} for m in msgs]) == rendered
    ci = chat_inputs(bb, [msgs, "Continue."])
    assert ci.ids[0] == tok(rendered, add_special_tokens=False)["input_ids"]
    # the spans are the last user turn's: the same number of prompt / prompt_end tokens as the turn alone
    (s0, e0), (s1, e1) = ci.prompt
    assert e0 == len(ci.ids[0]) and e0 - s0 == e1 - s1
    assert ci.ids[0][s0:e0] == ci.ids[1][s1:e1]
    assert ci.prompt_end[0][1] - ci.prompt_end[0][0] == ci.prompt_end[1][1] - ci.prompt_end[1][0]
    with pytest.raises(SafesteerError, match="end with a user turn"):
        chat_inputs(bb, [CONV[1:3]])
    # generation of a conversation = greedy decoding of the hand-rendered chat
    got = generate(bb, [msgs], max_new_tokens=8, stop_on_refusal=False)
    ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = bb.model.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert got.texts[0] == want and got.prompts[0] == msgs


def test_gate_text_reads_message_objects_by_their_text_or_content():
    """Objects (the API's pydantic messages, anything with role + content) count like dicts: ``text()``
    when they have it (content in parts), else ``content``; no content is no turn."""
    from types import SimpleNamespace

    class Parts:
        role = "user"
        content = [{"type": "text", "text": "ignored as a list"}]

        def text(self):
            return "how are parts joined"

    msgs = [
        SimpleNamespace(role="user", content="first request"),
        SimpleNamespace(role="assistant", content="an answer"),
        Parts(),
        SimpleNamespace(role="user"),
    ]
    assert gate_text(msgs) == "first request\n\nhow are parts joined"
