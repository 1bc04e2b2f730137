"""What the service computes (the worker thread that owns the model is in :mod:`safesteer.serve.worker`).

Hook state is global to a model (``Backbone.steer`` registers a forward hook on a block), so the
model is only ever used by one thread at a time: every request becomes a job on
:class:`ModelWorker`, which runs jobs one after another while holding :attr:`Engine.lock` (other
code that wants to use the same backbone while a server runs — tests, an admin shell — takes that
lock too). A job installs its policy's hook, computes, and removes the hook before the next job
starts, so one request's steering can never leak into another's output.

Per request, all texts are batched together (in chunks of ``max_batch_texts``). With
``batch_window_ms > 0`` the worker also coalesces ``/v1/score`` jobs that share a policy version,
α and probe list into one forward pass. Coalescing changes the padding of a batch, which can move
results by float rounding (~1e-7); with the default window of 0 every request's output is
bit-identical to the same request run alone.

Conditional steering: the condition probe reads the *unsteered* vector at its layer, pooled at its
position (``mean`` of the raw text; ``prompt_end`` of the chat-rendered prompt, as the behaviour
evaluation does); the steering is then applied by the evaluation's own implementation,
:func:`safesteer.steering.condition.conditional`, with those per-row decisions: rows at or below
the threshold are left untouched inside the batch (``torch.where`` on the row), so their output is
bit-for-bit the unsteered output.

Beside it: :mod:`~safesteer.serve.limits` (request limits), :mod:`~safesteer.serve.plan` (what one
request asked for), :mod:`~safesteer.serve.forward` (the chunked, steered forward pass) and
:mod:`~safesteer.serve.sae_info` (sizes and layer of a served SAE).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from safesteer.errors import SafesteerError
from safesteer.evaluate.choice import answer_logprobs, answer_tokens, causal_prompts, choice_probs
from safesteer.serve.forward import condition_rows, json_floats, probe_layers, run_chunks
from safesteer.serve.limits import Limits, check_fits
from safesteer.serve.plan import Plan
from safesteer.serve.policies import Policy, PolicyRecord, policy_direction
from safesteer.serve.sae_info import sae_dims, sae_layer_of  # noqa: F401  (sae_layer_of: the old import path)
from safesteer.serve.worker import ModelWorker, Overloaded  # noqa: F401  (re-exported: the old import path)
from safesteer.steering import ClampEdit, DirectionSet, steering_vector
from safesteer.steering.condition import Condition
from safesteer.steering.conversation import GATE_WINDOW
from safesteer.steering.gates import stack_features


@dataclass(frozen=True)
class ServedProbe:
    """A probe the server can score with: ``probe.predict_proba`` on the vector at ``layer`` pooled at
    ``position`` (``mean`` for /v1/score; a condition may read ``prompt_end``); a gate reading several
    layers (:class:`GateProbe` of a ``stacked`` gate) scores their vectors side by side."""

    name: str
    probe: Any
    layer: int
    position: str = "mean"


class GateProbe:
    """A :class:`~safesteer.steering.condition.Condition` (the behaviour study's harm gate, of any
    registered kind) served as a probe. ``d`` is the size of one layer's vectors; a gate reading
    several ``layers`` (``stacked``) scores their pooled vectors side by side."""

    def __init__(self, condition: Any):
        self.condition = condition
        self.layers = tuple(condition.layers)
        self.d = condition.d // len(self.layers)
        self.meta = {"layer": condition.layer, "position": condition.position, "label": condition.name}
        if len(self.layers) > 1:
            self.meta["layers"] = list(self.layers)

    def decision_function(self, H: np.ndarray) -> np.ndarray:
        return self.condition.score(H)

    def predict_proba(self, H: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision_function(H)))


def served_probes(
    probes: Mapping[str, Any] | Sequence[ServedProbe] | None, backbone: Any, default_layer: int | None = None
) -> dict[str, ServedProbe]:
    """Normalise probes: ``ServedProbe``s, ``name → ServedProbe``, ``name → (probe, layer)`` or
    ``name → probe`` (layer from ``probe.meta["layer"]`` or ``default_layer``)."""
    out: dict[str, ServedProbe] = {}
    if not probes:
        return out
    items = probes.items() if isinstance(probes, Mapping) else ((p.name, p) for p in probes)
    for name, value in items:
        if isinstance(value, ServedProbe):
            sp = value if value.name == name else ServedProbe(name, value.probe, value.layer, value.position)
        elif isinstance(value, tuple):
            sp = ServedProbe(name, value[0], int(value[1]))
        else:
            layer = (getattr(value, "meta", None) or {}).get("layer", default_layer)
            if layer is None:
                raise SafesteerError(f"probe '{name}' does not record its layer; give one (--probe-layer)")
            sp = ServedProbe(name, value, int(layer))
        backbone.check_layer(sp.layer)
        d = getattr(sp.probe, "d", None)
        if d is not None and int(d) != backbone.d_model:
            raise SafesteerError(
                f"probe '{name}' expects vectors of size {d} but the model has d_model {backbone.d_model}"
            )
        out[name] = sp
    return out


@dataclass(frozen=True)
class CompiledPolicy:
    """The runtime form of a policy: immutable tensors and objects, shared read-only by jobs."""

    layer: int
    vector: torch.Tensor | None
    """Unit steering vector (−direction), float32, on the model's device; None for clamp-only policies."""
    clamps: tuple[ClampEdit, ...]
    condition: ServedProbe | None
    threshold: float
    alpha_lo: float
    alpha_hi: float
    score_threshold: float | None = None
    """Steer when the condition probe's logit exceeds this (else: when P > ``threshold``)."""
    position: str = "mean"
    """Where the condition probe reads (``mean`` of the raw text, ``prompt_end`` of the chat prompt …)."""
    where: str = "all"
    """Which positions are steered: ``all``, or the ``prompt``'s only (the answer tokens run unsteered)."""
    window: int = GATE_WINDOW
    """In a chat, the last ``window`` user turns the condition reads (:func:`gate_text`)."""
    segments: bool = False
    """The condition also reads each piece of the text alone and fires when any piece does
    (:mod:`safesteer.steering.segments`; the study's segmented gate)."""

    def gate(self) -> Any:
        """The condition as a :class:`safesteer.steering.condition.Condition` (logit threshold)."""
        assert self.condition is not None
        probe = self.condition.probe
        t = (
            self.score_threshold
            if self.score_threshold is not None
            else (
                math.inf
                if self.threshold >= 1
                else -math.inf
                if self.threshold <= 0
                else math.log(self.threshold / (1 - self.threshold))
            )
        )
        if isinstance(probe, GateProbe):  # a gate of any kind: its own scoring, this policy's threshold
            return probe.condition.with_threshold(
                t, position=self.position, name=self.condition.name, layer=self.condition.layer
            )
        w, b = getattr(probe, "w", None), getattr(probe, "b", None)
        if w is None or b is None:  # a probe without raw-space weights: the decisions come from predict_proba
            return Condition(np.zeros(1), 0.0, self.condition.layer, self.position, t, self.condition.name)
        return Condition(np.asarray(w), float(b), self.condition.layer, self.position, t, self.condition.name)

    def edit(self, alpha: float, rows: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``h → clamps(h) + α·v`` (only on ``rows`` of the batch when given; others are returned as is)."""
        delta = None if self.vector is None else float(alpha) * self.vector
        clamps = self.clamps

        def apply(h: torch.Tensor) -> torch.Tensor:
            new = h
            for c in clamps:
                new = c(new)
            if delta is not None:
                new = new + delta.to(h.dtype)
            if rows is not None:
                mask = rows.to(h.device).view(-1, *([1] * (h.dim() - 1)))
                new = torch.where(mask, new, h)
            return new

        return apply


class Engine:
    """The loaded model with its directions, probes and SAE, and the computations of each endpoint."""

    def __init__(
        self,
        backbone: Any,
        directions: DirectionSet | None = None,
        probes: Mapping[str, ServedProbe] | None = None,
        sae: Any = None,
        sae_layer: int | None = None,
        limits: Limits | None = None,
    ):
        self.backbone = backbone
        self.directions = directions if directions is not None else DirectionSet()
        self.probes: dict[str, ServedProbe] = dict(probes or {})
        self.sae = sae
        self.sae_layer = sae_layer
        self.limits = limits or Limits()
        self.lock = threading.RLock()
        """Held while the model runs; take it to use the backbone beside a running server."""
        if self.directions.d_model is not None and self.directions.d_model != backbone.d_model:
            raise SafesteerError(
                f"directions have size {self.directions.d_model} but the model has d_model "
                f"{backbone.d_model}; build them for this model"
            )
        if sae is not None:
            d_in = sae_dims(sae)[0]
            if d_in is not None and d_in != backbone.d_model:
                raise SafesteerError(
                    f"the SAE reads vectors of size {d_in} but the model has d_model {backbone.d_model}"
                )
        self._answers = None
        self._answers_error: str | None = None
        try:
            self._answers = answer_tokens(backbone.tokenizer)
        except SafesteerError as exc:
            self._answers_error = exc.message

    # ------------------------------------------------------------ compiling
    def compile(self, policy: Policy) -> CompiledPolicy:
        """Check ``policy`` against what is loaded; raise SafesteerError with the reason if it cannot be
        served."""
        lim = self.limits.max_abs_alpha
        lo = -lim if policy.alpha_min is None else policy.alpha_min
        hi = lim if policy.alpha_max is None else policy.alpha_max
        if lo < -lim or hi > lim:
            raise SafesteerError(f"alpha bounds [{lo}, {hi}] exceed the server's limit ±{lim}")
        if not lo <= policy.alpha <= hi:
            raise SafesteerError(f"alpha {policy.alpha} is out of bounds [{lo}, {hi}]")
        vector = None
        layer = policy.layer
        if policy.directions:
            layer, vec = policy_direction(
                policy.directions, [self._direction(n) for n in policy.directions], layer
            )
            vector = torch.as_tensor(steering_vector(vec)).to(torch.float32).to(self.backbone.device)
        if layer is None:
            if self.sae_layer is None:
                raise SafesteerError("a clamp-only policy needs 'layer'")
            layer = self.sae_layer
        try:
            layer = self.backbone.check_layer(layer)
        except SafesteerError as exc:
            raise SafesteerError(exc.message) from None
        clamps: list[ClampEdit] = []
        if policy.clamps:
            if self.sae is None:
                raise SafesteerError(
                    "this policy clamps SAE atoms but the server has no SAE; start it with --sae"
                )
            if self.sae_layer is not None and layer != self.sae_layer:
                raise SafesteerError(
                    f"the SAE was trained on layer {self.sae_layer}; a policy with clamps must steer "
                    f"that layer, not {layer}"
                )
            d_sae = sae_dims(self.sae)[1]
            for c in policy.clamps:
                if d_sae is not None and max(c.atoms) >= d_sae:
                    raise SafesteerError(
                        f"atom {max(c.atoms)} is out of range 0..{d_sae - 1} for the served SAE"
                    )
                clamps.append(ClampEdit(self.sae, c.atoms, lam=c.lam, mode=c.mode, floor=c.floor))
        cond = None
        threshold, score_threshold, position = 0.0, None, "mean"
        if policy.condition is not None:
            cond = self._probe(policy.condition.probe)
            position = policy.condition.position or cond.position
            if policy.condition.score_threshold is not None:
                if getattr(cond.probe, "decision_function", None) is None:
                    raise SafesteerError(
                        f"probe '{cond.name}' gives no logits; use 'threshold' (a probability) instead "
                        "of 'score_threshold'"
                    )
                score_threshold = float(policy.condition.score_threshold)
            else:
                threshold = float(policy.condition.threshold)
        return CompiledPolicy(
            layer,
            vector,
            tuple(clamps),
            cond,
            threshold,
            float(lo),
            float(hi),
            score_threshold,
            position,
            policy.positions,
            policy.condition.window if policy.condition is not None else GATE_WINDOW,
            bool(policy.condition is not None and policy.condition.segments),
        )

    def _direction(self, name: str):
        if name not in self.directions:
            known = ", ".join(self.directions.names()) or "none (start the server with --directions)"
            raise SafesteerError(f"unknown direction '{name}'; loaded directions: {known}")
        return self.directions[name]

    def _probe(self, name: str) -> ServedProbe:
        if name not in self.probes:
            known = ", ".join(self.probes) or "none (start the server with --probes)"
            raise SafesteerError(f"unknown probe '{name}'; loaded probes: {known}")
        return self.probes[name]

    def resolve_alpha(self, record: PolicyRecord, requested: float | None) -> float:
        """The request's α (or the policy's) after checking the policy's bounds."""
        if requested is None:
            return float(record.policy.alpha)
        cp: CompiledPolicy = record.runtime
        if not (math.isfinite(requested) and cp.alpha_lo <= requested <= cp.alpha_hi):
            raise SafesteerError(
                f"alpha {requested} is out of bounds [{cp.alpha_lo:g}, {cp.alpha_hi:g}] for policy "
                f"'{record.name}'"
            )
        return float(requested)

    # ----------------------------------------------------------- primitives
    def condition_rows(
        self, cp: CompiledPolicy, texts: Sequence[str], extra_layers: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """(P(condition), rows to steer, unsteered pooled vectors):
        :func:`safesteer.serve.forward.condition_rows`."""
        return condition_rows(self.backbone, cp, texts, extra_layers)

    def _run_chunks(
        self, texts: Sequence[str], plan: Plan, fn: Callable[..., None], extra_layers: Sequence[int] = ()
    ) -> dict[str, Any]:
        """:func:`safesteer.serve.forward.run_chunks` with this server's ``max_batch_texts``."""
        return run_chunks(self.backbone, texts, plan, fn, self.limits.max_batch_texts, extra_layers)

    # ------------------------------------------------------------- endpoints
    def score(self, texts: Sequence[str], probe_names: Sequence[str], plan: Plan) -> dict[str, Any]:
        """Probe probabilities for ``texts`` (under the plan's steering when it has a policy)."""
        probes = [self._probe(n) for n in probe_names]
        layers = sorted({l for p in probes for l in probe_layers(p)})
        probs = {p.name: np.zeros(len(texts)) for p in probes}

        def run(chunk, s, e, rows, H0, active):
            if not active:  # nothing steered: the condition pass already holds the unsteered vectors
                H = (
                    {l: H0[l] for l in layers}
                    if H0
                    else self.backbone.pooled(chunk, layers, batch_size=len(chunk))
                )
            else:
                Hs = self.backbone.pooled(chunk, layers, batch_size=len(chunk))
                H = Hs if rows is None else {l: np.where(rows[:, None], Hs[l], H0[l]) for l in layers}
            for p in probes:
                probs[p.name][s:e] = p.probe.predict_proba(stack_features(H, probe_layers(p)))

        common = self._run_chunks(texts, plan, run, layers)
        return {"probabilities": {k: json_floats(v) for k, v in probs.items()}, **common}

    def choice(self, texts: Sequence[str], prompt_type: str, plan: Plan) -> dict[str, Any]:
        """Forced-choice P(Yes)/P(No) (see :mod:`safesteer.evaluate.choice`) under the plan."""
        if self._answers is None:
            raise SafesteerError(f"forced choice is unavailable for this model: {self._answers_error}")
        p_yes, p_no, mass = (np.zeros(len(texts)) for _ in range(3))

        def run(chunk, s, e, rows, H0, active):
            lp = answer_logprobs(self.backbone, chunk, prompt_type, batch_size=len(chunk))
            p_yes[s:e], p_no[s:e], mass[s:e] = choice_probs(lp, self._answers)

        common = self._run_chunks(texts, plan, run)
        return {
            "p_yes": json_floats(p_yes),
            "p_no": json_floats(p_no),
            "answer_mass": json_floats(mass),
            **common,
        }

    def generate(
        self,
        prompts: Sequence[str],
        plan: Plan,
        max_new_tokens: int,
        do_sample: bool = False,
        seed: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        chat: bool = True,
    ) -> dict[str, Any]:
        """Completions of ``prompts`` (chat-templated when ``chat``) under the plan (causal models only)."""
        if self.backbone.kind != "causal":
            raise SafesteerError("generation needs a causal LM; this server runs a masked LM")
        outs: list[str] = []
        kwargs: dict[str, Any] = {}
        if do_sample:
            if temperature is not None:
                kwargs["temperature"] = float(temperature)
            if top_p is not None:
                kwargs["top_p"] = float(top_p)

        def run(chunk, s, e, rows, H0, active):
            rendered = [self.backbone.chat_prompt(p) for p in chunk] if chat else chunk
            self._check_context(rendered, max_new_tokens)
            outs.extend(
                self.backbone.generate(
                    rendered, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed + s, **kwargs
                )
            )

        common = self._run_chunks(prompts, plan, run)
        return {"completions": outs, **common}

    def _check_context(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """Refuse prompts that, with the new tokens, do not fit the served context (``backbone.max_length``:
        ``safesteer serve --max-model-len``, at most the model's positions) — never cut them silently."""
        check_context(self.backbone, max(n_tokens(self.backbone, p) for p in prompts), max_new_tokens)

    def check_inputs(self, texts: Sequence[str], prompt_type: str | None = None) -> None:
        """ContextTooLong when a text does not fit the served context as the route reads it: ``/v1/score``
        the text itself (special tokens included), ``/v1/choice`` (``prompt_type``) the forced-choice
        prompt around it on a causal LM — never read a text cut short. Checked per request, before
        requests are batched together, so a long one does not fail its neighbours."""
        bb = self.backbone
        if prompt_type is not None and bb.kind == "causal":
            n = max(n_tokens(bb, p) for p in causal_prompts(bb, list(texts), prompt_type))
        else:
            n = max(len(bb.tokenizer(str(t))["input_ids"]) for t in texts)
        check_context(bb, n, 0, what="a text, as this route reads it,")

    @property
    def can_choose(self) -> bool:
        return self._answers is not None


def n_tokens(backbone: Any, text: str) -> int:
    """Tokens of an already rendered prompt, uncut."""
    return len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_context(backbone: Any, n_prompt: int, max_new_tokens: int, what: str = "the prompt") -> None:
    """ContextTooLong unless a prompt of ``n_prompt`` tokens and ``max_new_tokens`` more fit the served
    context of the HF engine (the backbone's ``max_length``): :func:`~safesteer.serve.limits.check_fits`."""
    check_fits(n_prompt, max_new_tokens, int(backbone.max_length), what)
