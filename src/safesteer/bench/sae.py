"""Gated SAE training-step benchmark: a textbook fp32 PyTorch step vs safesteer's trainer.

Usage: ``python bench/sae.py [--acts DIR] [--steps 12] [--batch-size 1024] ...`` (``main(argv)`` is
what ``safesteer bench sae`` calls).

Both arms train the same Gated SAE (d_in = 576 unless ``--acts`` says otherwise, 32x expansion,
paper variant, lambda, lr, Adam(0, 0.999), constrained decoder) on the same batches, step for step:

* **textbook**: the loss written plainly with autograd (one shared encoder matmul as in
  dictionary_learning's ``gdm.py``, decoder and aux decoder as dense matmuls with a detached
  decoder for the aux path), ``loss.backward()``, ``torch.optim.Adam`` with the decoder-gradient
  projection and row renormalisation -- all fp32;
* **safesteer**: :meth:`safesteer.sae.trainer.Trainer.train_step` (hand-fused forward/backward,
  CSR products on the gate support once the gate is sparse, bf16 matmuls only where the
  hardware has native bf16).

Protocol: one initial state (scale, geometric-median ``b_dec``, random unit decoder) is shared.
A short *cold* phase times ``--cold-steps`` steps of each arm from that initial state (the first
steps of a run, where about half the latents are open). Then safesteer's trainer runs
``--warmup-steps`` untimed steps (of ``--warmup-batch-size`` rows) to reach the sparse regime in which a real
run spends >99% of its steps (L0 falls from ~d_sae/2 to a few hundred within ~20 steps here); that state --
weights and Adam moments -- is copied into both arms, and ``--steps`` steps of each arm are timed,
interleaved step by step so that load from other processes hits both alike. Quality: FVU and L0
of both arms on held-out rows after the timed steps. The fp32 matmul peak is measured in the same
run. The last line is ``sae speedup: <steady-state ratio>x``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from safesteer.sae.config import TrainConfig
from safesteer.sae.gated import PARAM_NAMES, flops_textbook_step
from safesteer.sae.trainer import Trainer


# ----------------------------------------------------------------------------------- data
def synthetic_batches(
    n_batches: int, batch: int, d: int, seed: int = 0, atoms: int = 4096, k: int = 24
) -> list[np.ndarray]:
    """A fixed sparse-dictionary dataset: ``k`` of ``atoms`` unit atoms per row (Zipf-like
    frequencies, exponential magnitudes) + a constant offset + small isotropic noise."""
    g = np.random.default_rng(seed)
    D = g.normal(size=(atoms, d)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, atoms + 1) ** 0.6
    p /= p.sum()
    offset = g.normal(size=d).astype(np.float32) * 0.5
    out = []
    for _ in range(n_batches):
        idx = g.choice(atoms, size=(batch, k), p=p)
        mag = g.exponential(1.0, size=(batch, k)).astype(np.float32)
        X = np.einsum("bk,bkd->bd", mag, D[idx], optimize=True).astype(np.float32)
        out.append(X + offset + g.normal(size=(batch, d)).astype(np.float32) * 0.05)
    return out


def store_batches(
    path: str, n_batches: int, batch: int, eval_rows: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    from safesteer.store import ActivationStore

    store = ActivationStore(path)
    train: list[np.ndarray] = []
    for b in store.iter_batches(
        batch,
        split="train",
        shuffle_buffer=max(4 * batch, 65536),
        seed=seed,
        with_labels=False,
        drop_last=True,
    ):
        train.append(np.ascontiguousarray(b.H, dtype=np.float32))
        if len(train) >= n_batches:
            break
    if not train:
        raise SystemExit(f"{path}: fewer than {batch} training rows")
    while len(train) < n_batches:  # cycle a small store
        train.append(train[len(train) % max(1, len(train))])
    ev = []
    have = 0
    for b in store.iter_batches(4096, split="val", with_labels=False):
        ev.append(b.H)
        have += len(b.H)
        if have >= eval_rows:
            break
    evX = np.concatenate(ev)[:eval_rows] if ev else train[-1]
    return train, evX


# ----------------------------------------------------------------------------------- textbook arm
class TextbookGatedSAE(nn.Module):
    """The Gated SAE loss written plainly (fp32, autograd)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        for n in PARAM_NAMES:
            setattr(self, n, nn.Parameter(params[n].detach().clone().contiguous()))

    def loss(self, x: torch.Tensor, l1: float) -> torch.Tensor:
        x_tilde = x - self.b_dec
        pre = x_tilde @ self.W_enc
        pi_gate = pre + self.b_gate
        f_gate = (pi_gate > 0).float()
        f_mag = torch.relu(pre * torch.exp(self.r_mag) + self.b_mag)
        f = f_gate * f_mag
        x_hat = f @ self.W_dec + self.b_dec
        gate_act = torch.relu(pi_gate)
        x_hat_aux = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        recon = (x - x_hat).pow(2).sum(-1).mean()
        sparsity = gate_act.sum(-1).mean()
        aux = (x - x_hat_aux).pow(2).sum(-1).mean()
        return recon + l1 * sparsity + aux


