"""Dataset definitions, one module per family; :data:`SPECS` lists them all in study order."""

from __future__ import annotations

from safesteer.data.records import DatasetSpec
from safesteer.data.sets import bias, contrast, emotion, harm, lookalikes, qa, text, toxicity

SPECS: tuple[DatasetSpec, ...] = (
    # the original study's seven
    harm.BEAVERTAILS,
    toxicity.CIVIL_COMMENTS,
    emotion.GO_EMOTIONS_SPEC,
    emotion.EMPATHETIC_DIALOGUES,
    bias.CROWS_PAIRS,
    bias.STEREOSET,
    text.WIKIPEDIA,
    # safety sets the evaluation needs
    harm.ADVBENCH,
    harm.XSTEST,
    harm.DONOTANSWER,
    toxicity.REALTOXICITYPROMPTS,
    toxicity.TOXIGEN,
    harm.HH_RLHF_HARMLESS,
    toxicity.BIAS_MADLIBS,
    # ordinary user questions (harmless requests for the harm gate)
    *qa.SPECS,
    # written for safesteer (shipped in the package): harmful requests + harmless look-alikes; benign tasks
    contrast.CONTRAST,
    contrast.TASKS,
    # written for safesteer: benign look-alikes on sensitive topics; short everyday chat turns
    lookalikes.LOOKALIKES,
    lookalikes.CHAT_TURNS,
)

_ALL = {s.name for m in (bias, contrast, emotion, harm, lookalikes, qa, text, toxicity) for s in m.SPECS}
assert _ALL == {s.name for s in SPECS}, "every family module's SPECS must be registered"
