"""Counterfactual reframing of the gate's training prompts: the same request in another frame, so
the gate cannot learn "imperative ⇒ harmful" (AdvBench's instructions) or "question ⇒ harmless"
(the QA sets) — it must read what is asked, not how.

* :func:`reframe` — one swap of mood: "How do I X?" ↔ "Explain how to X.", "…how to make Y" → "How
  is Y made?"; other questions wrapped ("Tell me: …"), other instructions asked ("Can you …?").
* :func:`reframe_wide` — a second copy from a wider bank of frames (about 30): the request's verb
  phrase (from "how do I X", "what's the best way to X", "…how to X", an imperative's own verb, or
  a passive "how is Y made?") put into imperatives ("Give me tips for X-ing.", "Walk me through
  X-ing.", "List some ways to X."), questions ("Is there a way to X?", "How would someone X?",
  "Any tips for X-ing?") or passives ("How is Y made?"), the mood swapped; requests without one
  wrapped as :func:`reframe` does. Grammar is rule-based (gerunds, participles, a short list of
  irregular verbs): close enough for augmentation, not for display.

Templates are chosen by a hash of the text, so every machine builds the same copies.
"""

from __future__ import annotations

import hashlib
import re

_TO_IMPERATIVE = ("Tell me: {t}", "Please answer this: {t}", "I need to know: {t}")
_HOW_IMPERATIVE = ("Explain how to {t}.", "Tell me how to {t}.", "Show me how to {t}.")
_HOW_QUESTION = ("How do I {t}?", "How can I {t}?", "What's the best way to {t}?")
_HOW_Q = re.compile(
    r"^how (?:do|can|could|should|would|might) (?:i|we|you|one|someone|people) (.+?)\?*$", re.IGNORECASE
)
_HOW_PASSIVE = re.compile(
    r"^how (is|are|was|were) (.+) (\w+ed|made|built|done|grown|written|taken|stolen|hidden|given)\?*$",
    re.IGNORECASE,
)
_HOW_TO = re.compile(r"\bhow to (.+?)[.!?]*$", re.IGNORECASE)
_TO_QUESTION = ("Can you {t}?", "Could you help me {t}?", "Would you {t}?")
_MAKE = re.compile(
    r"^(?:make|build|create|produce|synthesi[sz]e|manufacture|brew|cook) (?:up )?(.+)$", re.IGNORECASE
)
_QUESTION_WORDS = frozenset(
    "who what when where why how which whose whom is are was were can could do does did will "
    "would should shall may might has have".split()
)


def reframe(text: str) -> str:
    """The same request in the other frame: a question becomes an imperative, an imperative a
    question (templates chosen by hash). Counterfactual augmentation: the gate must not learn
    "imperative ⇒ harmful" from AdvBench-style instructions vs QA-style questions. "How do I X?"
    and "How is X made?" become "Explain how to X." / "Explain how X is made.", and an instruction
    with "how to X" becomes "How do I X?" (with "how to make X", mostly "How is X made?": the same
    request, not only a wrapped one); other
    questions are wrapped ("Tell me: …"), other instructions asked ("Can you …?")."""
    t = " ".join(text.split())
    k = int.from_bytes(hashlib.sha256(f"safesteer-frame|{t}".encode()).digest()[:2], "big") % 3
    m = _HOW_Q.match(t)
    if m:
        return _HOW_IMPERATIVE[k].format(t=m.group(1).rstrip("?. "))
    m = _HOW_PASSIVE.match(t)
    if m:
        return f"Explain how {m.group(2)} {m.group(1).lower()} {m.group(3)}."
    if not t.endswith("?"):
        m = _HOW_TO.search(t)
        if m and m.group(1).strip():
            made = _MAKE.match(m.group(1).strip())
            if (
                made and k != 2
            ):  # "…how to make X." → "How is X made?" (the passive question of the same request)
                return f"How is {made.group(1)} made?"
            return _HOW_QUESTION[k].format(t=m.group(1).strip())
    if t.endswith("?") or t.split(" ", 1)[0].lower() in _QUESTION_WORDS:
        return _TO_IMPERATIVE[k].format(t=t if t.endswith("?") else t + "?")
    if t.split(" ", 1)[0].lower() in ("i", "i'm", "my", "we", "our"):  # a statement of need
        return f"Can you help with this? {t}"
    body = t.rstrip(".!")
    body = body[:1].lower() + body[1:] if body[:2] != body[:2].upper() else body
    return _TO_QUESTION[k].format(t=body)