class TextbookTrainer:
    def __init__(
        self,
        params: dict[str, torch.Tensor],
        adam_v: dict[str, torch.Tensor],
        step: int,
        lr: float,
        l1: float,
    ):
        self.model = TextbookGatedSAE(params)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        self.l1 = l1
        for n in PARAM_NAMES:  # continue from the same optimiser state
            p = getattr(self.model, n)
            self.opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": adam_v[n].detach().clone().contiguous() if n in adam_v else torch.zeros_like(p),
            }

    def step(self, x: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(x, self.l1)
        loss.backward()
        W = self.model.W_dec
        with torch.no_grad():
            W.grad -= (W.grad * W).sum(1, keepdim=True) * W
        self.opt.step()
        with torch.no_grad():
            W /= W.norm(dim=1, keepdim=True)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.model, n).detach() for n in PARAM_NAMES}


# ----------------------------------------------------------------------------------- helpers
@torch.no_grad()
def quality(p: dict[str, torch.Tensor], X: torch.Tensor) -> tuple[float, float]:
    """(FVU, L0) of parameters ``p`` on rows ``X`` (already scaled)."""
    se = 0.0
    nnz = 0
    for s in range(0, X.shape[0], 2048):
        x = X[s : s + 2048]
        pre = (x - p["b_dec"]) @ p["W_enc"]
        f = ((pre + p["b_gate"]) > 0) * torch.relu(pre * torch.exp(p["r_mag"]) + p["b_mag"])
        se += float((x - (f @ p["W_dec"] + p["b_dec"])).double().pow(2).sum())
        nnz += int((f > 0).sum())
    var = float((X.double() - X.double().mean(0)).pow(2).sum())
    return se / var, nnz / X.shape[0]


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peak(n: int = 1024, seconds: float = 1.5) -> float:
    try:
        from safesteer.bench.common import matmul_peak_gflops

        return matmul_peak_gflops(torch.float32, n=n, seconds=seconds)
    except ImportError:  # pragma: no cover - standalone use
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        c, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            c += 1
        return 2 * n**3 * c / (time.perf_counter() - t0) / 1e9


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="safesteer bench sae", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--acts", default=None, help="activation store (layer folder); default: a fixed synthetic dataset"
    )
    ap.add_argument("--d", type=int, default=576, help="width of the synthetic activations")
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm (steady state)")
    ap.add_argument("--cold-steps", type=int, default=2, help="timed steps per arm from the initial state")
    ap.add_argument(
        "--warmup-steps", type=int, default=80, help="untimed shared steps before the steady-state phase"
    )
    ap.add_argument(
        "--warmup-batch-size",
        type=int,
        default=256,
        help="batch of the untimed warm-up (it only makes the start state)",
    )
    ap.add_argument("--l1", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="safesteer arm's matmul precision",
    )
    ap.add_argument("--eval-rows", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    wb = max(1, args.batch_size // max(1, args.warmup_batch_size))  # warm-up batches per full batch
    n_batches = args.cold_steps + -(-args.warmup_steps // wb) + args.steps
    if args.acts:
        batches, evX = store_batches(args.acts, n_batches, args.batch_size, args.eval_rows, args.seed)
        source = f"activations from {args.acts}"
    else:
        batches = synthetic_batches(
            n_batches + max(1, math.ceil(args.eval_rows / args.batch_size)),
            args.batch_size,
            args.d,
            args.seed,
        )
        evX = np.concatenate(batches[n_batches:])[: args.eval_rows]
        batches = batches[:n_batches]
        source = "synthetic sparse-dictionary activations (4096 atoms, 24 per row)"
    d = batches[0].shape[1]
    S = d * args.expansion
    B = args.batch_size
    cfg = TrainConfig(
        expansion=args.expansion,
        l1=args.l1,
        lr=args.lr,
        lr_warmup_steps=10,
        batch_size=B,
        epochs=1,
        init_rows=min(4096, B * len(batches)),
        precision=args.precision,
        seed=args.seed,
    )
    ours = Trainer(cfg, d)
    ours._init_from_data(lambda e, s: iter(batches))
    c = ours.scale
    X = [torch.from_numpy(b) * c for b in batches]
    evT = torch.from_numpy(np.asarray(evX, dtype=np.float32)) * c
    print(
        f"sae bench: {source}; d_in={d}, d_sae={S} ({args.expansion}x), batch {B}, lambda {args.l1}, "
        f"lr {args.lr}, "
        f"threads {args.threads}, safesteer precision {ours.precision}, sparse threshold "
        f"{ours.sparse_threshold}"
    )
    peak0 = matmul_peak()
    flops = flops_textbook_step(B, d, S)

    # ---- cold: both arms from the initial state
    init_state = {n: t.clone() for n, t in ours.params.items()}
    t_cold_text = t_cold_ours = 0.0
    if args.cold_steps:
        text = TextbookTrainer(init_state, {}, 0, args.lr, args.l1)
        for i in range(args.cold_steps):
            text.opt.param_groups[0]["lr"] = args.lr * min(1.0, (i + 1) / 10)
            t_cold_text += timed(lambda i=i: text.step(X[i]))
            t_cold_ours += timed(lambda i=i: ours.train_step(X[i]))
        print(
            f"cold (first {args.cold_steps} steps from init, L0 ~ d_sae/2): textbook "
            f"{args.cold_steps * B / t_cold_text:.0f} samples/s, "
            f"safesteer {args.cold_steps * B / t_cold_ours:.0f} samples/s, ratio "
            f"{t_cold_text / t_cold_ours:.2f}x"
        )

    # ---- warm-up (untimed), then both arms from the same state
    t_w = time.perf_counter()
    warm = [
        w for b in X[args.cold_steps : n_batches - args.steps] for w in torch.split(b, args.warmup_batch_size)
    ]
    for i in range(args.warmup_steps):
        info = ours.train_step(warm[i % len(warm)])
    start = n_batches - args.steps
    if args.warmup_steps:
        print(
            f"warm-up: {args.warmup_steps} untimed safesteer steps of {args.warmup_batch_size} rows in "
            f"{time.perf_counter() - t_w:.0f}s; "
            f"now L0 {info['l0']:.0f}, gate density {100 * info['density']:.2f}%, batch FVU {info['fvu']:.4f}"
        )
    state = {n: t.clone() for n, t in ours.params.items()}
    text = TextbookTrainer(state, ours.adam_v, ours.step, args.lr, args.l1)
    t_text = t_ours = 0.0
    paths: list[str] = []
    for i in range(start, start + args.steps):
        text.opt.param_groups[0]["lr"] = ours._lr()
        t_text += timed(lambda i=i: text.step(X[i]))
        t_ours += timed(lambda i=i: paths.append(ours.train_step(X[i])["path"]))
    peak1 = matmul_peak()
    peak = 0.5 * (peak0 + peak1)

    fvu_t, l0_t = quality(text.params(), evT)
    fvu_o, l0_o = quality(ours.params, evT)
    n = args.steps * B
    rate_t, rate_o = n / t_text, n / t_ours
    gf_t = flops * args.steps / t_text / 1e9
    gf_o = flops * args.steps / t_ours / 1e9
    ratio = t_text / t_ours
    print(f"fp32 matmul peak (measured, 1024^3): {peak:.1f} GFLOP/s (before {peak0:.1f}, after {peak1:.1f})")
    print(
        f"textbook : {rate_t:8.1f} samples/s  {t_text / args.steps:.3f} s/step  {gf_t:6.1f} GFLOP/s = "
        f"{100 * gf_t / peak:5.1f}% of peak  | FVU {fvu_t:.5f}  L0 {l0_t:.1f}"
    )
    print(
        f"safesteer: {rate_o:8.1f} samples/s  {t_ours / args.steps:.3f} s/step  {gf_o:6.1f} GFLOP/s "
        "dense-equivalent = "
        f"{100 * gf_o / peak:5.1f}% of peak  | FVU {fvu_o:.5f}  L0 {l0_o:.1f}  (paths: "
        f"{', '.join(sorted(set(paths)))})"
    )
    dfvu = abs(fvu_o - fvu_t) / max(fvu_t, 1e-12)
    dl0 = abs(l0_o - l0_t) / max(l0_t, 1e-12)
    ok = dfvu <= 0.05 and dl0 <= 0.10
    print(
        f"quality: FVU differs by {100 * dfvu:.2f}% (limit 5%), L0 by {100 * dl0:.2f}% (limit 10%): "
        f"{'ok' if ok else 'OUT OF BOUNDS'}"
    )
    print(f"steady-state ratio {ratio:.2f}x over {args.steps} interleaved steps (target >= 2x)")
    print(f"sae speedup: {ratio:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
