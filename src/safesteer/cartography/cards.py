"""Atom cards: what an atom fires on, what it writes, and how it relates to the labels.

A card (a JSON-ready dict) holds

* ``top_texts`` — the highest-activating texts of the mapped data (ids from the map's top-activation
  table, texts looked up in the datasets by id),
* ``tokens`` / ``neg_tokens`` — the logit lens of the unit decoder direction d: tokens it promotes
  and suppresses when read out directly. Causal LM: ``lm_head(g ⊙ d)`` with g the final norm's
  weight (the RMSNorm/LayerNorm gain, no re-normalisation of a bare direction). Masked LM: the MLM
  head on d minus the head on the zero vector (what d adds to the head's own bias),
* ``labels`` — the atom's rows of the atom map with the largest |concept score| (r, Δμ, firing
  frequencies, score).

Cards feed the judges and the report.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from safesteer.data import load, names
from safesteer.errors import SafesteerError
from safesteer.models.hooks import find_body
from safesteer.models.positions import special_token_ids

TextLookup = Callable[[Sequence[str]], dict[str, str]]


def _final_norm_weight(model) -> torch.Tensor | None:
    base = find_body(model)
    for holder in (base, model, getattr(base, "decoder", None)):
        if holder is None:
            continue
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"):
            mod = getattr(holder, name, None)
            if isinstance(mod, torch.nn.Module) and getattr(mod, "weight", None) is not None:
                return mod.weight.detach()
    return None


def _mlm_head(model) -> torch.nn.Module:
    for name in ("lm_head", "cls", "vocab_projector", "generator_lm_head", "pred_layer"):
        mod = getattr(model, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise SafesteerError(f"cannot find the MLM head of {type(model).__name__}")
    return out


@torch.inference_mode()
def logit_lens_logits(backbone, vectors: np.ndarray) -> torch.Tensor:
    """Vocabulary logits (k × vocab) that each row of ``vectors`` (k × d) writes through the unembedding."""
    V = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if V.ndim == 1:
        V = V[None]
    if V.shape[1] != backbone.d_model:
        raise SafesteerError(f"vectors have {V.shape[1]} dims; the model has d_model={backbone.d_model}")
    model = backbone.model
    dev = backbone.device
    dtype = next(model.parameters()).dtype
    V = V.to(dev, dtype)
    if backbone.kind == "causal":
        g = _final_norm_weight(model)
        x = V * g.to(dev, dtype) if g is not None else V
        head = model.get_output_embeddings()
        return head(x).float().cpu()
    head = _mlm_head(model)
    return (head(V) - head(torch.zeros_like(V[:1]))).float().cpu()


def _clean(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n").strip() or repr(tok)


def logit_lens_tokens(backbone, vectors: np.ndarray, top_n: int = 10) -> list[dict[str, list[str]]]:
    """Per vector: ``{"top": [...], "bottom": [...]}`` readable tokens by logit."""
    logits = logit_lens_logits(backbone, vectors)
    tok = backbone.tokenizer
    special = special_token_ids(tok)
    out = []
    for row in logits:
        row = row.clone()
        if special:
            idx = torch.tensor(sorted(i for i in special if i < row.shape[0]), dtype=torch.long)
            if len(idx):
                row[idx] = float("nan")
        finite = torch.nan_to_num(row, nan=-float("inf"))
        top = torch.topk(finite, min(top_n, row.shape[0])).indices.tolist()
        bottom = torch.topk(
            torch.nan_to_num(-row, nan=-float("inf")), min(top_n, row.shape[0])
        ).indices.tolist()
        out.append(
            {
                "top": [_clean(tok.convert_ids_to_tokens(i)) for i in top],
                "bottom": [_clean(tok.convert_ids_to_tokens(i)) for i in bottom],
            }
        )
    return out


def lookup_texts(
    ids: Iterable[str], data_dir=None, source: str = "auto", max_chars: int = 600
) -> dict[str, str]:
    """Texts for record ids (``<dataset>:<key>``) read back from the datasets; unknown ids are skipped."""
    wanted: dict[str, set[str]] = {}
    for i in ids:
        ds = str(i).split(":", 1)[0]
        wanted.setdefault(ds, set()).add(str(i))
    known = set(names())
    out: dict[str, str] = {}
    for ds, want in wanted.items():
        if ds not in known:
            continue
        try:
            for rec in load(ds, split="all", source=source, data_dir=data_dir):
                if rec.id in want:
                    out[rec.id] = rec.text[:max_chars]
                    if len(out) >= sum(len(w) for w in wanted.values()):
                        break
        except SafesteerError:
            continue
    return out


def build_cards(
    atoms: Sequence[int],
    *,
    W_dec: np.ndarray | None = None,
    atom_map: pd.DataFrame | None = None,
    top_acts: pd.DataFrame | None = None,
    text_lookup: TextLookup | None = None,
    backbone=None,
    n_tokens: int = 10,
    n_texts: int = 5,
    n_labels: int = 5,
) -> list[dict[str, Any]]:
    """One card per atom (see the module doc). Every source is optional; missing parts stay empty."""
    atoms = [int(a) for a in atoms]
    tokens: dict[int, dict[str, list[str]]] = {}
    if backbone is not None and W_dec is not None and atoms:
        for a, t in zip(atoms, logit_lens_tokens(backbone, np.asarray(W_dec)[atoms], n_tokens)):
            tokens[a] = t
    texts_by_atom: dict[int, list[dict[str, Any]]] = {a: [] for a in atoms}
    if top_acts is not None and len(top_acts):
        sub = top_acts[top_acts["atom"].isin(atoms)].sort_values(
            ["atom", "activation"], ascending=[True, False]
        )
        sub = sub.groupby("atom", sort=False).head(n_texts)
        lookup = text_lookup(sub["id"].astype(str).tolist()) if text_lookup is not None else {}
        for a, i, v in zip(sub["atom"], sub["id"], sub["activation"]):
            texts_by_atom[int(a)].append(
                {"id": str(i), "activation": float(v), "text": lookup.get(str(i), "")}
            )
    labels_by_atom: dict[int, list[dict[str, Any]]] = {a: [] for a in atoms}
    if atom_map is not None and len(atom_map):
        sub = atom_map[atom_map["atom"].isin(atoms)].copy()
        sub["_abs"] = sub["score"].abs()
        sub = (
            sub.sort_values(["atom", "_abs"], ascending=[True, False])
            .groupby("atom", sort=False)
            .head(n_labels)
        )
        cols = [
            c
            for c in (
                "label",
                "category",
                "score",
                "r",
                "dmu",
                "cohens_d",
                "freq_pos",
                "freq_neg",
                "r_heldout",
            )
            if c in sub.columns
        ]
        for rec in sub[["atom", *cols]].to_dict("records"):
            a = int(rec.pop("atom"))
            labels_by_atom[a].append(
                {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in rec.items()}
            )
    return [
        {
            "atom": a,
            "tokens": tokens.get(a, {}).get("top", []),
            "neg_tokens": tokens.get(a, {}).get("bottom", []),
            "top_texts": texts_by_atom[a],
            "labels": labels_by_atom[a],
        }
        for a in atoms
    ]


def describe(card: dict[str, Any], label: str = "", reasoning: str = "", n_tokens: int = 8) -> str:
    """The de-duplication text: ``Label: … Reasoning: … Tokens: …``."""
    toks = ", ".join(card.get("tokens", [])[:n_tokens])
    return f"Label: {label} Reasoning: {reasoning} Tokens: {toks}"