# --------------------------------------------------------------------------------------- wide bank
_PARTICIPLE = {
    "make": "made",
    "build": "built",
    "write": "written",
    "steal": "stolen",
    "hide": "hidden",
    "get": "gotten",
    "buy": "bought",
    "sell": "sold",
    "grow": "grown",
    "take": "taken",
    "give": "given",
    "break": "broken",
    "do": "done",
    "spread": "spread",
    "send": "sent",
    "find": "found",
    "teach": "taught",
    "run": "run",
    "set": "set",
    "put": "put",
    "keep": "kept",
    "leave": "left",
    "hold": "held",
    "bring": "brought",
    "draw": "drawn",
    "drive": "driven",
    "feed": "fed",
    "fight": "fought",
    "hit": "hit",
    "hurt": "hurt",
    "cut": "cut",
    "shoot": "shot",
    "choose": "chosen",
    "read": "read",
    "tell": "told",
    "sing": "sung",
    "freeze": "frozen",
}
_PASSIVE_BASE = {
    "made": "make",
    "built": "build",
    "done": "do",
    "written": "write",
    "produced": "produce",
    "created": "create",
    "stolen": "steal",
    "hidden": "hide",
    "grown": "grow",
    "cooked": "cook",
    "brewed": "brew",
}
_PASSIVE_VERBS = frozenset(
    "make build write create produce design develop cook synthesize synthesise manufacture brew forge "
    "steal hide plan spread buy sell grow craft draft compose generate prepare bake assemble construct "
    "program code install obtain acquire launder smuggle poison hack".split()
)
_GERUND = {
    "commit": "committing",
    "admit": "admitting",
    "submit": "submitting",
    "omit": "omitting",
    "permit": "permitting",
    "forget": "forgetting",
    "begin": "beginning",
    "control": "controlling",
    "refer": "referring",
    "prefer": "preferring",
    "regret": "regretting",
    "see": "seeing",
    "be": "being",
}
_IMP_VERBS = frozenset(
    "write create develop design give provide explain describe tell show teach outline draft generate "
    "produce make build list suggest compose plan help find instruct publish post share offer recommend "
    "summarize summarise translate compare convert prepare organise organize draw invent construct program "
    "code implement craft propose devise formulate detail demonstrate guide spread sell buy get steal hack "
    "send cook bake brew grow train learn start set install fix repair clean keep stop kill destroy hurt "
    "harm poison attack break obtain acquire synthesize synthesise manufacture forge fake cheat launder "
    "smuggle".split()
)
_NOT_VERB = frozenset(
    "i i'm my we our you your the a an this it there he she they his her their please hey hi".split()
)
_WIDE_QW = _QUESTION_WORDS | frozenset("am isn't aren't don't doesn't".split())
_WIDE_IMP = (
    "Explain how to {x}.",
    "Tell me how to {x}.",
    "Show me how to {x}.",
    "Give me tips for {xing}.",
    "Give me advice on {xing}.",
    "List some ways to {x}.",
    "Describe the best way to {x}.",
    "Walk me through {xing}.",
    "Help me {x}.",
    "I want you to {x}.",
    "Give me step-by-step instructions for {xing}.",
    "{X}.",
)
_WIDE_Q = (
    "How do I {x}?",
    "How can I {x}?",
    "What's the best way to {x}?",
    "Is there a way to {x}?",
    "What are some ways to {x}?",
    "Any tips for {xing}?",
    "How would someone {x}?",
    "What are the steps to {x}?",
    "Can you {x}?",
    "Could you help me {x}?",
    "Where do I start if I want to {x}?",
)
_WIDE_PASSIVE_Q = ("How is {obj} {ed}?", "How are {obj} usually {ed}?")
_WIDE_PASSIVE_I = ("Explain how {obj} is {ed}.", "Describe how {obj} is {ed}.")
_WIDE_WRAP_I = (
    "Tell me: {t}",
    "Please answer this: {t}",
    "I need to know: {t}",
    "Answer this question: {t}",
    "Help me with this question: {t}",
)
_WIDE_WRAP_Q = ("Can you {b}?", "Could you {b}?", "Would you {b}?")
_Q_VP = re.compile(
    r"^(?:how (?:do|can|could|should|would|might|does) (?:i|we|you|one|someone|people|a person)|"
    r"what(?:'s| is) the (?:best|easiest|safest|quickest|fastest|simplest) way to|"
    r"what are (?:some |the )?(?:best )?(?:ways|steps) to|is there (?:a|any) way to|how to|can you|could you|"
    r"would you|will you) (.+?)[?.!]*$",
    re.IGNORECASE,
)
_PASSIVE_MADE = re.compile(r"^how (?:is|are) (.+) (" + "|".join(_PASSIVE_BASE) + r")\?*$", re.IGNORECASE)
_TIPS = re.compile(
    r"^(?:give|offer|share) (?:me|us) (?:some |a few |your )?(?:tips|advice|ideas|suggestions|pointers)\b",
    re.IGNORECASE,
)
_SHORT_CVC = re.compile(r"[^aeiou]*[aeiou][bdgmnprt]")


