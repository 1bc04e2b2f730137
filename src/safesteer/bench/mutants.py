"""Summarise a mutmut 3 run (``mutants/**.py.meta``) as killed / survived per module, in Markdown.

Usage: ``python bench/mutants.py [mutants-folder] > bench/mutants.md`` (``make mutants`` does it).
Survivors are listed by mutant name; ``mutmut show NAME`` prints the diff of one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    -11: "segfault",
    None: "not checked",
}


def main(argv: list[str] | None = None) -> int:
    root = (argv or ["mutants"])[0]
    metas = sorted(Path(root).rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/; run `make mutants` first", file=sys.stderr)
        return 2
    lines = [
        "| module | mutants | killed | survived | timeout | no tests | not checked | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        c = Counter(STATUS.get(v, f"exit {v}") for v in codes.values())
        checked = c["killed"] + c["survived"] + c["timeout"]
        score = f"{100.0 * (c['killed'] + c['timeout']) / checked:.1f}%" if checked else "–"
        mod = str(meta.relative_to(root))[: -len(".meta")].removeprefix("src/")
        lines.append(
            f"| {mod} | {len(codes)} | {c['killed']} | {c['survived']} | {c['timeout']} | "
            f"{c['no tests']} | {c['not checked']} | {score} |"
        )
        survivors += [f"- `{k}`" for k, v in sorted(codes.items()) if v == 0]
    print("# Mutation testing (mutmut)\n")
    print("\n".join(lines))
    print(f"\n## Survivors ({len(survivors)})\n")
    print("\n".join(survivors) if survivors else "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
