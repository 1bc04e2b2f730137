"""torch.distributed on CPU (gloo), launched by torchrun with 2 ranks, against single-process references.

One torchrun job runs extraction -> SAE training (20 steps) -> encode + map (tests/_dist_worker.py);
a second kills rank 1 mid-extraction and the store is finished by one process. Every launch has a
hard timeout and binds 127.0.0.1 on a free port, so a hung rank fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402

from safesteer.distributed import Dist, from_env  # noqa: E402
from safesteer.errors import SafesteerError  # noqa: E402
from safesteer.sae.distributed import GradientAllReduce  # noqa: E402

WORKER = Path(__file__).parent / "_dist_worker.py"
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode: str, root: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SAFESTEER_DIST_TIMEOUT": "60",
        "PYTHONUNBUFFERED": "1",
        "DIST_WORKER_DUMP_S": str(TIMEOUT_S - 30),
    }
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "--max-restarts=0",
        str(WORKER),
        mode,
        str(root),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, err = proc.communicate()
        pytest.fail(f"torchrun {mode} hung for {TIMEOUT_S}s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Single-process references: the store, the 20-step SAE, the latents and the map of a fixed SAE."""
    try:
        from safesteer.cartography.map import run_map
    except ImportError:  # before the architecture work moved it out of the CLI
        from safesteer.cli.probes import run_map
    from safesteer.extract import extract
    from safesteer.sae import GatedSAE, SAEConfig
    from safesteer.sae.latents import encode_store
    from safesteer.sae.saving import save_sae
    from safesteer.sae.trainer import Trainer
    from safesteer.store import ActivationStore
    from safesteer.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("dist")
    save_sae(GatedSAE(SAEConfig(d_in=32, d_sae=40), seed=5), root / "fixed-sae")
    extract(make_tiny_llama(), W.corpus(), root / "ref-acts", W.extract_cfg(), progress=False)
    store = ActivationStore(root / "ref-acts" / "layer-1")
    cfg = W.train_cfg()
    sae = Trainer(cfg, store.d, root / "ref-sae").fit(W.batches_of(store, cfg.batch_size)).sae
    from safesteer.sae.saving import load_sae

    encode_store(load_sae(root / "fixed-sae"), store, root / "ref-lat", batch_size=64, progress=False)
    run_map(root / "ref-lat", store.path, root / "ref-map", show_progress=False, **W.MAP_KW)
    from safesteer.cli.main import main

    assert (
        main(["train-sae", *W.CLI_SAE_ARGS, "--acts", str(store.path), "--out", str(root / "ref-cli-sae")])
        == 0
    )
    return root, sae


@pytest.fixture(scope="module")
def dist_run(ref):
    root, _ = ref
    done = _torchrun("all", root)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "torchrun-all.log").write_text(done.stderr)
    return root


def test_ranks_with_other_settings_are_refused_before_writing(dist_run):
    log = (dist_run / "torchrun-all.log").read_text()
    for r in (0, 1):
        assert f"REFUSED rank {r}: rank 1 and rank 0 disagree on the extract settings (config)" in log
    assert not (dist_run / "bad-acts").exists()


def test_store_equals_single_process_bytes(dist_run):
    root = dist_run
    a, b = _files(root / "ref-acts"), _files(root / "dist-acts")
    assert (
        a.keys() == b.keys() and len([k for k in a if Path(k).name.startswith("shard-")]) == 2 * 8
    )  # 8 shards x 2 layers
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert not list(
        (root / "dist-acts").rglob(".shard-*.commit.json")
    )  # commit records folded into the manifest


def test_sae_equals_single_process_weights(ref, dist_run):
    from safetensors.torch import load_file

    root, sae = ref
    r0, r1 = (load_file(str(root / f"params-rank{r}.safetensors")) for r in (0, 1))
    for n, t in r0.items():
        assert torch.equal(t, r1[n]), f"{n} differs between ranks"
        expect = getattr(sae, n).detach()
        assert float((t - expect).abs().max()) <= 1e-5, (n, float((t - expect).abs().max()))
    # rank 0 alone wrote the checkpoints (the last at step 20); the CLI run under torchrun wrote its SAE
    assert sorted(p.name for p in (root / "dist-sae" / "checkpoints").iterdir())[-1] == "ckpt-0000000020"
    # `train-sae --grid` under torchrun: the same grid table and final SAE as one process
    from safesteer.sae.saving import load_sae

    a, b = (json.loads((root / d / "grid_results.json").read_text()) for d in ("ref-cli-sae", "cli-sae"))
    assert a["best"] == b["best"] and [r["name"] for r in a["rows"]] == [r["name"] for r in b["rows"]]
    ref_cli, dist_cli = load_sae(root / "ref-cli-sae" / "sae"), load_sae(root / "cli-sae" / "sae")
    for n in ("W_enc", "W_dec", "b_gate", "b_mag", "b_dec"):
        assert float((getattr(ref_cli, n) - getattr(dist_cli, n)).detach().abs().max()) <= 1e-5, n
    assert (root / "cli-map" / "atom_map.parquet").is_file()