def _pick(options: tuple[str, ...], text: str, salt: str) -> str:
    return options[
        int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:4], "big") % len(options)
    ]


def _gerund(verb: str) -> str:
    v = verb.lower()
    if v in _GERUND:
        return _GERUND[v]
    if v.endswith("ie"):
        return v[:-2] + "ying"
    if v.endswith("e") and not v.endswith(("ee", "ye", "oe")):
        return v[:-1] + "ing"
    return v + v[-1] + "ing" if len(v) <= 4 and _SHORT_CVC.fullmatch(v) else v + "ing"


def _participle(verb: str) -> str:
    v = verb.lower()
    if v in _PARTICIPLE:
        return _PARTICIPLE[v]
    if v.endswith("e"):
        return v + "d"
    if re.search(r"[^aeiou]y$", v):
        return v[:-1] + "ied"
    return v + v[-1] + "ed" if len(v) <= 4 and _SHORT_CVC.fullmatch(v) else v + "ed"


def verb_phrase(text: str) -> tuple[str | None, bool]:
    """``(verb phrase, is_question)`` of a request: "how do I X?" / "what's the best way to X?" /
    "…how to X" / "How is Y made?" (→ "make Y") / an imperative that opens with a common verb;
    ``(None, is_question)`` when there is none ("What is the capital of Peru?")."""
    t = " ".join(text.split())
    m = _PASSIVE_MADE.match(t)
    if m:
        return f"{_PASSIVE_BASE[m.group(2).lower()]} {m.group(1)}", True
    m = _Q_VP.match(t)
    if m and len(m.group(1).split()) >= 2 and m.group(1).split()[0].lower() not in _WIDE_QW | _NOT_VERB:
        return m.group(1).strip(), True
    if not t.endswith("?"):
        m = _HOW_TO.search(t)
        if m and len(m.group(1).split()) >= 2:
            return m.group(1).strip(), False
        if not _TIPS.match(t) and t.split(" ", 1)[0].lower() in _IMP_VERBS and len(t.split()) >= 3:
            return t.rstrip(".!"), False
    return None, t.endswith("?") or t.split(" ", 1)[0].lower() in _WIDE_QW


def reframe_wide(text: str, salt: str = "safesteer-frame") -> str:
    """The request in a frame of the wide bank (module docstring), the mood swapped."""
    t = " ".join(text.split())
    x, is_question = verb_phrase(t)
    if x is None:
        if is_question:
            return _pick(_WIDE_WRAP_I, t, salt).format(t=t if t.endswith("?") else t + "?")
        if t.split(" ", 1)[0].lower() in ("i", "i'm", "my", "we", "our"):  # a statement of need
            return f"Can you help with this? {t}"
        body = t.rstrip(".!")
        body = body[:1].lower() + body[1:] if body[:2] != body[:2].upper() else body
        return _pick(_WIDE_WRAP_Q, t, salt).format(b=body)
    verb, _, rest = x.partition(" ")
    x = verb.lower() + (" " + rest if rest else "")
    bank = _WIDE_IMP if is_question else _WIDE_Q
    if (
        verb.lower() in _PASSIVE_VERBS
        and rest
        and len(rest.split()) <= 8
        and not rest.lower().startswith(("into ", "to ", "for ", "with ", "on ", "at ", "from "))
    ):
        bank = bank + (_WIDE_PASSIVE_I if is_question else _WIDE_PASSIVE_Q) * 2
    return _pick(bank, t, salt).format(
        x=x,
        xing=_gerund(verb) + (" " + rest if rest else ""),
        X=x[:1].upper() + x[1:],
        obj=rest,
        ed=_participle(verb),
    )
