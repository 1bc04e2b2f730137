"""Extraction benchmark: a naive Hugging Face loop vs safesteer's extractor on the same texts.

(a) naive: the HF model in fp32, ``output_hidden_states=True``, full forward (LM head included),
    batch 32 in the original order, padding to the longest text of each batch;
(b) safesteer: :class:`safesteer.extract.Extractor` (length bucketing, forward stopped at the
    layer, bf16 autocast only where the CPU supports it and cosine ≥ 0.999, inference mode).
Both on the same 2,000 real texts. Prints tokens/s, the ratio, and the share of the compute floor
(FLOPs up to layer L ÷ the matmul peak measured in this run). Last line: ``extract speedup: <r>x``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
import torch

from safesteer.bench.common import linear_params, matmul_peak_gflops
from safesteer.models.positions import masked_mean


def bench_texts(n: int = 2000, seed: int = 0, data_dir=None) -> list[str]:
    """A fixed mix of real texts: GoEmotions comments, AdvBench requests, WikiText sentences."""
    from safesteer.data import load

    n_go, n_adv = n * 9 // 20, n * 4 // 20
    go = [r.text for r in load("go_emotions", split="train", max_rows=n_go, seed=seed, data_dir=data_dir)]
    adv = [r.text for r in load("advbench", split="all", max_rows=n_adv, seed=seed, data_dir=data_dir)]
    wiki: list[str] = []
    for rec in load("wikipedia", split="all", data_dir=data_dir):
        for sent in re.split(r"(?<=[.!?])\s+", rec.text):
            if len(sent.split()) >= 5 and not sent.strip().startswith("="):
                wiki.append(sent.strip())
    rng = np.random.default_rng(seed)
    need = n - len(go) - len(adv)
    wiki = [wiki[i] for i in sorted(rng.choice(len(wiki), size=min(need, len(wiki)), replace=False))]
    texts = go + adv + wiki
    order = rng.permutation(len(texts))  # a realistic mixed stream
    return [texts[i] for i in order]


def naive_run(bb, texts: list[str], layer: int, batch_size: int = 32) -> tuple[np.ndarray, int]:
    model, tok = bb.model, bb.tokenizer
    out, tokens = [], 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=bb.max_length,
                return_tensors="pt",
            )
            hs = model(**enc, output_hidden_states=True).hidden_states[layer + 1]
            out.append(masked_mean(hs, enc["attention_mask"]).numpy())
            tokens += int(enc["attention_mask"].sum())
    return np.concatenate(out), tokens


def floor_seconds(bb, layer: int, lengths: list[int], peak_gflops: float) -> float:
    """Compute floor: dense FLOPs of blocks 0..layer (linear layers + attention scores) ÷ peak."""
    lin = linear_params(list(bb.layers[: layer + 1]))
    tokens = sum(lengths)
    attn = sum(2 * 2 * n * n * bb.d_model for n in lengths) * (layer + 1)
    if bb.kind == "causal":
        attn //= 2
    return (2 * lin * tokens + attn) / (peak_gflops * 1e9)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safesteer.extract import Extractor, choose_precision
    from safesteer.models import load_backbone

    bb = load_backbone(args.model)
    texts = bench_texts(args.n, data_dir=args.data_dir)
    lengths = [len(x) for x in bb.tokenizer(texts, truncation=True, max_length=bb.max_length)["input_ids"]]
    print(
        f"{len(texts)} texts, {sum(lengths)} tokens (mean {np.mean(lengths):.1f}, max {max(lengths)}), "
        f"model {args.model}, layer {args.layer}, threads {torch.get_num_threads()}"
    )

    t = time.perf_counter()
    ref, tokens = naive_run(bb, texts, args.layer)
    t_naive = time.perf_counter() - t
    precision, cos = choose_precision(bb, [args.layer], texts, "auto")
    ex = Extractor(bb, [args.layer], batch_size=args.batch_size, precision=precision)
    t = time.perf_counter()
    ours = ex.run(texts)[args.layer]
    t_ours = time.perf_counter() - t
    agree = float(
        np.min(np.sum(ref * ours, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(ours, axis=1)))
    )

    peak = matmul_peak_gflops(torch.bfloat16 if precision == "bf16" else torch.float32)
    floor = floor_seconds(bb, args.layer, lengths, peak)
    print(f"naive     : {tokens / t_naive:9.1f} tokens/s  ({t_naive:.1f} s)")
    print(
        f"safesteer : {tokens / t_ours:9.1f} tokens/s  ({t_ours:.1f} s, precision {precision}"
        + (f", bf16 cosine {cos:.5f}" if cos else "")
        + ")"
    )
    print(f"min cosine safesteer vs naive pooled vectors: {agree:.6f}")
    print(
        f"matmul peak ({'bf16' if precision == 'bf16' else 'fp32'}) {peak:.1f} GFLOP/s; compute floor "
        f"{floor:.1f} s; "
        f"safesteer at {100 * floor / t_ours:.1f}% of the floor, naive at {100 * floor / t_naive:.1f}%"
    )
    ratio = t_naive / t_ours
    print(f"extract speedup: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
