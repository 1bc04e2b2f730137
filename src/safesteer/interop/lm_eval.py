"""Export a policy for lm-evaluation-harness' ``steered`` model (``lm_eval/models/hf_steered.py``).

lm-eval's steering CSV has the columns
``loader,action,sparse_model,hookpoint,feature_index,steering_coefficient,head_index,sae_id,description``;
each row takes row ``feature_index`` of a sparse model's ``W_dec`` as the steering vector and adds
``steering_coefficient`` times it at ``hookpoint`` (a module name under ``model.base_model``).
A policy's direction is not a feature of a published SAE, so :func:`export_lm_eval` writes, next to
the CSV, a one-feature sparse model in the layout of ``sparsify``'s ``SparseCoder.load_from_disk``
(``<sparse_model>/<hookpoint>/cfg.json`` + ``sae.safetensors`` with ``encoder.weight``,
``encoder.bias``, ``W_dec``, ``b_dec``) whose decoder row is the policy's unit steering vector
``-d``, and a row ``sparsify,add,<folder>,layers.<L>,0,<alpha>``. ``layers.L`` under the causal
LM's base model is transformer block ``L``, whose output is safesteer's layer ``L``.

lm-eval 0.4.13 derives ``bias = b_dec`` for every CSV row and then asserts ``bias is None`` for
``action=add``, so its stock ``steered`` model refuses ``add`` rows from a CSV. :func:`register`
adds the model ``safesteer-steered``: lm-eval's own ``SteeredModel`` with that bias dropped for
``add`` rows (``b_dec`` is zero here anyway). Run any task with::

    python -c "import safesteer.interop.lm_eval as s, sys; s.cli_evaluate(sys.argv[1:])" \\
        --model safesteer-steered --model_args pretrained=PATH,steer_path=policy.csv --tasks hellaswag
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from safesteer.errors import SafesteerError
from safesteer.interop.gguf_control import policy_control_vector
from safesteer.io import atomic_path, write_json

COLUMNS = (
    "loader",
    "action",
    "sparse_model",
    "hookpoint",
    "feature_index",
    "steering_coefficient",
    "head_index",
    "sae_id",
    "description",
)
MODEL_NAME = "safesteer-steered"


def hookpoint_for_layer(layer: int) -> str:
    """lm-eval hookpoint (module under ``model.base_model``) whose output is safesteer's layer ``layer``."""
    return f"layers.{int(layer)}"


def write_sparse_feature(folder: str | os.PathLike, vector: np.ndarray) -> Path:
    """A one-latent sparsify ``SparseCoder`` folder whose decoder row 0 is ``vector`` (unit norm)."""
    v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    d = v.shape[1]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": v.copy(),
        "encoder.bias": np.zeros(1, np.float32),
        "W_dec": v.copy(),
        "b_dec": np.zeros(d, np.float32),
    }
    with atomic_path(folder / "sae.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(
        folder / "cfg.json",
        {
            "activation": "topk",
            "expansion_factor": 1,
            "normalize_decoder": True,
            "num_latents": 1,
            "k": 1,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": d,
        },
    )
    return folder


def export_lm_eval(
    policy: Mapping, directions, out_csv: str | os.PathLike, alpha: float | None = None
) -> Path:
    """Write ``out_csv`` (+ its sparse-model folder ``<out_csv stem>.features/``) for ``policy``."""
    cv, info = policy_control_vector(policy, directions, model_hint="", alpha=alpha)
    ((layer, v),) = cv.directions.items()
    a = float(info["alpha"])
    norm = float(np.linalg.norm(v))
    if a == 0.0 or norm == 0.0:
        raise SafesteerError("alpha is 0: the exported policy would not steer; give a non-zero alpha")
    unit_v = v / norm if a > 0 else -v / norm  # the unit steering vector -d; coefficient = alpha
    out_csv = Path(out_csv)
    features = out_csv.with_name(out_csv.stem + ".features")
    hook = hookpoint_for_layer(layer)
    write_sparse_feature(features / hook, unit_v)
    row = {
        "loader": "sparsify",
        "action": "add",
        "sparse_model": str(features.resolve()),
        "hookpoint": hook,
        "feature_index": 0,
        "steering_coefficient": repr(a),
        "head_index": "",
        "sae_id": "",
        "description": f"safesteer policy {info['policy']} ({', '.join(info['directions'])}) at layer "
        f"{layer}",
    }
    with atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerow(row)
    return out_csv


def register() -> type:
    """Register ``safesteer-steered`` with lm-eval (needs ``lm-eval`` and ``eai-sparsify``) and return the
    class."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model  # lm_eval: optional
    from lm_eval.models.hf_steered import SteeredModel

    if MODEL_NAME in MODEL_REGISTRY:
        return MODEL_REGISTRY[MODEL_NAME]

    class SafesteerSteered(SteeredModel):
        """lm-eval's ``steered`` model; CSV ``add`` rows carry no bias (lm-eval 0.4.13 asserts on it)."""

        @classmethod
        def derive_steer_config(cls, steer_path: str):
            cfg = super().derive_steer_config(steer_path)
            for info in cfg.values():
                if info.get("action", "add") == "add":
                    info["bias"] = None
            return cfg

    register_model(MODEL_NAME)(SafesteerSteered)
    return SafesteerSteered


def cli_evaluate(argv: Sequence[str]) -> None:
    """``lm_eval``'s own command line with ``safesteer-steered`` registered."""
    register()
    from lm_eval.__main__ import cli_evaluate as _cli  # lm_eval: optional

    sys.argv = ["lm_eval", *argv]
    _cli()


def read_lm_eval_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a steering CSV (for checks and ``safesteer`` tooling)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or set(COLUMNS) - set(rows[0]):
        raise SafesteerError(f"{path} is not an lm-eval steering CSV (columns: {', '.join(COLUMNS)})")
    return rows


__all__ = [
    "COLUMNS",
    "MODEL_NAME",
    "cli_evaluate",
    "export_lm_eval",
    "hookpoint_for_layer",
    "read_lm_eval_csv",
    "register",
    "write_sparse_feature",
]
