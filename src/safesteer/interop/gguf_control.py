"""llama.cpp control vectors (GGUF): export a policy's steering, import any control-vector file.

File layout (what llama.cpp's ``common_control_vector_load`` reads and repeng's
``ControlVector.export_gguf`` writes): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the model type, e.g. ``"llama"``), ``controlvector.layer_count``
(number of direction tensors), and one 1-D float32 tensor ``direction.N`` per steered layer.

**Layer index.** llama.cpp adds ``direction.N`` to the output of its block ``N`` (0-based): the
loader stores ``direction.N`` at buffer offset ``n_embd * (N - 1)`` and the adapter fills block
``il``'s vector from offset ``n_embd * (il - 1)``, applied after the block's FFN residual add
(``build_cvec(cur, il)`` just before ``l_out``). safesteer's layer ``L`` is also the output of
block ``L``, so **safesteer layer L = ``direction.L``**. ``direction.0`` is rejected by llama.cpp's
loader, so layer 0 cannot be exported.

**Scale and sign.** A control vector is *added* (``h' = h + s * v``, ``s`` = llama.cpp's
``--control-vector-scaled`` strength, 1 for ``--control-vector``). A safesteer policy applies
``h' = h - alpha * d`` (``d`` unit, toward unsafe), so the exported tensor is ``v = -alpha * d``:
α is folded in, and strength 1 reproduces the policy. The file also records ``safesteer.alpha``
and ``safesteer.layer``. On import, ``d = -v / |v|`` and ``alpha = |v|`` per layer.

Only the additive part of a policy is representable: atom clamps (non-linear SAE edits) and
conditions (a per-prompt probe decision) are refused with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path
from safesteer.serve.policies import Policy, policy_direction
from safesteer.steering import Direction, DirectionSet, steering_vector

ARCH = "controlvector"


@dataclass
class ControlVector:
    """Per-layer additive vectors (safesteer layer = llama.cpp block index) and the model hint."""

    model_hint: str
    directions: dict[int, np.ndarray]

    def __post_init__(self) -> None:
        if not self.directions:
            raise SafesteerError("a control vector needs at least one layer")
        d = {int(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in self.directions.items()}
        sizes = {v.shape[0] for v in d.values()}
        if len(sizes) != 1:
            raise SafesteerError(f"control-vector layers have different sizes {sorted(sizes)}")
        for layer, v in d.items():
            if layer < 1:
                raise SafesteerError(
                    f"llama.cpp control vectors cannot steer layer {layer} (its loader rejects "
                    "direction.0: the first steerable block output is layer 1); choose a layer >= 1"
                )
            if not np.all(np.isfinite(v)):
                raise SafesteerError(f"the control vector of layer {layer} has non-finite values")
        self.directions = dict(sorted(d.items()))

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])


def policy_control_vector(
    policy: Mapping, directions, model_hint: str, alpha: float | None = None
) -> tuple[ControlVector, dict]:
    """The control vector of a policy (its JSON body) over a :class:`~safesteer.steering.DirectionSet`.

    Returns the vector and a description (layer, alpha, directions) for the file's metadata.
    """
    body = dict(policy.get("policy", policy)) if policy.get("format") == "safesteer-policy" else dict(policy)
    name = str(body.pop("name", None) or policy.get("name") or "policy")
    try:
        pol = Policy.model_validate({**body, "name": name})
    except Exception as exc:  # pydantic ValidationError
        raise SafesteerError(f"not a valid safesteer policy: {str(exc).splitlines()[0]}") from None
    if pol.clamps:
        raise SafesteerError(
            f"policy '{name}' clamps SAE atoms, which a control vector (an added vector) cannot represent; "
            "export a policy without clamps"
        )
    if pol.condition is not None:
        raise SafesteerError(
            f"policy '{name}' is conditional on a probe, which llama.cpp cannot evaluate; "
            "export a policy without a condition"
        )
    layer, vec = policy_direction(pol.directions, [directions[n] for n in pol.directions], pol.layer)
    a = float(pol.alpha if alpha is None else alpha)
    if not np.isfinite(a):
        raise SafesteerError(f"alpha {a} is not finite")
    cv = ControlVector(model_hint, {int(layer): a * steering_vector(vec)})
    return cv, {"policy": name, "layer": int(layer), "alpha": a, "directions": list(pol.directions)}


def write_control_vector(cv: ControlVector, path: str | os.PathLike, info: Mapping | None = None) -> Path:
    """Write ``cv`` as a llama.cpp control-vector GGUF (atomically)."""
    import gguf  # gguf: only for control-vector files

    path = Path(path)
    with atomic_path(path, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_string(f"{ARCH}.model_hint", cv.model_hint)
        w.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
        w.add_string(
            "safesteer.convention",
            "direction.N is added to the output of block N (0-based) = safesteer layer N; "
            "alpha folded in (use strength 1)",
        )
        for key, value in (info or {}).items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int):
                w.add_int32(f"safesteer.{key}", value)
            elif isinstance(value, float):
                w.add_float32(f"safesteer.{key}", value)
            elif isinstance(value, str):
                w.add_string(f"safesteer.{key}", value)
            elif isinstance(value, (list, tuple)):
                w.add_string(f"safesteer.{key}", ",".join(map(str, value)))
        for layer, v in cv.directions.items():
            w.add_tensor(f"direction.{layer}", np.ascontiguousarray(v, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _field_str(reader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None or not len(f.parts):
        return None
    return bytes(f.parts[-1]).decode("utf-8", errors="replace")


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read a control-vector GGUF (ours, repeng's, llama.cpp's ``cvector-generator``'s)."""
    import gguf  # gguf: only for control-vector files

    path = Path(path)
    if not path.is_file():
        raise SafesteerError(f"no control-vector file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError / struct errors on bad files
        raise SafesteerError(
            f"{path} is not a GGUF file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    arch = _field_str(reader, "general.architecture")
    if arch != ARCH:
        raise SafesteerError(f"{path} is a GGUF of architecture {arch!r}, not a control vector ('{ARCH}')")
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise SafesteerError(f"{path}: tensor {t.name!r} has no layer number") from None
        if int(t.tensor_type) != int(gguf.GGMLQuantizationType.F32):
            raise SafesteerError(f"{path}: {t.name} is not float32 (llama.cpp requires F32 directions)")
        v = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        out[layer] = out.get(layer, 0) + v  # llama.cpp sums repeated layers
    if not out:
        raise SafesteerError(f"{path} has no direction.N tensors")
    return ControlVector(_field_str(reader, f"{ARCH}.model_hint") or "", out)


def to_directions(cv: ControlVector, name: str):
    """A :class:`DirectionSet` (one unit direction toward unsafe per layer) and each layer's α."""
    ds, alphas = DirectionSet(), {}
    for layer, v in cv.directions.items():
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm == 0.0:
            continue
        key = name if len(cv.directions) == 1 else f"{name}_L{layer}"
        ds.add(
            Direction(
                key,
                -v,
                "custom",
                layer,
                sources=["control-vector"],
                meta={"alpha": norm, "model_hint": cv.model_hint},
            )
        )
        alphas[key] = norm
    if not len(ds):
        raise SafesteerError("every layer of the control vector is zero; nothing to import")
    return ds, alphas


__all__ = [
    "ARCH",
    "ControlVector",
    "policy_control_vector",
    "read_control_vector",
    "to_directions",
    "write_control_vector",
]
