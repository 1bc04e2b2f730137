"""Shared fixtures: tiny random RoBERTa/Llama backbones (no download) and the embedded SmolLM2.

Unit tests use the tiny random models built from configs here. Integration tests
(``@pytest.mark.integration``) share one SmolLM2 load per session and read ../shared/data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from safesteer.testing import WORDS, make_tiny_llama, make_tiny_roberta  # noqa: F401  (re-exported for the tests)
from safesteer.testing import tiny_tokenizer as _tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
_TRUE = {"1", "true", "yes", "on"}


def find_data_dir(env: dict[str, str] | None = None, root: Path = ROOT) -> Path | None:
    """The package's rule: ``SAFESTEER_DATA_DIR`` (when it is a folder), else ``../shared/data`` beside the
    project; a folder counts when it holds the data pack's README.md."""
    env = os.environ if env is None else env
    candidates = [Path(env["SAFESTEER_DATA_DIR"]).expanduser()] if env.get("SAFESTEER_DATA_DIR") else []
    candidates.append(root.parent / "shared" / "data")
    for c in candidates:
        if (c / "README.md").is_file():
            return c.resolve()
    return None


def missing_data(env: dict[str, str] | None = None) -> str:
    """Skip reason, or raise under CI (``CI=true``): there a missing data folder is a failure, not a skip."""
    env = os.environ if env is None else env
    msg = (
        "no data folder: set SAFESTEER_DATA_DIR to a folder in the layout of ../shared/data "
        f"(looked at SAFESTEER_DATA_DIR={env.get('SAFESTEER_DATA_DIR', '')!r} and "
        f"{ROOT.parent / 'shared' / 'data'})"
    )
    if env.get("CI", "").lower() in _TRUE:
        pytest.fail("CI=true: " + msg, pytrace=False)
    return msg


DATA = find_data_dir() or SHARED_DATA  # the data folder the tests read (see find_data_dir)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def tiny_roberta():
    return make_tiny_roberta()


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(params=["masked", "causal"])
def tiny_backbone(request, tiny_roberta, tiny_llama):
    return tiny_roberta if request.param == "masked" else tiny_llama


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from safesteer.models import load_backbone

    return load_backbone("smollm2-135m")


@pytest.fixture(scope="session")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct (six PyPI wheels, converted once to the cache), loaded once per session."""
    from safesteer.models import load_backbone

    return load_backbone("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder (``SAFESTEER_DATA_DIR``, else ../shared/data); skipped when absent, failed under
    CI=true."""
    found = find_data_dir()
    if found is None:
        pytest.skip(missing_data())
    return found


# For tests that read ``conftest.DATA`` directly: the same rule as the ``shared_data`` fixture.
needs_data = pytest.mark.usefixtures("shared_data")


def foreign_hooks(layers) -> int:
    """Forward hooks on the blocks other than transformers' own permanent output-capturing hooks."""
    return sum(
        1
        for layer in layers
        for fn in layer._forward_hooks.values()
        if getattr(fn, "__name__", "") != "output_capturing_hook"
    )


def chromium_screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2400) -> Path:
    """Render ``html_path`` in headless Chromium (Debian package ``chromium``) and save a PNG screenshot."""
    import shutil
    import subprocess

    exe = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--disable-dev-shm-usage",
        f"--user-data-dir={png_path.parent / 'chromium-profile'}",
        f"--window-size={width},{height}",
        f"--screenshot={png_path}",
        html_path.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png_path.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-1000:]}"
    return png_path


