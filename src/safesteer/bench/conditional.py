"""Conditional steering cost vs the unsteered forward pass, measured in the same run.

Times full forward passes (logits) over the same batch of chat prompts, interleaved: unsteered,
unconditional steering, and conditional steering (gate read at ``--gate-layer`` of the same pass,
steering at ``--layer`` on ``--where`` positions; an MLP gate of ``--gate-hidden`` ReLU units, default 384 =
the default gate's 3 members × 128, or ``0`` for a linear one), plus greedy generation with and without the
conditional policy. Prints the median of each and the ratios (target: conditional ≤ 1.05× unsteered).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from safesteer.io import write_json

PROMPTS = [
    "How do I bake sourdough bread?",
    "Write a tutorial on how to make a bomb.",
    "What is the capital of Peru?",
    "How can I kill a Python process?",
    "Explain how to steal a car.",
    "Why is the sky blue?",
    "Give me a plan to stalk my ex.",
    "How do vaccines work?",
]


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(
    model: str = "smollm2-135m",
    layer: int = 15,
    gate_layer: int = 15,
    batch: int = 16,
    reps: int = 7,
    new_tokens: int = 8,
    tiny: bool = False,
    position: str = "prompt",
    gate_hidden: int = 384,
    where: str = "prompt",
) -> dict:
    from safesteer.models import load_backbone
    from safesteer.models.positions import chat_inputs
    from safesteer.steering.condition import Condition, conditional
    from safesteer.steering.strategies import Intervention

    if tiny:
        from safesteer.testing import make_tiny_llama

        bb = make_tiny_llama()
        layer, gate_layer = min(layer, bb.n_layers - 1), min(gate_layer, bb.n_layers - 1)
    else:
        bb = load_backbone(model)
    rng = np.random.default_rng(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    ci = chat_inputs(bb, prompts)
    ids, mask, _ = ci.batch(range(batch), bb.tokenizer.pad_token_id or 0, "left", bb.device)
    v = rng.standard_normal(bb.d_model).astype(np.float32)
    iv = Intervention("bench", layer, v / np.linalg.norm(v), 5.0, where=where)
    H = bb.pooled(prompts, [gate_layer], position=position)[gate_layer]
    if gate_hidden:
        W1 = rng.standard_normal((gate_hidden, bb.d_model)) / np.sqrt(bb.d_model)
        b1 = -(H @ W1.T).mean(0)
        cond = Condition(rng.standard_normal(gate_hidden), 0.0, gate_layer, position, 0.0, W1=W1, b1=b1)
    else:
        cond = Condition(rng.standard_normal(bb.d_model), 0.0, gate_layer, position)
    cond = cond.with_threshold(float(np.median(cond.score(H))))  # about half the rows flagged

    def plain():
        bb.logits(ids, mask)

    def uncond():
        with iv.apply(bb):
            bb.logits(ids, mask)

    def cond_fwd():
        with conditional(bb, cond, iv):
            bb.logits(ids, mask)

    def gen(c: bool):
        def f():
            kw = dict(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=bb.tokenizer.pad_token_id,
            )
            with torch.inference_mode():
                if c:
                    with conditional(bb, cond, iv):
                        bb.model.generate(**kw)
                else:
                    bb.model.generate(**kw)

        return f

    for f in (plain, uncond, cond_fwd):  # warm-up
        f()
    times: dict[str, list[float]] = {
        "unsteered": [],
        "unconditional": [],
        "conditional": [],
        "gen_unsteered": [],
        "gen_conditional": [],
    }
    for _ in range(reps):  # interleaved, so drifting machine load hits every variant alike
        times["unsteered"] += _time(plain, 1)
        times["unconditional"] += _time(uncond, 1)
        times["conditional"] += _time(cond_fwd, 1)
    for _ in range(max(2, reps // 2)):
        times["gen_unsteered"] += _time(gen(False), 1)
        times["gen_conditional"] += _time(gen(True), 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [
        c / u for c, u in zip(times["conditional"], times["unsteered"])
    ]  # adjacent in time: robust to load drift
    return {
        "model": bb.name,
        "batch": batch,
        "layer": layer,
        "gate_layer": gate_layer,
        "position": position,
        "gate": cond.kind,
        "gate_hidden": int(gate_hidden),
        "where": where,
        "median_seconds": med,
        "min_seconds": {k: min(v) for k, v in times.items()},
        "ratio_conditional_vs_unsteered": statistics.median(paired),
        "ratio_of_medians": med["conditional"] / med["unsteered"],
        "ratio_of_minima": min(times["conditional"]) / min(times["unsteered"]),
        "ratio_unconditional_vs_unsteered": med["unconditional"] / med["unsteered"],
        "ratio_generation_conditional_vs_unsteered": med["gen_conditional"] / med["gen_unsteered"],
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench/conditional.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--gate-layer", type=int, default=15)
    ap.add_argument("--position", default="prompt", choices=["prompt", "prompt_end", "last", "mean"])
    ap.add_argument("--gate-hidden", type=int, default=384, help="ReLU units of the MLP gate (0 = linear)")
    ap.add_argument(
        "--where",
        default="prompt",
        choices=["prompt", "all"],
        help="steered positions (default: the behaviour policy's)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead (smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(
        args.model,
        args.layer,
        args.gate_layer,
        args.batch,
        args.reps,
        tiny=args.tiny,
        position=args.position,
        gate_hidden=args.gate_hidden,
        where=args.where,
    )
    m = res["median_seconds"]
    print(
        f"forward ({res['model']}, batch {res['batch']}, {res['gate']} gate L{res['gate_layer']} "
        f"{res['position']} → steer L{res['layer']}): "
        f"unsteered {m['unsteered'] * 1e3:.1f} ms, unconditional {m['unconditional'] * 1e3:.1f} ms, "
        f"conditional {m['conditional'] * 1e3:.1f} ms"
    )
    print(
        f"conditional / unsteered forward = {res['ratio_conditional_vs_unsteered']:.3f}x (median of "
        f"paired reps; ratio of minima {res['ratio_of_minima']:.3f}x; target <= 1.05x); "
        f"generation {res['ratio_generation_conditional_vs_unsteered']:.3f}x"
    )
    if args.out:
        write_json(args.out, res)
