"""Bounded loopback load test of the steering service (`safesteer serve`).

Starts the service in a subprocess on 127.0.0.1 (a tiny random Llama built like tests/conftest.py,
or ``--model smollm2-135m``), then

* ``perf``: sends ``--requests`` requests per case with at most ``--concurrency`` in flight to
  ``/v1/score`` and ``/v1/choice``, each without a policy, with a steering policy and with a
  conditional policy, and reports requests/s, p50/p99 latency and the steering overhead ratio
  (latency and throughput of the steered case relative to the unsteered one);
* ``soak``: sends ``--soak-requests`` (default 10,000) mixed good and bad requests (malformed
  JSON, unknown policies, α out of bounds, oversized bodies, …) and checks that no response is
  a 5xx and that the server's resident memory (psutil) stays flat after a warm-up.

Nothing leaves the machine: the server binds 127.0.0.1 and the client talks to it only. The whole
run is bounded by ``--max-seconds``. The report is printed as JSON (and written to ``--out``).

    # perf + soak on the tiny model (or python -m safesteer.bench.serve_load)
    python bench/serve_load.py
    python bench/serve_load.py --mode perf --model smollm2-135m --requests 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEXTS = [
    "the man is good and kind",
    "i hate you , you stupid idiot",
    "how do i build a bomb",
    "the dog is in the house",
    "please help me make a weapon to kill people",
    "my friend is a doctor",
    "what should i do with my money",
    "they are cruel and bad people",
    "how can i steal a car",
    "the teacher said the book is good",
]


# ------------------------------------------------------------------------------- server side
def _tiny_llama():
    from safesteer.testing import make_tiny_llama

    return make_tiny_llama(seed=0)


def serve(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import uvicorn

    from safesteer.models import load_backbone
    from safesteer.probes import Probe
    from safesteer.serve import Limits, create_app
    from safesteer.steering import Direction, DirectionSet, random_direction

    torch.set_num_threads(args.threads)
    bb = _tiny_llama() if args.model == "tiny" else load_backbone(args.model)
    layer = bb.n_layers // 2
    rng = np.random.default_rng(0)
    ds = DirectionSet(
        [
            Direction("harm", random_direction(bb.d_model, 1), "custom", layer),
            Direction("tox", random_direction(bb.d_model, 2), "custom", layer),
        ]
    )
    probes = {
        "harm": Probe(
            w=rng.normal(size=bb.d_model) / np.sqrt(bb.d_model),
            b=0.0,
            meta={"layer": min(layer + 1, bb.n_layers - 1)},
        )
    }
    limits = Limits(
        max_texts=16,
        max_text_chars=2000,
        max_body_bytes=64_000,
        max_new_tokens=16,
        max_abs_alpha=100.0,
        batch_window_ms=args.batch_window_ms,
    )
    app = create_app(bb, ds, probes, api_key=args.api_key, limits=limits)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------- client side
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def _fire(
    client, jobs: list[tuple[str, str, dict]], concurrency: int, deadline: float
) -> tuple[list[float], dict[int, int], float, int]:
    """Send ``jobs`` (method, path, httpx kwargs) with at most ``concurrency`` in flight; (latencies,
    statuses, wall, sent)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0

    async def one(method: str, path: str, kw: dict) -> None:
        nonlocal sent
        async with sem:
            if time.time() > deadline:
                return
            sent += 1
            t = time.perf_counter()
            try:
                r = await client.request(method, path, **kw)
                code = r.status_code
            except Exception:  # noqa: BLE001 - a transport error is recorded as status 0
                code = 0
            lat.append(time.perf_counter() - t)
            statuses[code] = statuses.get(code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m, p, kw) for m, p, kw in jobs))
    return lat, statuses, time.perf_counter() - t0, sent


def _score_job(
    rng: random.Random, n: int, policy: str | None, path: str = "/v1/score"
) -> tuple[str, str, dict]:
    body: dict[str, Any] = {"texts": rng.sample(TEXTS, n)}
    if policy:
        body["policy"] = policy
    return ("POST", path, {"json": body})


