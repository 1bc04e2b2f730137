"""Shared fixtures: tiny random RoBERTa/Llama backbones (no download) and the embedded SmolLM2.

Unit tests use the tiny random models built from configs here. Integration tests
(``@pytest.mark.integration``) share one SmolLM2 load per session and read ../shared/data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WORDS = (
    "the a an is are was were be to of and in that it for on with as at by this from or not but "
    "you he she they we i my your his her their our man woman people person group women men "
    "good bad kind cruel hate love help harm kill steal make build bomb weapon drug safe unsafe "
    "toxic nice stupid idiot friend enemy doctor nurse engineer teacher poor rich black white "
    "young old happy sad angry afraid calm yes no please how what why when where who can should "
    "would will do does did have has had go going went say said tell told ask asked answer question "
    "dog cat house car city country world day night time year work school money food water book"
).split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)) + list(".,?!'"))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tokenizer()


def make_tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from safesteer.models import Backbone

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, type_vocab_size=1,
    )
    return Backbone(RobertaForMaskedLM(cfg), tok, name="tiny-roberta")


def make_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from safesteer.models import Backbone

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2,
    )
    return Backbone(LlamaForCausalLM(cfg), tok, name="tiny-llama")


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
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def foreign_hooks(layers) -> int:
    """Forward hooks on the blocks other than transformers' own permanent output-capturing hooks."""
    return sum(
        1 for layer in layers for fn in layer._forward_hooks.values() if getattr(fn, "__name__", "") != "output_capturing_hook"
    )


def chromium_screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2400) -> Path:
    """Render ``html_path`` in headless Chromium (Debian package ``chromium``) and save a PNG screenshot."""
    import shutil
    import subprocess

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
           f"--user-data-dir={png_path.parent / 'chromium-profile'}", f"--window-size={width},{height}",
           f"--screenshot={png_path}", html_path.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png_path.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-1000:]}"
    return png_path


def colour_fraction(png_path: Path, rgb: tuple[int, int, int], tol: int = 40) -> float:
    """Fraction of the screenshot's pixels within ``tol`` of ``rgb`` (per channel)."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    return float((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).mean())
