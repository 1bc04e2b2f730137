"""Body of one torchrun rank for tests/test_distributed.py (tiny seeded Llama, synthetic labelled corpus).

``python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py <mode> <root>``

* ``all``: extraction -> SAE training (20 steps) -> encode + map with a fixed SAE, all distributed;
* ``kill``: extraction where rank 1 SIGKILLs itself right after committing its second shard.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

N_ROWS = 480
TOXIC = "hate cruel stupid idiot kill enemy bad".split()
NICE = "love kind happy friend good calm nice".split()
FILL = "how can i help the dog cat school book".split()


def corpus(n: int = N_ROWS):
    """(dataset, Record) pairs: ToxiGen-like toxic / neutral rows, a few empty texts."""
    from safesteer.data.records import Record

    rng = random.Random(7)
    for i in range(n):
        toxic = i % 2
        k = rng.randint(0, 12)
        words = [rng.choice(TOXIC if toxic else NICE) for _ in range(k)] + [
            rng.choice(FILL) for _ in range(rng.randint(0, 4))
        ]
        text = " ".join(words) if i % 97 else ""
        yield "toxigen", Record(f"tg:{i}", text, "train" if i % 5 else "test", {"toxic": toxic}, "local")


def extract_cfg():
    from safesteer.extract import ExtractConfig

    return ExtractConfig(
        model="tiny-llama",
        datasets=["toxigen"],
        layers=[1, 2],
        shard_size=60,
        dtype="float32",
        batch_size=16,
        precision="fp32",
    )


def train_cfg():
    from safesteer.sae.config import TrainConfig

    return TrainConfig(
        expansion=4,
        l1=1e-3,
        lr=1e-3,
        lr_warmup_steps=5,
        batch_size=47,
        epochs=50,
        patience=50,
        max_steps=20,
        init_rows=200,
        precision="fp32",
        seed=3,
    )


def batches_of(store, batch_size: int, seed: int = 3):
    """The train-sae batch stream over an activation store (as ``safesteer train-sae`` builds it)."""

    def batches(epoch: int, split: str):
        return store.iter_batches(
            batch_size,
            split=split,
            val_fraction=0.1,
            shuffle_buffer=100 if split == "train" else 0,
            seed=seed,
            epoch=epoch,
            with_labels=False,
        )

    return batches


def grad_check(store, dist, root: Path) -> None:
    """The all-reduced gradient of this rank's slice vs the gradient of the whole (uneven: 47-row) batch."""
    import json

    import torch

    from safesteer.sae import GatedSAE, SAEConfig
    from safesteer.sae.distributed import GradientAllReduce
    from safesteer.sae.gated import PARAM_NAMES, enc_layout, loss_and_grads

    sae = GatedSAE(SAEConfig(d_in=store.d, d_sae=4 * store.d), seed=11)
    p = {n: getattr(sae, n).detach().clone().double().contiguous() for n in PARAM_NAMES}
    p["W_enc"] = enc_layout(p["W_enc"])
    x = torch.from_numpy(next(iter(batches_of(store, 47)(0, "train"))).H).double()
    hook = GradientAllReduce(dist)
    lo, hi, hook.weight = hook.slice_rows(x.shape[0])
    full, _ = loss_and_grads(p, x, 1e-3, "paper")
    part, _ = loss_and_grads(p, x[lo:hi], 1e-3, "paper")
    part = {n: g.clone() for n, g in part.items()}
    hook.reduce_grads(part)
    err = max(float((part[n] - full[n]).abs().max() / (full[n].abs().max() + 1e-30)) for n in full)
    (root / f"grad-check-rank{dist.rank}.json").write_text(
        json.dumps({"rel_err": err, "rows": [lo, hi, x.shape[0]]})
    )


CLI_SAE_ARGS = [
    "--grid",
    "--grid-expansions",
    "2,3",
    "--grid-l1",
    "1e-3",
    "--grid-epochs",
    "1",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--val-fraction",
    "0.1",
    "--lr-warmup",
    "2",
    "--precision",
    "fp32",
    "--no-progress",
]
MAP_KW = dict(heldout=0.2, min_per_class=3, top_k=5)