async def perf(base: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Per endpoint, the cases (no policy / steering / conditional) run in interleaved rounds, so that a
    change of background load hits all of them alike and the overhead ratios stay fair."""
    import httpx

    rng = random.Random(0)
    out: dict[str, Any] = {}
    cases = (None, "steer", "cond")
    rounds = max(1, min(args.rounds, args.requests))
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=120) as client:
        for path in ("/v1/score", "/v1/choice"):
            acc = {c: {"lat": [], "wall": 0.0, "sent": 0, "st": {}} for c in cases}
            for policy in cases:
                await _fire(
                    client,
                    [_score_job(rng, args.texts, policy, path) for _ in range(args.warmup)],
                    args.concurrency,
                    deadline,
                )
            for r in range(rounds):
                n = args.requests // rounds + (1 if r < args.requests % rounds else 0)
                for policy in cases:
                    lat, st, wall, sent = await _fire(
                        client,
                        [_score_job(rng, args.texts, policy, path) for _ in range(n)],
                        args.concurrency,
                        deadline,
                    )
                    a = acc[policy]
                    a["lat"] += lat
                    a["wall"] += wall
                    a["sent"] += sent
                    for k, v in st.items():
                        a["st"][k] = a["st"].get(k, 0) + v
            for policy in cases:
                a = acc[policy]
                name = f"{path} {policy or 'no-policy'}"
                out[name] = {
                    "requests": a["sent"],
                    "statuses": a["st"],
                    "rps": round(a["sent"] / a["wall"], 2) if a["wall"] else None,
                    "texts_per_s": round(a["sent"] * args.texts / a["wall"], 1) if a["wall"] else None,
                    "p50_ms": round(1000 * _pct(a["lat"], 50), 2),
                    "p99_ms": round(1000 * _pct(a["lat"], 99), 2),
                    "mean_ms": round(1000 * statistics.fmean(a["lat"]), 2) if a["lat"] else None,
                }
                print(
                    f"  {name:28s} {out[name]['rps']:>8} req/s  p50 {out[name]['p50_ms']:>8} ms  p99 "
                    f"{out[name]['p99_ms']:>8} ms",
                    file=sys.stderr,
                )
        for path in ("/v1/score", "/v1/choice"):
            base_case = out.get(f"{path} no-policy")
            for policy in ("steer", "cond"):
                case = out.get(f"{path} {policy}")
                if base_case and case and base_case["p50_ms"] and base_case["rps"] and case["rps"]:
                    out[f"{path} overhead {policy}"] = {
                        "p50_ratio": round(case["p50_ms"] / base_case["p50_ms"], 3),
                        "throughput_ratio": round(base_case["rps"] / case["rps"], 3),
                    }
    return out


def _bad_jobs(rng: random.Random) -> list[tuple[str, str, dict]]:
    j = {"content-type": "application/json"}
    return [
        ("POST", "/v1/score", {"content": b'{"texts": ["a"', "headers": j}),
        ("POST", "/v1/score", {"content": b"[1,2,3]", "headers": j}),
        ("POST", "/v1/score", {"json": {"texts": []}}),
        ("POST", "/v1/score", {"json": {"texts": ["x"] * 17}}),
        ("POST", "/v1/score", {"json": {"texts": ["x" * 2001]}}),
        ("POST", "/v1/score", {"json": {"texts": ["a"], "policy": "no-such-policy"}}),
        ("POST", "/v1/score", {"json": {"texts": ["a"], "policy": "steer", "alpha": 1000}}),
        (
            "POST",
            "/v1/score",
            {"content": b'{"texts": ["a"], "policy": "steer", "alpha": NaN}', "headers": j},
        ),
        ("POST", "/v1/choice", {"json": {"texts": ["a"], "prompt_type": "evil"}}),
        ("POST", "/v1/generate", {"json": {"prompts": ["a"], "max_new_tokens": 10_000}}),
        ("POST", "/v1/score", {"content": b"x" * 70_000, "headers": j}),
        ("POST", "/v1/score", {"content": bytes(rng.randrange(256) for _ in range(64)), "headers": j}),
        ("PUT", "/v1/policies/bad", {"json": {"directions": ["nope"]}}),
        ("PUT", "/v1/policies/bad", {"json": {"directions": ["harm"], "alpha": 1e6}}),
        ("PUT", "/v1/policies/bad%20name", {"json": {"directions": ["harm"]}}),
        ("DELETE", "/v1/policies/never-existed", {}),
        ("GET", "/v1/nothing-here", {}),
        ("PATCH", "/v1/score", {"json": {}}),
    ]


def _good_jobs(rng: random.Random, i: int) -> list[tuple[str, str, dict]]:
    return [
        _score_job(rng, rng.randint(1, 4), rng.choice([None, "steer", "cond"])),
        _score_job(rng, rng.randint(1, 4), rng.choice([None, "steer"]), "/v1/choice"),
        (
            "POST",
            "/v1/generate",
            {
                "json": {
                    "prompts": rng.sample(TEXTS, 1),
                    "max_new_tokens": 2,
                    "policy": rng.choice([None, "steer"]),
                }
            },
        ),
        ("PUT", f"/v1/policies/churn{i % 3}", {"json": {"directions": ["tox"], "alpha": rng.uniform(-5, 5)}}),
        ("GET", "/v1/policies", {}),
        ("GET", "/healthz", {}),
        ("GET", "/metrics", {}),
    ]


async def soak(base: str, args: argparse.Namespace, deadline: float, pid: int, key: str) -> dict[str, Any]:
    import httpx
    import psutil

    proc = psutil.Process(pid)
    rng = random.Random(1)
    bad = _bad_jobs(rng)
    statuses: dict[int, int] = {}
    rss: list[tuple[int, float]] = []
    lat_all: list[float] = []
    sent_total = 0
    block = 500
    n_good = n_bad = 0
    # the key goes with every request: the policy writes need it, everything else ignores it
    async with httpx.AsyncClient(
        base_url=base, trust_env=False, timeout=120, headers={"X-API-Key": key}
    ) as client:
        while sent_total < args.soak_requests and time.time() < deadline:
            jobs = []
            for i in range(min(block, args.soak_requests - sent_total)):
                if rng.random() < 0.5:
                    good = _good_jobs(rng, sent_total + i)
                    # weights: mostly score/choice, some generate, few writes and status reads
                    jobs.append(rng.choices(good, weights=[40, 25, 5, 3, 9, 9, 9])[0])
                    n_good += 1
                else:
                    jobs.append(rng.choice(bad))
                    n_bad += 1
            lat, st, _, sent = await _fire(client, jobs, args.concurrency, deadline)
            lat_all += lat
            sent_total += sent
            for k, v in st.items():
                statuses[k] = statuses.get(k, 0) + v
            rss.append((sent_total, proc.memory_info().rss / 2**20))
            print(
                f"  soak {sent_total:>6} requests, RSS {rss[-1][1]:.1f} MiB, 5xx so far "
                f"{sum(v for k, v in statuses.items() if k >= 500)}",
                file=sys.stderr,
            )
    warm = [m for n, m in rss if n >= min(2000, args.soak_requests // 5)] or [m for _, m in rss]
    n5 = sum(v for k, v in statuses.items() if k >= 500 or k == 0)
    growth = (warm[-1] - warm[0]) if warm else float("nan")
    return {
        "requests": sent_total,
        "good": n_good,
        "bad": n_bad,
        "statuses": dict(sorted(statuses.items())),
        "n_5xx_or_transport_errors": n5,
        "p50_ms": round(1000 * _pct(lat_all, 50), 2),
        "p99_ms": round(1000 * _pct(lat_all, 99), 2),
        "rss_mib": {
            "first": round(rss[0][1], 1) if rss else None,
            "after_warmup": round(warm[0], 1) if warm else None,
            "last": round(rss[-1][1], 1) if rss else None,
            "max": round(max(m for _, m in rss), 1) if rss else None,
            "growth_after_warmup": round(growth, 1),
            "samples": [(n, round(m, 1)) for n, m in rss],
        },
        "zero_5xx": n5 == 0,
        "memory_stable": bool(growth < args.max_rss_growth_mib),
    }


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import psutil

    port = _free_port()
    key = "bench-key"
    cmd = [
        sys.executable,
        "-m",
        "safesteer.bench.serve_load",
        "--_serve",
        "--port",
        str(port),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--batch-window-ms",
        str(args.batch_window_ms),
        "--api-key",
        key,
    ]
    started = time.time()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {
        "model": args.model,
        "concurrency": args.concurrency,
        "texts_per_request": args.texts,
        "threads": args.threads,
        "batch_window_ms": args.batch_window_ms,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    try:
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as c:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
                if time.time() - started > 300:
                    raise SystemExit("server did not start within 300 s")
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.25)
            report["startup_s"] = round(time.time() - started, 1)
            h = {"X-API-Key": key}
            health = (await c.get("/healthz")).json()
            layer = health["n_layers"] // 2
            r1 = await c.put("/v1/policies/steer", json={"directions": ["harm"], "alpha": 8.0}, headers=h)
            r2 = await c.put(
                "/v1/policies/cond",
                json={"directions": ["harm"], "alpha": 8.0, "condition": {"probe": "harm", "threshold": 0.5}},
                headers=h,
            )
            assert r1.status_code == 201 and r2.status_code == 201, (r1.text, r2.text)
            report["policy_layer"] = layer
        deadline = started + args.max_seconds
        proc = psutil.Process(server.pid)
        report["server_rss_mib_start"] = round(proc.memory_info().rss / 2**20, 1)
        if args.mode in ("perf", "both"):
            print("perf:", file=sys.stderr)
            report["perf"] = await perf(base, args, deadline)
        if args.mode in ("soak", "both"):
            print("soak:", file=sys.stderr)
            report["soak"] = await soak(base, args, deadline, server.pid, key)
        report["wall_s"] = round(time.time() - started, 1)
        report["timed_out"] = time.time() > deadline
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="tiny",
        help="tiny (random Llama, default) or smollm2-135m (or any safesteer model name)",
    )
    ap.add_argument("--mode", choices=("perf", "soak", "both"), default="both")
    ap.add_argument("--requests", type=int, default=200, help="requests per perf case")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured requests before each perf case")
    ap.add_argument("--rounds", type=int, default=5, help="perf: interleaved rounds over the cases")
    ap.add_argument("--texts", type=int, default=4, help="texts per perf request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument(
        "--max-rss-growth-mib", type=float, default=50.0, help="soak: allowed RSS growth after warm-up"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--batch-window-ms", type=float, default=0.0, help="server-side coalescing window")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="bound on the whole run")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    ap.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        serve(args)
        return 0
    for name in ("requests", "soak_requests", "concurrency", "texts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.texts > 16:
        ap.error("--texts must be <= 16 (the server's limit in this bench)")
    report = asyncio.run(client_main(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    soak_r = report.get("soak")
    if soak_r and not (soak_r["zero_5xx"] and soak_r["memory_stable"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
