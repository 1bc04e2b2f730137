"""Atom cards: logit lens through the unembedding / MLM head, top texts, label statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from safesteer.cartography.cards import build_cards, describe, logit_lens_logits, logit_lens_tokens


def test_causal_logit_lens_is_norm_weight_then_lm_head(tiny_llama):
    bb = tiny_llama
    v = np.random.default_rng(0).normal(size=(2, bb.d_model)).astype(np.float32)
    got = logit_lens_logits(bb, v)
    g = bb.model.model.norm.weight.detach()
    ref = bb.model.lm_head(torch.tensor(v) * g)
    torch.testing.assert_close(got, ref.float())
    toks = logit_lens_tokens(bb, v, top_n=5)
    assert len(toks) == 2 and len(toks[0]["top"]) == 5 and len(toks[0]["bottom"]) == 5
    ids = torch.topk(ref[0], 40).indices.tolist()
    words = [bb.tokenizer.convert_ids_to_tokens(i) for i in ids if i not in bb.tokenizer.all_special_ids]
    assert toks[0]["top"] == words[:5]


def test_masked_logit_lens_uses_the_mlm_head(tiny_roberta):
    bb = tiny_roberta
    v = np.random.default_rng(1).normal(size=(1, bb.d_model)).astype(np.float32)
    got = logit_lens_logits(bb, v)
    head = bb.model.lm_head
    ref = head(torch.tensor(v)) - head(torch.zeros(1, bb.d_model))
    torch.testing.assert_close(got, ref.float())
    assert len(logit_lens_tokens(bb, v, 3)[0]["top"]) == 3


def test_build_cards(tiny_llama):
    W = np.random.default_rng(2).normal(size=(6, tiny_llama.d_model)).astype(np.float32)
    top = pd.DataFrame(
        {
            "atom": [1, 1, 1, 3],
            "rank": [0, 1, 2, 0],
            "id": ["d:1", "d:2", "d:3", "d:9"],
            "activation": [5.0, 4.0, 3.0, 1.0],
        }
    )
    amap = pd.DataFrame(
        {
            "atom": [1, 1, 3],
            "label": ["toxicity", "emotion:joy", "toxicity"],
            "category": ["toxicity", "emotion", "toxicity"],
            "score": [0.4, -0.6, 0.1],
            "r": [0.5, -0.7, 0.1],
            "dmu": [1.0, -1.0, 0.2],
            "freq_pos": [0.9, 0.1, 0.2],
            "freq_neg": [0.1, 0.5, 0.1],
        }
    )
    cards = build_cards(
        [1, 3],
        W_dec=W,
        atom_map=amap,
        top_acts=top,
        backbone=tiny_llama,
        n_texts=2,
        text_lookup=lambda ids: {i: f"text of {i}" for i in ids},
    )
    c1 = cards[0]
    assert c1["atom"] == 1 and [t["id"] for t in c1["top_texts"]] == ["d:1", "d:2"]
    assert c1["top_texts"][0]["text"] == "text of d:1"
    assert c1["labels"][0]["label"] == "emotion:joy"  # largest |score| first
    assert len(c1["tokens"]) == 10 and cards[1]["labels"][0]["label"] == "toxicity"
    assert describe(c1, "slurs", "fires on insults").startswith(
        "Label: slurs Reasoning: fires on insults Tokens: "
    )
    bare = build_cards([5])
    assert bare == [{"atom": 5, "tokens": [], "neg_tokens": [], "top_texts": [], "labels": []}]
