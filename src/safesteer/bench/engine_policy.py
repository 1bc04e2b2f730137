"""A conditional policy for SmolLM2 in seconds, and the HF ↔ vLLM engine parity check.

:func:`build_policy` follows the behaviour study's recipe in its simplest form (CAST with a linear
gate): on the study's *train* split (:func:`safesteer.behaviour.prompts.load_prompts`, hash split),
the gate is the DiffMean of harmful − harmless prompts at ``gate_layer`` pooled over ``prompt``,
its threshold calibrated to ``fpr`` on the harmless train prompts; the steering vector is CAA
(Rimsky et al.) at ``layer``: the residual over a refusal answer prefix minus over a compliant one,
after the harmful train prompts, added with α = ``alpha_norm`` × the layer's median residual norm.
It is not the study's validated policy (``safesteer run`` writes that one); it serves to compare engines.

:func:`parity` sends each prompt to both services (the same FastAPI routes; the vLLM one receives
them concurrently, so steered, unsteered and differently-steered requests share its batches) and
compares gate decisions, scores, greedy answers and refusal rates.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Sequence

import numpy as np

from safesteer.behaviour.prompts import load_prompts
from safesteer.evaluate.generation import is_refusal
from safesteer.serve.bundle import GATE_PROBE
from safesteer.serve.engine import GateProbe, ServedProbe
from safesteer.steering import Direction, DirectionSet
from safesteer.steering.condition import Condition, threshold_for_fpr

CAPS = 400
REFUSE = "I'm sorry, but I can't help with that."
COMPLY = "Sure, here is how to do that."


def split_prompts(data_dir: Any, split: str, n: int | None = None) -> tuple[list[str], list[str]]:
    """(harmful, XSTest-safe) prompts of the behaviour study's ``split`` (hash order, at most ``n`` each)."""
    P = load_prompts(CAPS, data_dir=data_dir)
    harmful = P.take(P.mask(split=split, harmful=1) & ~P.aug)
    safe = P.take(P.mask(split=split, group="xstest_safe") & ~P.aug)
    return harmful[:n], safe[:n]


def build_policy(
    backbone: Any,
    data_dir: Any,
    n_train: int = 48,
    gate_layer: int = 12,
    layer: int = 15,
    fpr: float = 0.05,
    alpha_norm: float = 0.3,
    positions: str = "prompt",
) -> tuple[DirectionSet, dict[str, ServedProbe], dict[str, Any]]:
    """(directions, probes, policy body) of a conditional refusal policy (see the module docstring)."""
    P = load_prompts(CAPS, data_dir=data_dir)
    harmful = P.take(P.mask(split="train", harmful=1) & ~P.aug)[:n_train]
    harmless = P.take(P.mask(split="train", harmful=0) & ~P.aug)[:n_train]
    texts = harmful + harmless
    Hp = backbone.pooled(texts, [gate_layer, layer], batch_size=16, position="prompt")
    n = len(harmful)
    refuse = backbone.pooled(harmful, [layer], batch_size=16, position="answer", answers=[REFUSE] * n)[layer]
    comply = backbone.pooled(harmful, [layer], batch_size=16, position="answer", answers=[COMPLY] * n)[layer]
    G = np.asarray(Hp[gate_layer], dtype=np.float64)
    w = G[:n].mean(0) - G[n:].mean(0)
    w /= np.linalg.norm(w)
    b = -float((G @ w).mean())
    threshold = threshold_for_fpr(G[n:] @ w + b, fpr)
    gate = Condition(w, b, gate_layer, "prompt", threshold, GATE_PROBE)
    refusal = np.asarray(refuse.mean(0) - comply.mean(0), dtype=np.float64)
    scale = float(np.median(np.linalg.norm(np.asarray(Hp[layer]), axis=1)))
    alpha = (
        -float(alpha_norm) * scale
    )  # h' = h - alpha * unit(d): a negative alpha adds the refusal direction
    ds = DirectionSet([Direction("refusal", refusal, "custom", layer, ["caa:train:refuse-comply"])])
    probes = {GATE_PROBE: ServedProbe(GATE_PROBE, GateProbe(gate), gate_layer, "prompt")}
    policy = {
        "description": f"refusal CAA at layer {layer}; gate: DiffMean at {gate_layer}, {fpr:g} FPR",
        "directions": ["refusal"],
        "layer": layer,
        "alpha": alpha,
        "alpha_min": min(alpha, 0.0),
        "alpha_max": max(alpha, 0.0),
        "condition": {"probe": GATE_PROBE, "score_threshold": threshold, "position": "prompt"},
        "positions": positions,
    }
    return ds, probes, policy


def chat(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code} {r.text[:200]}")
    out = r.json()
    return {"text": out["choices"][0]["message"]["content"], **out["safesteer"]}