def main(mode: str, root: Path) -> None:
    import faulthandler

    import torch

    # a hung rank prints where it hangs and exits, instead of holding the test until its timeout
    faulthandler.dump_traceback_later(float(os.environ.get("DIST_WORKER_DUMP_S", "200")), exit=True)

    from safesteer.distributed import from_env
    from safesteer.extract.distributed import run_extract
    from safesteer.testing import make_tiny_llama

    torch.set_num_threads(1)
    dist = from_env("cpu")
    bb = make_tiny_llama()
    if mode == "kill":
        if dist.rank == 1:
            import safesteer.store.commits as commits

            original, count = commits.write_commit, [0]

            def write_then_die(*a, **kw):
                original(*a, **kw)
                count[0] += 1
                if count[0] == 2:  # two layers per shard: the first shard's second layer committed
                    os.kill(os.getpid(), signal.SIGKILL)

            commits.write_commit = write_then_die
        run_extract(bb, corpus(), root / "kill-acts", extract_cfg(), dist, progress=False)
        return

    from safetensors.torch import save_file

    from safesteer.cartography.map_dist import map_distributed
    from safesteer.cli.main import main as cli
    from safesteer.errors import SafesteerError
    from safesteer.sae.distributed import train_distributed
    from safesteer.sae.encode_dist import encode_distributed
    from safesteer.sae.saving import load_sae
    from safesteer.store import ActivationStore

    try:
        from safesteer.cartography.map import run_map, run_map_merge
    except ImportError:  # before the architecture work moved them out of the CLI
        from safesteer.cli.probes import run_map, run_map_merge

    bad = extract_cfg()
    bad.shard_size += dist.rank  # rank 1 started with other settings: refused on every rank, nothing written
    try:
        run_extract(bb, corpus(), root / "bad-acts", bad, dist, progress=False)
    except SafesteerError as exc:
        print(f"REFUSED rank {dist.rank}: {exc.message}", file=sys.stderr)
    rep = run_extract(bb, corpus(), root / "dist-acts", extract_cfg(), dist, progress=False)
    if dist.is_writer:
        print(f"extract: {rep.rows} rows, {rep.shards_done} shards", file=sys.stderr)
    store = ActivationStore(root / "dist-acts" / "layer-1")
    cfg = train_cfg()
    res = train_distributed(batches_of(store, cfg.batch_size), store.d, cfg, root / "dist-sae", dist)
    save_file(
        {
            n: getattr(res.sae, n).detach().contiguous()
            for n in ("W_enc", "W_dec", "b_gate", "b_mag", "b_dec", "r_mag")
        },
        str(root / f"params-rank{dist.rank}.safetensors"),
    )
    grad_check(store, dist, root)
    sae = load_sae(root / "fixed-sae")
    encode_distributed(sae, store.path, root / "dist-lat", dist, batch_size=64, progress=False)
    map_distributed(
        root / "dist-lat",
        store.path,
        root / "dist-map",
        dist,
        run_map=run_map,
        run_map_merge=run_map_merge,
        show_progress=False,
        **MAP_KW,
    )
    # the CLI commands under the same torchrun environment
    rc = cli(
        [
            "encode-map",
            "--sae",
            str(root / "fixed-sae"),
            "--acts",
            str(store.path),
            "--latents",
            str(root / "cli-lat"),
            "--out",
            str(root / "cli-map"),
            "--heldout",
            "0.2",
            "--min-per-class",
            "3",
            "--top-k",
            "5",
            "--batch-size",
            "64",
        ]
    )  # progress on: shown by rank 0 only
    rc2 = cli(["train-sae", *CLI_SAE_ARGS, "--acts", str(store.path), "--out", str(root / "cli-sae")])
    print(f"CLI rank {dist.rank}: {rc} {rc2}", file=sys.stderr)
    sys.exit(rc or rc2)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
