"""Steered-evaluation benchmark: full forward passes vs :meth:`Backbone.prefix_cache`.

A steering evaluation scores the same items once unsteered and then once per (strategy, α, random
member). Steering at block ``L`` cannot change blocks ``0..L``, so safesteer runs them once per
batch and starts every steered pass from the recorded block-``L`` output.

Workload (both arms identical): forced-choice P(Yes) on harmful prompts and per-token fluency on
WikiText, unsteered + ``--directions`` random unit directions at α = ±0.25 × the median token
norm. Checks the two arms agree to 1e-5, prints seconds and the ratio. Last line:
``steer-eval speedup: <r>x``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(prog="safesteer bench steer-eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from safesteer.data import load
    from safesteer.evaluate.choice import forced_choice
    from safesteer.evaluate.fluency import fluency, wiki_passages
    from safesteer.evaluate.suite import reference_norm
    from safesteer.models import load_backbone
    from safesteer.steering.strategies import Intervention

    bb = load_backbone(args.model)
    half = args.prompts // 2
    prompts = [
        r.text
        for name in ("advbench", "donotanswer")
        for r in load(name, split="test", max_rows=half, seed=args.seed, data_dir=args.data_dir)
    ]
    wiki = wiki_passages(
        (r.text for r in load("wikipedia", split="test", data_dir=args.data_dir)), limit=args.prompts
    )
    scale = reference_norm(bb, args.layer, wiki)
    rng = np.random.default_rng(args.seed)
    ivs: list[Intervention | None] = [None]
    for _ in range(args.directions):
        v = rng.standard_normal(bb.d_model).astype(np.float32)
        v /= np.linalg.norm(v)
        for a in (-0.25, 0.25):
            ivs.append(Intervention("random", args.layer, vector=v, alpha=a * scale))

    def workload():
        return [forced_choice(bb, prompts, "harmful", iv) for iv in ivs] + [
            fluency(bb, wiki, iv).per_token for iv in ivs
        ]

    t0 = time.perf_counter()
    full = workload()
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    with bb.prefix_cache(args.layer) as pc:
        cached = workload()
    t_cached = time.perf_counter() - t0
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(full, cached))
    if err > 1e-5:
        raise SystemExit(f"prefix-cached scores differ from full passes by {err:.2e}")
    print(
        f"model {args.model}, layer {args.layer} of {bb.n_layers}: {len(prompts)} prompts + "
        f"{len(wiki)} passages, 1 unsteered + {len(ivs) - 1} steered passes each"
    )
    print(f"full passes:   {t_full:7.1f} s")
    print(
        f"prefix cache:  {t_cached:7.1f} s  ({pc.hits} cached batches, {pc.misses} recorded; max "
        f"|diff| {err:.1e})"
    )
    ratio = t_full / t_cached
    print(f"steer-eval speedup: {ratio:.2f}x")
    return ratio