def colour_fraction(png_path: Path, rgb: tuple[int, int, int], tol: int = 40) -> float:
    """Fraction of the screenshot's pixels within ``tol`` of ``rgb`` (per channel)."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    return float((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).mean())


class ReluSAE:
    """A small ReLU SAE with unit decoder rows (d_sae × d_in), torch in/out: enough for clamping tests."""

    def __init__(self, d_in=32, d_sae=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
        self.b_enc = torch.randn(d_sae, generator=g) * 0.1
        W = torch.randn(d_sae, d_in, generator=g)
        self.W_dec = W / W.norm(dim=1, keepdim=True)
        self.b_dec = torch.randn(d_in, generator=g) * 0.1

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~30x faster on one thread when the shared CPU is busy (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_prompts(
    n: int, d: int, seed: int = 0, shift: float = 3.0, groups=("ha", "hb", "sa", "sb"), style: float = 0.0
):
    """Gate data with a planted truth: ``n`` rows per dataset (``h…`` harmful, ``s…`` harmless),
    harmful rows shifted by ``shift`` along axis 0, dataset ``i`` offset by ``style`` along axis 1 + i;
    hash splits as the real data's. Returns (features, Prompts)."""
    import numpy as np

    from safesteer.behaviour.prompts import Prompts, split3

    rng = np.random.default_rng(seed)
    text, harm, grp, H = [], [], [], []
    for gi, g in enumerate(groups):
        y = int(g.startswith("h"))
        for i in range(n):
            h = rng.normal(size=d)
            h[0] += shift * y
            if style:
                h[1 + gi] += style
            H.append(h)
            text.append(f"{g}-{i}")
            harm.append(y)
            grp.append(g)
    return np.array(H), Prompts(text, np.array(harm), grp, [split3(t) for t in text])


def tiny_behaviour_section(section):
    """The [behaviour] section sized for the 3-block tiny Llama (steering layer 1)."""
    section.gate_layers = [1, 2]
    section.strategies = ["refusal_caa", "refusal_dim", "probe_harm"]
    section.alphas = [0.5, 2.0]
    section.fprs = [0.05, 0.2]
    section.gate_hidden, section.gate_members = 16, 2  # a small MLP gate: the default kind, end to end
    section.cap_harmful, section.cap_qa, section.cap_shipped = 20, 10, 10
    section.n_val_harmful = section.n_test_harmful = 8
    section.n_qa, section.n_caa_prompts, section.n_verify = 4, 4, 4
    section.max_new_tokens, section.batch_size = 4, 16
    # attack rows: two requests per family and class in train, one in val, two in test
    section.attacks, section.budget_groups = True, ["xstest_safe", "lookalikes", "wrapb:*"]
    section.n_wrap, section.n_conv, section.n_test_attack = [2, 1, 2], [3, 1, 2], 2
    # the segmented gate (steering.segments: pieces step, MIL fit, pre-pass checks), each family scored
    # by a gate trained without it (leave one family out)
    section.gate_segments, section.family_folds = True, 0
    section.n_answer_gate, section.answer_gate_fpr = (
        24,
        0.3,
    )  # a loose answer-time gate: it fires on some rows
    return section


@pytest.fixture(scope="session")
def behaviour_run(tmp_path_factory, shared_data):
    """The behaviour stage run once on a tiny random Llama saved to a folder (≈10 s): (folder, outputs, model
    dir, config)."""
    from types import SimpleNamespace

    import numpy as np

    from safesteer.config import Config
    from safesteer.pipeline.stages.behaviour import run_behaviour_stage
    from safesteer.pipeline.table import Context
    from safesteer.steering.strategies import Direction, DirectionSet

    root = tmp_path_factory.mktemp("behaviour")
    model_dir = root / "tiny-llama"
    bb = make_tiny_llama(seed=1)
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    ds = DirectionSet()
    ds.add(
        Direction("probe_harm", np.random.default_rng(0).normal(size=32), "probe", 1, ["probe:harmfulness"])
    )
    ds.save(root / "directions")
    cfg = Config()
    cfg.model.name, cfg.model.layer, cfg.model.max_length = str(model_dir), 1, 32
    tiny_behaviour_section(cfg.behaviour)
    ctx = Context(config=cfg, seed=0, device="cpu", data_dir=shared_data, say=lambda m: None)
    out = root / "stage"
    outputs = run_behaviour_stage(
        cfg.behaviour, {"directions": SimpleNamespace(directions=root / "directions")}, out, ctx
    )
    return out, outputs, model_dir, cfg