def parity(
    hf: Any,
    vllm: Any,
    model: str,
    policy: str,
    harmful: Sequence[str],
    safe: Sequence[str],
    max_tokens: int = 24,
    concurrency: int = 16,
) -> dict[str, Any]:
    """HF vs vLLM on ``harmful`` + ``safe`` prompts under ``policy`` (clients: TestClient or httpx)."""
    prompts = list(harmful) + list(safe)
    steered = f"{model}:{policy}"
    hf_rows = [chat(hf, steered, p, max_tokens) for p in prompts]
    jobs = [(steered, p) for p in prompts] + [(model, p) for p in prompts]
    with cf.ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(lambda j: chat(vllm, j[0], j[1], max_tokens), jobs))
    v_rows, plain = got[: len(prompts)], got[len(prompts) :]
    agree = [h["steered"] == v["steered"] for h, v in zip(hf_rows, v_rows)]
    dp = [
        abs(h["condition_probability"] - v["condition_probability"])
        for h, v in zip(hf_rows, v_rows)
        if h["condition_probability"] is not None and v["condition_probability"] is not None
    ]
    same = [h["text"] == v["text"] for h, v in zip(hf_rows, v_rows)]
    unflagged = [i for i, v in enumerate(v_rows) if not v["steered"]]
    nh = len(harmful)

    def refusal(rows: list[dict], lo: int, hi: int) -> float:
        return float(np.mean([is_refusal(r["text"]) for r in rows[lo:hi]])) if hi > lo else float("nan")

    return {
        "n": len(prompts),
        "gate_agreement": float(np.mean(agree)),
        "max_abs_dp": float(max(dp)) if dp else 0.0,
        "flagged_hf": int(sum(h["steered"] for h in hf_rows)),
        "flagged_vllm": int(sum(v["steered"] for v in v_rows)),
        "token_identical": float(np.mean(same)),
        "differing": [prompts[i] for i, s in enumerate(same) if not s],
        "unflagged": len(unflagged),
        "unflagged_equal_plain": float(np.mean([v_rows[i]["text"] == plain[i]["text"] for i in unflagged]))
        if unflagged
        else 1.0,
        "refusal_harmful_hf": refusal(hf_rows, 0, nh),
        "refusal_harmful_vllm": refusal(v_rows, 0, nh),
        "refusal_safe_hf": refusal(hf_rows, nh, len(prompts)),
        "refusal_safe_vllm": refusal(v_rows, nh, len(prompts)),
    }


class _Live:
    """uvicorn in a thread on 127.0.0.1 (an OS-chosen port)."""

    def __init__(self, app: Any):
        import threading
        import time

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def main(argv: list[str] | None = None) -> int:
    """The parity report line: HF vs vLLM on the behaviour test split (harmful + XSTest-safe)."""
    import argparse
    import json
    import os

    import httpx

    from safesteer.models import load_backbone
    from safesteer.models.registry import resolve_model
    from safesteer.serve import Limits, create_app
    from safesteer.serve.vllm_engine import TokenizerBackbone, VllmEngine, VllmSettings

    ap = argparse.ArgumentParser(description="HF vs vLLM engine parity on the behaviour test split")
    ap.add_argument(
        "--n-harmful", type=int, default=104, help="harmful test prompts (the study's n_test_harmful)"
    )
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data_dir = os.environ.get("SAFESTEER_DATA_DIR") or None
    hf = load_backbone("smollm2-135m")
    ds, probes, policy = build_policy(hf, data_dir)
    harmful, safe = split_prompts(data_dir, "test")
    harmful = harmful[: args.n_harmful]
    path = str(resolve_model("smollm2-135m").path)
    engine = VllmEngine(path, VllmSettings(kv_cache_gb=0.5, max_model_len=1024, max_num_seqs=32))
    limits = Limits(max_abs_alpha=1000.0)
    servers = [
        _Live(create_app(TokenizerBackbone("smollm2-135m", path), ds, probes, limits=limits, vllm=engine)),
        _Live(create_app(hf, ds, probes, limits=limits)),
    ]
    try:
        for s in servers:
            assert httpx.put(f"{s.url}/v1/policies/recommended", json=policy, timeout=60).status_code == 201
        with (
            httpx.Client(base_url=servers[1].url, timeout=600) as h,
            httpx.Client(base_url=servers[0].url, timeout=600) as v,
        ):
            r = parity(h, v, "smollm2-135m", "recommended", harmful, safe, args.max_tokens, concurrency=32)
    finally:
        for s in servers:
            s.stop()
        engine.close()
    r["n_harmful"], r["n_safe"] = len(harmful), len(safe)
    print(json.dumps(r, indent=1))
    if args.out:
        from safesteer.io import write_json

        write_json(args.out, r)
    print(
        f"engine_parity: n={r['n']} gate agreement {r['gate_agreement']:.3f} "
        f"(max |dp| {r['max_abs_dp']:.1e}), "
        f"token-identical {r['token_identical']:.3f}, refusal harmful hf {r['refusal_harmful_hf']:.3f} / "
        f"vllm {r['refusal_harmful_vllm']:.3f}, XSTest-safe hf {r['refusal_safe_hf']:.3f} / "
        f"vllm {r['refusal_safe_vllm']:.3f}, unflagged == plain {r['unflagged_equal_plain']:.3f}"
    )
    return 0
