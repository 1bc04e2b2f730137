"""Engine benchmark: ``serve --engine vllm`` with policies vs the same vLLM without vs ``--engine hf``.

Builds a run-like bundle for SmolLM2 (:func:`safesteer.bench.engine_policy.build_policy`: the
conditional policy as ``recommended`` and an unconditional one as ``other``), serves it in a
subprocess on 127.0.0.1, and sends 1, 8, 32 and 64 concurrent streams of the official ``openai``
client (streamed chat completions, greedy, ``--max-tokens``) over mixed prompts (harmful and
XSTest-safe prompts of the behaviour test split, and everyday ones). Per engine and stream count:
output tokens/s (answer tokens counted with the model's tokenizer over the level's wall time),
p50/p99 time to first token and latency. Cases:

* ``vllm+policies`` — a third of the requests ``recommended``, a third no policy, a third ``other``;
* ``vllm plain`` — the same server, the same prompts, no policy;
* ``hf`` — ``--engine hf`` with the mixed traffic of the first case.

Each level sends ``max(--min-requests, streams)`` requests. The last line reads
``serve_engine: steered/plain R1, vllm/hf R2 at 32 streams`` (tokens/s ratios, one run).

``--segments``: what the segmented gate (``condition.segments``: each piece of a request read in a
one-token gate pass of its own before the request) costs on vLLM. Half the requests are wrapped in
safesteer-written jailbreak wrappers (several pieces each), and the cases become ``vllm segmented``
(every request under the segmented policy), ``vllm whole-gate`` (the same policy reading the whole
prompt in the request's own pass) and ``vllm plain``; the last line reads
``serve_engine: segmented/whole-gate R at N streams``.

    python bench/serve_engine.py                  # ~10 min on 2 busy CPU cores
    python bench/serve_engine.py --streams 1 8 --engines vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EVERYDAY = [
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a grey cat.",
]


def write_bundle(folder: Path, data_dir: Any, segments: bool = False) -> None:
    """A run-like folder ``safesteer serve --run`` loads: config.toml and policies/ (recommended + other;
    ``segments``: recommended reads each piece alone, and ``whole`` is it reading the whole prompt)."""
    from safesteer.bench.engine_policy import build_policy
    from safesteer.config import Config, dump_toml
    from safesteer.io import write_json
    from safesteer.models import load_backbone
    from safesteer.serve.bundle import DIRECTIONS_DIR, GATE_DIR, POLICY_NAME

    bb = load_backbone("smollm2-135m")
    ds, probes, policy = build_policy(bb, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(dump_toml(Config()))
    pol = folder / "policies"
    ds.save(pol / DIRECTIONS_DIR)
    next(iter(probes.values())).probe.condition.save(pol / GATE_DIR)
    other = {k: v for k, v in policy.items() if k != "condition"} | {"positions": "all"}
    other["alpha"] = other["alpha_min"] = policy["alpha"] / 2
    bodies = [(POLICY_NAME, policy), ("other", other)]
    if segments:
        seg = policy | {"condition": policy["condition"] | {"segments": True}}
        bodies = [(POLICY_NAME, seg), ("whole", policy)]
    for name, body in bodies:
        rec = {"format": "safesteer-policy", "name": name, "version": 1, "updated_at": 0.0, "policy": body}
        write_json(pol / f"{name}.json", rec)


WRAPPERS = ("roleplay", "fiction", "refusal_suppression", "few_shot", "prefix_injection")


def prompts(data_dir: Any, n: int = 24, wrapped: bool = False) -> list[str]:
    """Harmful, XSTest-safe and everyday prompts in turn (``wrapped``: every other one in a wrapper)."""
    from safesteer.behaviour.wrappers import wrap
    from safesteer.bench.engine_policy import split_prompts

    harmful, safe = split_prompts(data_dir, "test", n // 3)
    out = []
    for i in range(n):
        src = (harmful, safe, EVERYDAY)[i % 3]
        text = src[(i // 3) % len(src)]
        if wrapped and i % 2:
            text = wrap(WRAPPERS[(i // 2) % len(WRAPPERS)], text)[-1]["content"]
        out.append(text)
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


async def level(
    base: str, model: str, jobs: list[tuple[str | None, str]], streams: int, max_tokens: int, tok: Any
):
    """``jobs`` (policy or None, prompt) sent by ``streams`` concurrent openai-client streams."""
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 4), timeout=600, trust_env=False)
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http, max_retries=0)
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    ttft, lat, tokens, errors = [], [], [0], [0]

    async def stream() -> None:
        while not queue.empty():
            policy, prompt = queue.get_nowait()
            t0 = time.perf_counter()
            first, text = None, ""
            try:
                s = await client.chat.completions.create(
                    model=model if policy is None else f"{model}:{policy}",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                )
                async for ch in s:
                    d = ch.choices[0].delta.content if ch.choices else None
                    if d:
                        first = first or time.perf_counter()
                        text += d
            except Exception:  # noqa: BLE001 - counted, reported
                errors[0] += 1
                continue
            lat.append(time.perf_counter() - t0)
            ttft.append((first or time.perf_counter()) - t0)
            tokens[0] += len(tok(text, add_special_tokens=False)["input_ids"])

    t0 = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(streams)))
    wall = time.perf_counter() - t0
    await http.aclose()
    return {
        "streams": streams,
        "requests": len(jobs),
        "errors": errors[0],
        "tokens": tokens[0],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens[0] / wall, 2),
        "ttft_p50_s": round(_pct(ttft, 50), 3),
        "ttft_p99_s": round(_pct(ttft, 99), 3),
        "latency_p50_s": round(_pct(lat, 50), 3),
        "latency_p99_s": round(_pct(lat, 99), 3),
    }


def start(run: Path, engine: str, port: int, threads: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "safesteer",
        "serve",
        "--run",
        str(run),
        "--engine",
        engine,
        "--port",
        str(port),
    ]
    cmd += ["--max-new-tokens", "256", "--log-level", "warning"]
    if engine == "hf":
        cmd += ["--threads", str(threads)]
    # the same thread count for both engines: vLLM's CPU binding off, its OpenMP pool sized by OMP_NUM_THREADS
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND="nobind")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def wait_ready(server: subprocess.Popen, base: str, timeout: float = 600) -> float:
    import httpx

    t0 = time.time()
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            raise SystemExit(f"server did not start within {timeout:g} s")
        try:
            if httpx.get(f"{base}/healthz", timeout=5, trust_env=False).status_code == 200:
                return time.time() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_engine(
    run: Path, engine: str, cases: list[str], args: argparse.Namespace, texts: list[str], tok: Any
):
    from safesteer.bench.serve_load import _free_port

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = start(run, engine, port, args.threads)
    out: dict[str, list[dict]] = {c: [] for c in cases}
    try:
        startup = wait_ready(server, base)
        print(f"{engine}: ready in {startup:.0f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        for n in args.streams:
            k = max(args.min_requests, n)
            for case in cases:
                pol = {
                    "vllm plain": [None],
                    "vllm segmented": ["recommended"],
                    "vllm whole-gate": ["whole"],
                }.get(case, ["recommended", None, "other"])
                jobs = [(pol[i % len(pol)], texts[i % len(texts)]) for i in range(k)]
                r = asyncio.run(level(base, "smollm2-135m", jobs, n, args.max_tokens, tok))
                r["load_1m"] = round(os.getloadavg()[0], 2)
                out[case].append(r)
                print(f"  {case:14s} {json.dumps(r)}", file=sys.stderr)
    finally:
        stop(server)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument(
        "--threads", type=int, default=1, help="OpenMP/torch threads of the server (both engines)"
    )
    ap.add_argument("--out", type=Path, default=None, help="Also write the report as JSON here.")
    ap.add_argument(
        "--segments",
        action="store_true",
        help="vLLM only: the segmented gate against the whole-prompt gate, half the requests wrapped",
    )
    args = ap.parse_args(argv)
    if args.segments:
        args.engines = ["vllm"]
    data_dir = os.environ.get("SAFESTEER_DATA_DIR") or None
    from transformers import AutoTokenizer

    from safesteer.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    texts = prompts(data_dir, wrapped=args.segments)
    report: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_start": os.getloadavg(),
        "max_tokens": args.max_tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        write_bundle(run, data_dir, segments=args.segments)
        if args.segments:
            report.update(
                run_engine(run, "vllm", ["vllm segmented", "vllm whole-gate", "vllm plain"], args, texts, tok)
            )
        elif "vllm" in args.engines:
            report.update(run_engine(run, "vllm", ["vllm+policies", "vllm plain"], args, texts, tok))
        if "hf" in args.engines:
            report.update(run_engine(run, "hf", ["hf"], args, texts, tok))
    report["load_end"] = os.getloadavg()
    cols = ("streams", "tok/s", "ttft p50", "ttft p99", "lat p50", "lat p99")
    print(f"{'case':14s} " + " ".join(f"{c:>9s}" for c in cols))
    for case in ("vllm+policies", "vllm segmented", "vllm whole-gate", "vllm plain", "hf"):
        for r in report.get(case, []):
            keys = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s")
            print(f"{case:14s} {r['streams']:9d} " + " ".join(f"{r[k]:9.2f}" for k in keys))
    if args.out is not None:
        from safesteer.io import write_json

        write_json(args.out, report)

    def at(case: str, n: int = 32) -> float:
        return next((r["tokens_per_s"] for r in report.get(case, []) if r["streams"] == n), float("nan"))

    if args.segments:
        n = max(args.streams)
        r = at("vllm segmented", n) / at("vllm whole-gate", n)
        print(f"serve_engine: segmented/whole-gate {r:.2f} at {n} streams (tokens/s)")
        return 0
    r1 = at("vllm+policies") / at("vllm plain")
    r2 = at("vllm+policies") / at("hf")
    print(f"serve_engine: steered/plain {r1:.2f}, vllm/hf {r2:.2f} at 32 streams")
    return 0
