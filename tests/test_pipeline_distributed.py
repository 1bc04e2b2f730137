"""`safesteer run` with `[run] distributed = true` under torchrun (2 gloo ranks) vs one process.

The ranks share extraction (shard by shard), SAE training (all-reduced gradients) and encoding;
rank 0 alone runs the other stages and writes the report. The store must be byte-identical to the
one-process run's and the SAE equal within float tolerance; the run finishes with a report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safesteer.config import dump_toml
from safesteer.pipeline.runner import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_behaviour import pinned_config  # noqa: E402
from test_pipeline_run import tiny_model_dir  # noqa: E402,F401

TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFESTEER_DIST_TIMEOUT": "120", "PYTHONUNBUFFERED": "1"}
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
        "-m",
        "safesteer",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {TIMEOUT_S}s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_distributed_run_equals_one_process(tmp_path, tiny_model_dir, shared_data):  # noqa: F811
    cfg = pinned_config(tiny_model_dir, shared_data)
    cfg.extract.shard_size = 64  # several shards, so both ranks extract some
    one = Pipeline(cfg, tmp_path / "one")
    assert one.run() is not None

    cfg.run.distributed = True
    cfg_path = tmp_path / "dist.toml"
    cfg_path.write_text(dump_toml(cfg))
    res = _torchrun(["run", "--config", str(cfg_path), "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-4000:]
    two = tmp_path / "two"
    assert (two / "report.html").is_file()

    # the same stage keys (run.distributed changes no result), so the same stage folders
    for name in ("extract", "sae", "encode", "evaluate"):
        assert (two / "stages" / one.st[name].dir.name / "DONE.json").is_file(), name
    acts_one = one.outputs["extract"].acts.parent
    acts_two = two / "stages" / one.st["extract"].dir.name / acts_one.name
    a, b = _files(acts_one), _files(acts_two)
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("layer-1/shard-")]) >= 2
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]

    w1 = load_file(str(one.outputs["sae"].sae / "sae_weights.safetensors"))
    w2 = load_file(
        str(two / "stages" / one.st["sae"].dir.name / one.outputs["sae"].sae.name / "sae_weights.safetensors")
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), (k, (w1[k] - w2[k]).abs().max())


def test_torchrun_without_distributed_flag_is_one_line(tmp_path, tiny_model_dir, shared_data):  # noqa: F811
    cfg = pinned_config(tiny_model_dir, shared_data)
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(dump_toml(cfg))
    res = _torchrun(["run", "--config", str(cfg_path), "--out", str(tmp_path / "run")])
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "run.distributed is false" in ln]
    assert len(lines) == 2 and all(ln.startswith("error: WORLD_SIZE=2") for ln in lines)  # one line per rank
    assert "safesteer/" not in res.stderr  # no traceback of ours (torchrun prints its own summary)
    assert not (tmp_path / "run" / "stages").exists()  # nothing written