def test_all_reduced_gradient_equals_the_whole_batch_gradient(dist_run):
    """float64: Σ_r (n_r/n)·g_r over an uneven split (23 + 24 rows) is the gradient of the 47-row batch."""
    for r in (0, 1):
        chk = json.loads((dist_run / f"grad-check-rank{r}.json").read_text())
        assert chk["rows"] == [[0, 23, 47], [23, 47, 47]][r]
        assert chk["rel_err"] < 1e-12, chk


def test_checkpoint_of_two_ranks_resumes_on_one(ref, dist_run):
    """Rank 0's checkpoint of the 2-rank run, resumed by one process, ends on the single-process weights."""
    from safesteer.sae.trainer import Trainer
    from safesteer.store import ActivationStore

    root, sae = ref
    work = root / "resume-sae"
    shutil.copytree(root / "dist-sae", work)
    ckpts = sorted((work / "checkpoints").glob("ckpt-*"))
    assert len(ckpts) == 2
    shutil.rmtree(ckpts[-1])  # back to the earlier checkpoint (an epoch end before step 20)
    store = ActivationStore(root / "ref-acts" / "layer-1")
    cfg = W.train_cfg()
    res = Trainer(cfg, store.d, work).fit(W.batches_of(store, cfg.batch_size), resume=True)
    assert res.steps == 20
    for n in ("W_enc", "W_dec", "b_gate", "b_mag", "b_dec"):
        assert float((getattr(res.sae, n) - getattr(sae, n)).detach().abs().max()) <= 1e-5


def test_latents_and_merged_map_equal_single_process(dist_run):
    root = dist_run
    a, b = _files(root / "ref-lat"), _files(root / "dist-lat")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "manifest.json")
    ma, mb = (json.loads(x["manifest.json"]) for x in (a, b))
    assert ma.pop("acts").endswith("ref-acts/layer-1") and mb.pop("acts").endswith("dist-acts/layer-1")
    assert ma == mb  # the same entries, sizes and hashes: only the activation folder's path differs
    full = pd.read_parquet(root / "ref-map" / "atom_map.parquet")
    merged = pd.read_parquet(root / "dist-map" / "atom_map.parquet")
    assert list(full.columns) == list(merged.columns) and len(full) == len(merged) > 0
    num = full.select_dtypes("number").columns
    np.testing.assert_allclose(
        merged[num].to_numpy(float), full[num].to_numpy(float), rtol=1e-9, atol=1e-12, equal_nan=True
    )
    assert (merged["label"] == full["label"]).all()
    summary = json.loads((root / "dist-map" / "summary.json").read_text())
    assert summary["n_rows"] == json.loads((root / "ref-map" / "summary.json").read_text())["n_rows"]
    assert len(summary["merged_from"]) == 2


def test_killed_rank_then_one_process_resume_is_identical(ref):
    from safesteer.extract import extract
    from safesteer.testing import make_tiny_llama

    root, _ = ref
    done = _torchrun("kill", root)
    assert done.returncode != 0
    folder = root / "kill-acts" / "layer-1"
    assert not (folder / "manifest.json").exists()  # nothing claims to be complete
    assert (folder / ".shard-00001.commit.json").is_file()  # rank 1 committed its first shard before dying
    rep = extract(make_tiny_llama(), W.corpus(), root / "kill-acts", W.extract_cfg(), progress=False)
    assert rep.shards_skipped >= 1 and rep.shards_done + rep.shards_skipped == 8
    a, b = _files(root / "ref-acts"), _files(root / "kill-acts")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not list((root / "kill-acts").rglob(".shard-*.commit.json"))


# ------------------------------------------------------------------ single-process units


def test_slices_cover_the_batch_and_weights_sum_to_one():
    for world in (2, 3, 5):
        for n in (1, 2, 4, 7, 47):
            parts = [GradientAllReduce(Dist(rank=r, world=world)).slice_rows(n) for r in range(world)]
            assert abs(sum(w for _, _, w in parts) - 1.0) < 1e-12
            if n >= world:
                assert [p[:2] for p in parts] == [
                    (n * r // world, n * (r + 1) // world) for r in range(world)
                ]
                assert all(hi > lo for lo, hi, _ in parts)
            else:  # every rank takes the whole short batch with weight 1/world
                assert all(p == (0, n, 1.0 / world) for p in parts)


def test_env_errors_are_one_line(monkeypatch):
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not from_env().enabled and Dist().owns(3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SafesteerError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"):
        from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SafesteerError, match="not an integer"):
        from_env()


def test_a_dead_rank_is_one_error_line_on_the_others(tmp_path):
    """Without torchrun to stop the job: rank 1 dies after joining; rank 0's next collective fails in one
    line."""
    script = (
        "import os, sys\n"
        "from safesteer.distributed import from_env\n"
        "from safesteer.errors import SafesteerError\n"
        "d = from_env('cpu')\n"
        "d.barrier('the first barrier')\n"  # both ranks connected: one gone mid-connect fails otherwise
        "if d.rank == 1: os._exit(0)\n"
        "try:\n"
        "    d.barrier('the test barrier')\n"
        "except SafesteerError as exc:\n"
        "    print('ERR', exc.message); sys.exit(2)\n"
    )
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "SAFESTEER_DIST_TIMEOUT": "20",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[1].returncode == 0 and procs[0].returncode == 2, outs
    line = outs[0][0].strip()
    assert (
        line.startswith("ERR rank 0/2: lost contact with the other ranks during the test barrier")
        and "\n" not in line
    )
