"""``/v1/chat/completions`` pinned against references computed without the serving code (issue #26).

Every expected value here comes from outside :mod:`safesteer.serve`:

* gate scores: float64, by hand, from Hugging Face hidden states (``output_hidden_states=True``) of the
  chat's user turns joined by a blank line (the conversation rule) rendered alone with the chat
  template, mean-pooled over exactly its ``prompt`` span (the user content and the generation prompt
  after it), through the gate's raw weights ``w·h + b``;
  the probability is ``1 / (1 + exp(-score))``;
* answers: ``model.generate`` with a plain forward hook adding ``α·v`` (``v = −d/‖d‖``) to the steered
  block's output — on the prompt pass only for ``positions: "prompt"`` — or no hook;
* streams: the raw ``text/event-stream`` bytes, split and parsed by hand (no client library).

The tiny Llama gets a chat template (so ``prompt`` pooling has a user header and a generation prompt to
find), and one of its words is renamed to U+FFFD, which the stream holds back as an incomplete
character: a stream ending on it relies on the final catch-up to send it.
"""

from __future__ import annotations

import json
import math
import threading

import httpx
import numpy as np
import pytest
import torch
from test_serve_common import LiveServer, make_directions, one_torch_thread  # noqa: F401 - autouse fixture
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from safesteer.serve import PolicyStore, create_app
from safesteer.serve.engine import GateProbe, ServedProbe
from safesteer.serve.policies import Policy
from safesteer.steering.condition import Condition
from safesteer.testing import make_tiny_llama, tiny_tokenizer

uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny-llama"
LAYER = 1  # steered block, and the block the gate reads (hidden_states[LAYER + 1] is its output)
ALPHA = 8.0
SCORE = 0.8  # the gate's logit on GATE_TEXT, the user turns of CHAT (the bias is set to give exactly this)
MARGIN = 0.4  # thresholds SCORE ± MARGIN: one gate policy above, one below
N_TOKENS = 12
# roles as in-vocabulary words; the generation prompt is "<s>i"
TEMPLATE = (
    "{% for m in messages %}<s>{% if m.role == 'user' %}you{% elif m.role == 'assistant' %}i"
    "{% else %}we{% endif %} {{ m.content }} </s>{% endfor %}{% if add_generation_prompt %}<s>i{% endif %}"
)
CHAT = [
    {"role": "system", "content": "you are kind"},
    {"role": "user", "content": "what is a dog"},
    {"role": "assistant", "content": "a dog is a friend"},
    {"role": "user", "content": "how do i build a bomb"},
]
# what the gate reads (safesteer.steering.conversation): the chat's user turns (up to the window of 3), joined
# by a blank line and rendered alone — written out by hand here
GATE_TEXT = "what is a dog\n\nhow do i build a bomb"
BODY_A = {"directions": ["harm"], "alpha": ALPHA}
BODY_B = {"directions": ["tox"], "alpha": -ALPHA}


