"""A real SIGKILL in the middle of SAE training / `safesteer evaluate`, then a re-run: the result is
bit-identical (torch.equal / byte-equal files) to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safesteer.sae.gated import PARAM_NAMES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _resume_worker as W  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> str:
    """SIGKILL ``proc``'s process group as soon as ``ready(output so far)``; returns that output."""
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready("".join(seen)):
        time.sleep(0.02)
    assert proc.poll() is None, "the process ended before it could be killed:\n" + "".join(seen)[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "".join(seen)


def test_sigkill_during_sae_training_then_resume_is_bit_exact(tmp_path):
    ref = W.train(tmp_path / "full")
    assert ref.stopped == "epochs" and ref.steps > 40
    out = tmp_path / "killed"
    cmd = [sys.executable, str(HERE / "_resume_worker.py"), str(out), "0.05"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True
    )
    # kill once the second step-checkpoint is there: mid-epoch, with steps done after it
    _kill_when(
        proc,
        lambda _: (
            len(list((out / "checkpoints").glob("ckpt-*"))) >= 2 if (out / "checkpoints").is_dir() else False
        ),
    )
    assert not (out / "sae" / "sae_weights.safetensors").exists()
    done = subprocess.run(
        [sys.executable, str(HERE / "_resume_worker.py"), str(out), "0"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done steps={ref.steps} stopped=epochs" in done.stdout
    a = load_file(str(tmp_path / "full" / "sae" / "sae_weights.safetensors"))
    b = load_file(str(out / "sae" / "sae_weights.safetensors"))
    for n in PARAM_NAMES:
        assert torch.equal(a[n], b[n]), f"{n} differs after SIGKILL + resume"


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    from safesteer.cli.main import main
    from safesteer.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("eval-inputs")
    bb = make_tiny_llama(seed=4)
    bb.model.save_pretrained(root / "model")
    bb.tokenizer.save_pretrained(root / "model")
    assert (
        main(["directions", "--layer", "1", "--d-model", str(bb.d_model), "--out", str(root / "dirs")]) == 0
    )
    return root


def _evaluate_cmd(root: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "safesteer.cli.main",
        "evaluate",
        "--model",
        str(root / "model"),
        "--layer",
        "1",
        "--directions",
        str(root / "dirs"),
        "--alphas",
        "-1,1",
        "--alpha-unit",
        "raw",
        "--metrics",
        "yes_harmful,no_safe,fluency,crows,stereoset_ss",
        "--max-prompts",
        "6",
        "--calib-prompts",
        "4",
        "--n-boot",
        "200",
        "--no-plots",
        "--data-dir",
        str(data),
        "--source",
        "local",
        "--out",
        str(out),
    ]


OUTPUTS = ("results.csv", "table.csv", "results.json", "entanglement.csv")


def test_sigkill_during_evaluate_then_rerun_is_byte_equal(tmp_path, eval_inputs, shared_data):
    full = subprocess.run(
        _evaluate_cmd(eval_inputs, shared_data, tmp_path / "full"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _evaluate_cmd(eval_inputs, shared_data, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    # killed in the middle of the steered passes (the unsteered baseline is done)
    log = _kill_when(proc, lambda text: "evaluating random" in text)
    assert "scoring the unsteered model" in log
    assert not (out / "results.csv").exists()
    again = subprocess.run(
        _evaluate_cmd(eval_inputs, shared_data, out), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
