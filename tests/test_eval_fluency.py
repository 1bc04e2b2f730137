"""Fluency: PLL equals a slow one-token-at-a-time loop; causal NLL equals a manual computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_roberta

from safesteer.errors import SafesteerError
from safesteer.evaluate.fluency import mean_token_nll, pseudo_log_likelihood, wiki_passages
from safesteer.steering import Direction, Intervention, random_direction

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["the dog is good .", "you are a stupid idiot and i hate you .", "what is the time ?", "no"]


@pytest.fixture(scope="module")
def roberta64():
    bb = make_tiny_roberta(seed=3)
    bb.model.double()
    return bb


def _slow_pll(bb, text):
    tok = bb.tokenizer
    ids = tok(text, add_special_tokens=True)["input_ids"]
    special = set(tok.all_special_ids)
    total = 0.0
    for i, t in enumerate(ids):
        if t in special:
            continue
        masked = list(ids)
        masked[i] = tok.mask_token_id
        x = torch.tensor([masked])
        with torch.no_grad():
            logits = bb.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, i]
        total += float(torch.log_softmax(logits.double(), -1)[t])
    return total


def test_pll_equals_slow_loop_float64(roberta64):
    f = pseudo_log_likelihood(roberta64, TEXTS, batch_size=5)
    slow = [_slow_pll(roberta64, t) for t in TEXTS]
    np.testing.assert_allclose(f.logprob, slow, atol=1e-9, rtol=0)
    assert f.n_tokens.tolist() == [5, 10, 5, 1]
    np.testing.assert_allclose(f.per_token, f.logprob / f.n_tokens)


def test_pll_equals_slow_loop_float32(tiny_roberta):
    f = pseudo_log_likelihood(tiny_roberta, TEXTS, batch_size=3)
    slow = [_slow_pll(tiny_roberta, t) for t in TEXTS]
    np.testing.assert_allclose(f.logprob, slow, atol=1e-4, rtol=0)


def test_causal_nll_matches_manual(tiny_llama):
    f = mean_token_nll(tiny_llama, TEXTS, batch_size=3)
    tok = tiny_llama.tokenizer
    for text, lp, n in zip(TEXTS, f.logprob, f.n_tokens):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        logp = torch.log_softmax(tiny_llama.logits(x, torch.ones_like(x))[0].double(), -1)
        manual = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        assert n == len(ids) - 1
        assert lp == pytest.approx(manual, abs=1e-4)
    assert f.corpus_nll() == pytest.approx(-f.logprob.sum() / f.n_tokens.sum())
    assert f.perplexity() == pytest.approx(np.exp(f.corpus_nll()))


def test_alpha_zero_is_exact(tiny_backbone):
    from safesteer.evaluate.fluency import fluency

    d = Direction("r", random_direction(tiny_backbone.d_model, 2), "random", 0)
    base = fluency(tiny_backbone, TEXTS)
    zero = fluency(tiny_backbone, TEXTS, Intervention.from_direction(d, 0.0))
    np.testing.assert_array_equal(base.logprob, zero.logprob)
    far = fluency(tiny_backbone, TEXTS, Intervention.from_direction(d, 100.0))
    assert not np.allclose(base.logprob, far.logprob)


def test_wrong_kind_errors(tiny_roberta, tiny_llama):
    with pytest.raises(SafesteerError):
        mean_token_nll(tiny_roberta, TEXTS)
    with pytest.raises(SafesteerError):
        pseudo_log_likelihood(tiny_llama, TEXTS)


def test_wiki_passages():
    art = (
        " = Title = \n\n A short line . \n "
        + " ".join(["word"] * 30)
        + " . "
        + " ".join(["more"] * 70)
        + " . \n = = Sub = = \n"
    )
    ps = wiki_passages([art], min_words=20, max_words=80)
    assert len(ps) == 1
    assert len(ps[0].split()) <= 80
    assert "=" not in ps[0]