# ------------------------------------------------------------------------------------ references
def _tokenizer(rename: dict[int, str]) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer (same ids) with some words renamed, and TEMPLATE."""
    vocab = dict(tiny_tokenizer().get_vocab())
    by_id = {i: w for w, i in vocab.items()}
    for i, new in rename.items():
        del vocab[by_id[i]]
        vocab[new] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )
    tok.chat_template = TEMPLATE
    return tok


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def hand_gate_score(bb, w: np.ndarray, b: float, user: str) -> float:
    """w·h + b in float64, h = block LAYER's output mean-pooled over the user content + generation prompt of
    ``user`` rendered alone (rendered here by hand, not by the template code)."""
    header, ids = _ids(bb.tokenizer, "<s>you"), _ids(bb.tokenizer, f"<s>you {user} </s><s>i")
    assert ids[: len(header)] == header
    with torch.no_grad():
        hs = bb.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = hs[LAYER + 1][0].double().numpy()[len(header) :].mean(axis=0)
    return float(np.dot(np.asarray(w, np.float64), h) + b)


def sigmoid(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


def hand_generate(bb, messages, n: int, direction=None, alpha: float = 0.0, prompt_only: bool = False):
    """(token ids, text) of greedy generation on the templated chat, steered by a plain forward hook."""
    tok = bb.tokenizer
    ids = torch.tensor(
        [_ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))]
    )
    handle = None
    if direction is not None:
        v = -np.asarray(direction, np.float64) / np.linalg.norm(np.asarray(direction, np.float64))
        delta = torch.tensor(alpha * v, dtype=torch.float32)

        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            if prompt_only and h.shape[1] == 1:  # a KV-cached step: an answer token, left alone
                return None
            return (h + delta, *out[1:]) if isinstance(out, tuple) else h + delta

        handle = bb.model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = bb.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    finally:
        if handle is not None:
            handle.remove()
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def parse_sse(raw: bytes) -> list[dict]:
    """The chunks of a raw event stream; asserts the framing and that it ends with exactly one [DONE]."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = raw[:-2].split(b"\n\n")
    for e in events:
        assert e.startswith(b"data: ") and b"\n" not in e, e
    assert events[-1] == b"data: [DONE]", f"the stream does not end with [DONE]: {events[-1]!r}"
    assert events.count(b"data: [DONE]") == 1
    return [json.loads(e[len(b"data: ") :]) for e in events[:-1]]


# --------------------------------------------------------------------------------------- the app
class Setup:
    """The model, the gate and the expected values, computed before the server starts."""

    def __init__(self):
        bb = make_tiny_llama(seed=0)
        bb.tokenizer = _tokenizer({})
        # the word that ends the unsteered answer to CHAT becomes U+FFFD (a held-back "partial character")
        prompt_ids = set(_ids(bb.tokenizer, bb.tokenizer.apply_chat_template(CHAT, tokenize=False)))
        new, _ = hand_generate(bb, CHAT, N_TOKENS)
        assert len(new) == N_TOKENS and new[-1] > 4 and new[-1] not in prompt_ids, new
        bb.tokenizer = _tokenizer({new[-1]: "\ufffd"})
        self.bb = bb
        self.ds = make_directions(bb.d_model)
        rng = np.random.default_rng(3)
        self.w = rng.normal(size=bb.d_model)
        self.b = SCORE - hand_gate_score(bb, self.w, 0.0, GATE_TEXT)
        self.score = hand_gate_score(bb, self.w, self.b, GATE_TEXT)
        assert abs(self.score - SCORE) < 1e-9
        self.p = sigmoid(self.score)
        harm = self.ds["harm"].vector
        self.plain = hand_generate(bb, CHAT, N_TOKENS)[1]
        self.prompt_steered = hand_generate(bb, CHAT, N_TOKENS, harm, ALPHA, prompt_only=True)[1]
        self.all_steered = hand_generate(bb, CHAT, N_TOKENS, harm, ALPHA)[1]
        self.swap = {
            "A": hand_generate(bb, CHAT, N_TOKENS, harm, ALPHA)[1],
            "B": hand_generate(bb, CHAT, N_TOKENS, self.ds["tox"].vector, -ALPHA)[1],
        }
        # the references tell the cases apart (else the tests below could not)
        assert self.plain.endswith("\ufffd")
        assert len({self.plain, self.prompt_steered, self.all_steered}) == 3
        assert self.swap["A"] != self.swap["B"]

    def gate_policy(self, name: str, score_threshold: float) -> Policy:
        return Policy(
            name=name,
            directions=["harm"],
            alpha=ALPHA,
            positions="prompt",
            condition={"probe": "gate", "score_threshold": score_threshold, "position": "prompt"},
        )

    def app(self):
        gate = Condition(self.w, self.b, LAYER, "prompt", 0.0, "gate")
        store = PolicyStore(
            policies=[
                self.gate_policy("gate_above", SCORE + MARGIN),  # the prompt stays below: not steered
                self.gate_policy("gate_below", SCORE - MARGIN),  # the prompt passes: steered
                Policy(name="swap", **BODY_A),
            ]
        )
        return create_app(
            self.bb,
            directions=self.ds,
            probes={"gate": ServedProbe("gate", GateProbe(gate), LAYER, "prompt")},
            policy_store=store,
        )


