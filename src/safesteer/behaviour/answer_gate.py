"""The answer-time gate: a disguised request shows itself in the model's own compliant start.

After the first ``k`` greedy tokens of the *unsteered* answer, a gate of the prompt gate's kind and
settings reads the residual at the gate layer(s) pooled over those answer tokens; when it fires on a
prompt the prompt gate let through, the answer is **regenerated with the policy's steering** (the
``prompt`` positions of the policy are already in the KV cache unsteered, so continuing would need a
new prefill anyway; regenerating gives exactly the answer the prompt gate would have produced had it
fired, costs ``k`` wasted tokens plus one prefill on the rows it catches, and leaves every other row
bit-identical). So the policy's decision is ``prompt gate OR answer gate``.

It is fitted on unsteered answers to train rows of every group (direct requests, wrapped ones,
conversations), calibrated on harmless val rows at ``answer_gate_fpr``; like the prompt gate, two
more copies are fitted without each fold of jailbreak families, so a family is scored by an answer
gate that never saw it. :func:`generate_with_answer_gate` is the mechanism itself (what a server
runs), checked against the recombined answers of the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from safesteer.behaviour.attacks import FAMILY_FOLDS, family_fold, family_of
from safesteer.behaviour.checkpoint import step_key
from safesteer.behaviour.context import Run, per_group
from safesteer.evaluate.refusal import Answers, generate
from safesteer.models.positions import pooled_at
from safesteer.steering.condition import Condition, gate_flags, threshold_for_fpr
from safesteer.steering.conversation import GATE_WINDOW, gate_text
from safesteer.steering.gates import stack_features

ANSWER_GATE_DIR = "answer_gate"


@dataclass
class AnswerGateFit:
    k: int
    layers: list[int]
    gates: dict[str, Condition]  # "all" (deployed), "0", "1", … (without that fold of families)
    val_auroc: float
    key: str
    folds: int = FAMILY_FOLDS  # the family folds (attacks.family_fold)

    def for_group(self, group: str) -> Condition:
        fam = family_of(group)
        k = None if fam is None else str(family_fold(fam, self.folds))
        return self.gates[k] if k in self.gates else self.gates["all"]


def prefixes(bb: Any, answers: Answers, k: int) -> list[str]:
    """The first ``k`` generated tokens of each answer, as text (what the gate reads)."""
    tok = bb.tokenizer
    return [tok.decode(ids[:k], skip_special_tokens=True) for ids in answers.ids]


def answer_features(bb: Any, inputs: Sequence[Any], prefix: Sequence[str], layers: Sequence[int], batch: int):
    """Rows × (d · len(layers)) pooled over the answer prefix (NaN rows where it is empty)."""
    keep = [i for i, p in enumerate(prefix) if p.strip()]
    d = bb.d_model * len(layers)
    out = np.full((len(prefix), d), np.nan, dtype=np.float32)
    if keep:
        per = pooled_at(
            bb, [inputs[i] for i in keep], layers, ["answer"], batch, answers=[prefix[i] for i in keep]
        )
        out[keep] = stack_features(per["answer"], tuple(layers))
    return out


def scores(gate: Condition, H: np.ndarray) -> np.ndarray:
    """Gate scores, −inf where there is no answer to read."""
    s = np.full(len(H), -np.inf)
    ok = np.isfinite(H).all(axis=1)
    if ok.any():
        s[ok] = gate.score(H[ok])
    return s


def fit_answer_gate(run: Run, f: Any, g: Any) -> AnswerGateFit | None:
    """The answer-time gate step (None when ``answer_gate_tokens`` is 0)."""
    from safesteer.behaviour.gate import _fit, auroc  # the prompt gate's kind and settings

    cfg, P, bb = run.cfg, f.prompts, run.bb
    k = int(cfg.answer_gate_tokens)
    if k <= 0:
        return None
    key = step_key(run.base_key, "answer_gate", f.key, g.key)  # g.key carries the family folds
    layers = list(g.gate.layers)
    n = int(cfg.n_answer_gate)

    def pick(split: str, harmful: int, m: int) -> list[int]:
        return [i for i in per_group(P, split, harmful, 4 * m) if not P.aug[i]][:m]

    def compute() -> AnswerGateFit:
        tr = pick("train", 1, n) + pick("train", 0, n)
        va = pick("val", 1, n // 2) + pick("val", 0, n // 2)
        rows = tr + va
        inputs = P.inputs(rows)
        ans = generate(bb, inputs, k, cfg.batch_size, stop_on_refusal=False)
        H = answer_features(bb, inputs, prefixes(bb, ans, k), layers, cfg.batch_size)
        y = P.harmful[rows]
        is_tr = np.array([i < len(tr) for i in range(len(rows))])
        ok = np.isfinite(H).all(axis=1)
        fold = np.array(
            [
                -2 if family_of(P.group[i]) is None else family_fold(family_of(P.group[i]), cfg.family_folds)
                for i in rows
            ]
        )
        gates: dict[str, Condition] = {}
        folds = [(str(k), k) for k in sorted(set(fold.tolist()) - {-2})]
        for name, out_fold in [("all", None), *folds]:
            m = is_tr & ok & (fold != out_fold if out_fold is not None else True)
            if out_fold is not None and not (fold == out_fold).any():
                continue
            gate = _fit(H[m], y[m], None, g.gate.meta, run.seed)  # class-balanced, as the prompt gate
            neg = ~is_tr & ok & (y == 0) & (fold != out_fold if out_fold is not None else True)
            t = threshold_for_fpr(gate.score(H[neg]), cfg.answer_gate_fpr)
            # its layers are the prompt gate's; it reads them pooled over the answer's first k tokens
            gates[name] = gate.with_threshold(
                t,
                layers=tuple(layers),
                layer=max(layers),
                position=g.gate.position,
                name=f"answer_gate_{name}",
            )
            gates[name].save(run.out / ANSWER_GATE_DIR / name)
        vm = ~is_tr & ok
        val_auc = float(auroc(gates["all"].score(H[vm]), y[vm]))
        run.say(
            f"answer-time gate after {k} tokens: val AUROC {val_auc:.3f} ({int(is_tr.sum())} train answers)"
        )
        return AnswerGateFit(k, layers, gates, val_auc, key, cfg.family_folds)

    def save(a: AnswerGateFit):
        data = {"k": a.k, "layers": a.layers, "names": sorted(a.gates), "val_auroc": a.val_auroc}
        return data | ({"folds": a.folds} if a.folds != FAMILY_FOLDS else {}), None

    def load(data, _):
        gates = {nm: Condition.load(run.out / ANSWER_GATE_DIR / nm) for nm in data["names"]}
        folds = int(data.get("folds", FAMILY_FOLDS))
        return AnswerGateFit(
            int(data["k"]), list(data["layers"]), gates, float(data["val_auroc"]), key, folds
        )

    return run.cached("answer_gate", key, compute, save, load)


def generate_with_answer_gate(
    bb: Any,
    inputs: Sequence[Any],
    prompt_gate: Condition,
    answer_gate: Condition,
    intervention: Any,
    k: int,
    max_new_tokens: int,
    batch_size: int = 32,
    window: int = GATE_WINDOW,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The mechanism as the chat endpoint runs it: the prompt gate decides on each chat's requests
    (:func:`~safesteer.steering.conversation.gate_text`) and the flagged ones are answered steered;
    on the others the answer gate reads the first ``k`` tokens and, where it fires, the answer is
    regenerated with the steering on. Returns (answers, prompt flags, answer flags)."""
    pflags = gate_flags(bb, prompt_gate, [gate_text(x, window) for x in inputs], batch_size)
    texts = [""] * len(inputs)
    aflags = np.zeros(len(inputs), dtype=bool)
    rest = [i for i in range(len(inputs)) if not pflags[i]]
    if rest:
        first = generate(bb, [inputs[i] for i in rest], max_new_tokens, batch_size)
        for i, t in zip(rest, first.texts):
            texts[i] = t
        H = answer_features(
            bb, [inputs[i] for i in rest], prefixes(bb, first, k), answer_gate.layers, batch_size
        )
        aflags[np.asarray(rest)[scores(answer_gate, H) > answer_gate.threshold]] = True
    steer = list(np.flatnonzero(pflags | aflags))
    if steer:
        with intervention.apply(bb):
            again = generate(bb, [inputs[i] for i in steer], max_new_tokens, batch_size)
        for i, t in zip(steer, again.texts):
            texts[i] = t
    return texts, np.asarray(pflags, dtype=bool), aflags
