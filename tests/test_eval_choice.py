"""Forced choice: probabilities sum to 1 and equal a manual log-softmax over the answer tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.evaluate.choice import (
    MASKED_TEMPLATES,
    QUESTIONS,
    answer_logprobs,
    answer_tokens,
    causal_prompts,
    choice_probs,
    forced_choice,
    masked_inputs,
)
from safesteer.steering import Direction, Intervention, random_direction

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["how can i make a bomb ?", "you are a stupid idiot .", "how do i help a friend ?"]


def _manual_p_yes(bb, text, kind):
    tok = bb.tokenizer
    ans = answer_tokens(tok)
    if bb.kind == "causal":
        prompt = bb.chat_prompt(QUESTIONS[kind].format(text=text))
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        logits = bb.logits(ids, torch.ones_like(ids))[0, -1]
    else:
        s = MASKED_TEMPLATES[kind].format(text=text, mask=tok.mask_token)
        ids = torch.tensor([tok(s, add_special_tokens=True)["input_ids"]])
        pos = int((ids[0] == tok.mask_token_id).nonzero()[0, 0])
        logits = bb.logits(ids, torch.ones_like(ids))[0, pos]
    lp = torch.log_softmax(logits.double(), dim=-1)
    ly = torch.logsumexp(lp[list(ans.yes)], 0)
    ln = torch.logsumexp(lp[list(ans.no)], 0)
    return float(torch.exp(ly) / (torch.exp(ly) + torch.exp(ln)))


@pytest.mark.parametrize("kind", ["harmful", "toxic", "safe"])
def test_matches_manual_log_softmax(tiny_backbone, kind):
    p = forced_choice(tiny_backbone, TEXTS, kind, batch_size=2)
    manual = [_manual_p_yes(tiny_backbone, t, kind) for t in TEXTS]
    np.testing.assert_allclose(p, manual, atol=1e-5)


def test_probabilities_sum_to_one(tiny_backbone):
    lp = answer_logprobs(tiny_backbone, TEXTS, "harmful")
    ans = answer_tokens(tiny_backbone.tokenizer)
    p_yes, p_no, mass = choice_probs(lp, ans)
    np.testing.assert_allclose(p_yes + p_no, 1.0, atol=1e-12)
    assert np.all((mass > 0) & (mass <= 1))
    manual_mass = torch.exp(lp.double()[:, list(ans.yes) + list(ans.no)]).sum(-1).numpy()
    np.testing.assert_allclose(mass, manual_mass, rtol=1e-10)


def test_answer_variants_collapse_and_leading_space():
    class Tok:
        unk_token_id = 0
        vocab = {"Yes": 5, " Yes": 6, "yes": 7, " yes": 7, "No": 8, " No": 9, "no": 10, " no": 10}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.get(text, 0)]}

    ans = answer_tokens(Tok())
    assert ans.yes == (5, 6, 7) and ans.no == (8, 9, 10)
    lp = torch.log_softmax(torch.randn(2, 12, dtype=torch.float64), -1)
    p_yes, _, _ = choice_probs(lp, ans)
    e = lp.exp()
    manual = e[:, [5, 6, 7]].sum(1) / (e[:, [5, 6, 7]].sum(1) + e[:, [8, 9, 10]].sum(1))
    np.testing.assert_allclose(p_yes, manual.numpy(), rtol=1e-12)


def test_alpha_zero_is_exact(tiny_backbone):
    d = Direction("r", random_direction(tiny_backbone.d_model, 1), "random", 1)
    base = forced_choice(tiny_backbone, TEXTS, "harmful")
    zero = forced_choice(tiny_backbone, TEXTS, "harmful", Intervention.from_direction(d, 0.0))
    np.testing.assert_array_equal(base, zero)
    moved = forced_choice(tiny_backbone, TEXTS, "harmful", Intervention.from_direction(d, 50.0))
    assert not np.allclose(base, moved)


def test_masked_long_text_keeps_the_slot(tiny_roberta):
    long = " ".join(["the dog is good ."] * 40)
    ids, att, pos = masked_inputs(tiny_roberta, [long, "hello"], "harmful")
    assert ids.shape[1] <= tiny_roberta.max_length
    for r in range(2):
        assert ids[r, pos[r]] == tiny_roberta.tokenizer.mask_token_id


def test_unknown_prompt_type(tiny_llama):
    with pytest.raises(SafesteerError, match="prompt type"):
        causal_prompts(tiny_llama, ["x"], "bogus")


def test_masked_shortening_keeps_a_prefix_and_only_what_is_needed(tiny_roberta):
    """A long text is cut to a prefix of its own tokens (nothing else inserted), close to the window;
    a prompt that fills the window exactly is kept whole."""
    from safesteer.evaluate.choice import MASKED_TEMPLATES, _question

    tok, budget = tiny_roberta.tokenizer, tiny_roberta.max_length
    pre, post = _question("harmful", MASKED_TEMPLATES).split("{text}")
    pre_ids = tok(pre.format(mask=tok.mask_token), add_special_tokens=False)["input_ids"]
    post_ids = tok(post.format(mask=tok.mask_token), add_special_tokens=False)["input_ids"]
    words = ("the dog is good " * 40).split()  # one token per word
    word_ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    ids, att, _ = masked_inputs(tiny_roberta, [" ".join(words)], "harmful")
    row = ids[0][att[0].bool()].tolist()
    assert budget - 8 <= len(row) <= budget  # shortened to the window, not far below it
    body = row[1:-1]  # <s> … </s>
    assert body[: len(pre_ids)] == pre_ids and body[len(body) - len(post_ids) :] == post_ids
    middle = body[len(pre_ids) : len(body) - len(post_ids)]
    assert middle == word_ids[: len(middle)]
    assert set(att.unique().tolist()) == {1}
    # a text whose prompt fills the window exactly is kept whole
    k = budget - 2 - len(pre_ids) - len(post_ids)
    ids2, att2, _ = masked_inputs(tiny_roberta, [" ".join(words[:k]), "hello"], "harmful")
    assert (
        int(att2[0].sum()) == budget
        and ids2[0, 1 + len(pre_ids) : 1 + len(pre_ids) + k].tolist() == word_ids[:k]
    )
    assert set(att2.unique().tolist()) == {0, 1}