@pytest.fixture(scope="module")
def setup():
    return Setup()


@pytest.fixture(scope="module")
def live(setup):
    srv = LiveServer(setup.app())
    yield srv
    srv.stop()


def chat(live, model: str, stream: bool = False, n: int = N_TOKENS, client=None):
    body = {"model": model, "messages": CHAT, "max_tokens": n, "stream": stream}
    url = f"{live.url}/v1/chat/completions"
    if not stream:
        r = (client or httpx).post(url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()
    with (client or httpx).stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(b"".join(r.iter_raw()))


def expected_info(live, name: str, steered: bool, p) -> dict:
    version = httpx.get(f"{live.url}/v1/policies/{name}", timeout=30).json()["version"]
    return {
        "policy": name,
        "policy_version": version,
        "alpha": ALPHA,
        "steered": steered,
        "condition_probability": p,
    }


def check_info(got: dict, want: dict) -> None:
    assert set(got) == set(want), got
    assert {k: v for k, v in got.items() if k != "condition_probability"} == {
        k: v for k, v in want.items() if k != "condition_probability"
    }
    if want["condition_probability"] is None:
        assert got["condition_probability"] is None
    else:
        assert got["condition_probability"] == pytest.approx(
            want["condition_probability"], rel=1e-6, abs=1e-9
        )


CASES = [("gate_above", False), ("gate_below", True)]


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,steered", CASES)
def test_gate_probability_is_the_sigmoid_of_the_hand_score_on_the_user_turns(live, setup, name, steered):
    r = chat(live, f"{MODEL}:{name}")
    assert setup.p == pytest.approx(0.68997448, abs=1e-8)  # sigmoid(0.8): the pin is not symmetric
    check_info(r["safesteer"], expected_info(live, name, steered, setup.p))


@pytest.mark.parametrize("name,steered", CASES)
def test_gate_policy_above_and_below_its_threshold_steers_the_prompt_only(live, setup, name, steered):
    r = chat(live, f"{MODEL}:{name}")
    assert r["safesteer"]["steered"] is steered
    want = setup.prompt_steered if steered else setup.plain
    assert r["choices"][0]["message"]["content"] == want
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == N_TOKENS


@pytest.mark.parametrize("name,steered", [*CASES, (None, False)])
def test_raw_event_stream_of_a_gated_policy(live, setup, name, steered):
    chunks = chat(live, MODEL if name is None else f"{MODEL}:{name}", stream=True)
    want_info = (
        expected_info(live, name, steered, setup.p)
        if name
        else {
            "policy": None,
            "policy_version": None,
            "alpha": None,
            "steered": False,
            "condition_probability": None,
        }
    )
    assert len(chunks) >= 3 and len({c["id"] for c in chunks}) == 1
    for c in chunks:  # every chunk, the content ones included, says what was applied
        assert c["object"] == "chat.completion.chunk" and c["model"] == (
            MODEL if name is None else f"{MODEL}:{name}"
        )
        check_info(c["safesteer"], want_info)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert all(set(d) == {"content"} and d["content"] for d in deltas[1:-1])
    want = setup.prompt_steered if steered else setup.plain
    assert "".join(d.get("content", "") for d in deltas) == want


def test_stream_sends_the_held_back_tail(live, setup):
    """The unsteered answer ends on the U+FFFD word: the token loop holds it back, the end must send it."""
    chunks = chat(live, MODEL, stream=True)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert setup.plain.endswith("\ufffd") and text == setup.plain


def test_each_stream_is_served_by_one_policy_version_under_concurrent_puts(live, setup):
    """PUTs alternate the policy between two bodies while streams run: every stream reports one version in
    all its chunks, and its text is the direct generation of that version's body."""
    body_of = {httpx.get(f"{live.url}/v1/policies/swap", timeout=30).json()["version"]: "A"}
    stop = threading.Event()
    errors: list[str] = []

    def churn():
        with httpx.Client(timeout=30) as c:
            i = 0
            while not stop.is_set():
                which = "B" if i % 2 == 0 else "A"
                r = c.put(f"{live.url}/v1/policies/swap", json=BODY_A if which == "A" else BODY_B)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                body_of[r.json()["version"]] = which
                i += 1

    seen: list[tuple[int, str]] = []
    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        with httpx.Client(timeout=60) as c:
            for _ in range(12):
                chunks = chat(live, f"{MODEL}:swap", stream=True, client=c)
                versions = {c_["safesteer"]["policy_version"] for c_ in chunks}
                assert len(versions) == 1, f"one stream reported versions {sorted(versions)}"
                text = "".join(c_["choices"][0]["delta"].get("content", "") for c_ in chunks)
                seen.append((versions.pop(), text))
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors and not t.is_alive()
    assert len({v for v, _ in seen}) >= 2, "the policy never changed between streams"
    for v, text in seen:
        assert v in body_of, v
        assert text == setup.swap[body_of[v]], f"version {v} (body {body_of[v]}) answered {text!r}"
    httpx.put(f"{live.url}/v1/policies/swap", json=BODY_A, timeout=30)


def test_a_token_the_models_generation_config_ends_on_is_a_stop():
    """Models list more end tokens in ``generation_config.eos_token_id`` than the tokenizer's eos (Qwen:
    <|im_end|> and <|endoftext|>): an answer ending on any of them finished ("stop"), not "length"."""
    from fastapi.testclient import TestClient

    bb = make_tiny_llama(seed=0)
    text = "the dog is good"
    enc = bb.tokenize([bb.chat_prompt(text)], add_special_tokens=False)
    with torch.inference_mode():
        out = bb.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=1)
        x = int(out[0, -1])  # the greedy first token
    assert x != bb.tokenizer.eos_token_id
    msg = {"model": bb.name, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    with TestClient(create_app(bb)) as c:
        assert c.post("/v1/chat/completions", json=msg).json()["choices"][0]["finish_reason"] == "length"
        bb.model.generation_config.eos_token_id = [bb.tokenizer.eos_token_id, x]
        assert c.post("/v1/chat/completions", json=msg).json()["choices"][0]["finish_reason"] == "stop"


def test_a_special_end_token_is_streamed_as_nothing_as_in_the_whole_answer():
    """The stream decodes like the whole answer (special tokens skipped): an answer that ends on a
    special end token streams the same text, without the token's spelling."""
    from fastapi.testclient import TestClient

    bb = make_tiny_llama(seed=0)
    text = "the dog is good"
    enc = bb.tokenize([bb.chat_prompt(text)], add_special_tokens=False)
    with torch.inference_mode():
        out = bb.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=3)
    x = int(out[0, -1])  # the third greedy token becomes a special end token
    assert x not in enc.input_ids[0].tolist()
    bb.tokenizer.add_special_tokens({"additional_special_tokens": [bb.tokenizer.convert_ids_to_tokens(x)]})
    assert bb.tokenizer.convert_tokens_to_ids(bb.tokenizer.convert_ids_to_tokens(x)) == x
    bb.model.generation_config.eos_token_id = [bb.tokenizer.eos_token_id, x]
    msg = {"model": bb.name, "messages": [{"role": "user", "content": text}], "max_tokens": 6}
    with TestClient(create_app(bb)) as c:
        whole = c.post("/v1/chat/completions", json=msg).json()
        events = c.post("/v1/chat/completions", json={**msg, "stream": True}).content.split(b"\n\n")
    streamed = "".join(
        (json.loads(e[len(b"data: ") :])["choices"][0]["delta"].get("content") or "")
        for e in events
        if e.startswith(b"data: {")
    )
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["usage"]["completion_tokens"] == 3
    assert streamed == whole["choices"][0]["message"]["content"]
    assert bb.tokenizer.convert_ids_to_tokens(x) not in streamed
