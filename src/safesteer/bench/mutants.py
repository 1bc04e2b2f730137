"""Summarise a mutmut 3 run (``mutants/**.py.meta``) as killed / survived per module, in Markdown.

Usage:
- ``python bench/mutants.py [mutants-folder] > bench/mutants.md`` (``make mutants`` does it);
- ``python bench/mutants.py sample N [--seed S] [--module SUBSTRING ...]`` prints a seeded random sample of
  at most N mutant names per module (after a ``mutmut run`` generated them), for ``mutmut run NAMES``
  when checking every mutant does not fit the time at hand. Modules checked in part get a 95% Wilson
  interval beside their score: the sample's score estimates the module's;
- ``python bench/mutants.py prepare PASS DIR`` copies ``src/``, ``tests/`` and ``pyproject.toml`` to DIR with
  ``[tool.mutmut]`` replaced by ``[tool.safesteer.mutants-PASS]`` (mutmut reads its settings from the
  working folder only): a second pass with other tests, e.g. the study's integration tests.

Survivors are listed by mutant name; ``mutmut show NAME`` prints the diff of one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import tomllib
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


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (n > 0)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _metas(root: str) -> list[tuple[str, dict]]:
    out = []
    for meta in sorted(Path(root).rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            out.append((str(meta.relative_to(root))[: -len(".meta")].removeprefix("src/"), codes))
    return out


def summarise(root: str) -> str:
    """The Markdown table (one row per module) and the list of surviving mutant names."""
    lines = [
        "| module | mutants | killed | survived | timeout | no tests | not checked | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    survivors: list[str] = []
    unchecked: list[str] = []
    for mod, codes in _metas(root):
        c = Counter(STATUS.get(v, f"exit {v}") for v in codes.values())
        caught = c["killed"] + c["timeout"]
        checked = caught + c["survived"]
        if c["not checked"] == len(codes):
            unchecked.append(mod)
            continue
        score = f"{100.0 * caught / checked:.1f}%" if checked else "–"
        if checked and c["not checked"]:
            lo, hi = wilson(caught, checked)
            score += f" [{100 * lo:.0f}, {100 * hi:.0f}] (sample of {checked})"
        lines.append(
            f"| {mod} | {len(codes)} | {c['killed']} | {c['survived']} | {c['timeout']} | "
            f"{c['no tests']} | {c['not checked']} | {score} |"
        )
        survivors += [f"- `{k}`" for k, v in sorted(codes.items()) if v == 0]
    body = "# Mutation testing (mutmut)\n\n" + "\n".join(lines)
    if unchecked:
        body += f"\n\nNot checked in this run: {', '.join(unchecked)}."
    return body + f"\n\n## Survivors ({len(survivors)})\n\n" + ("\n".join(survivors) if survivors else "none")


def sample(root: str, per_module: int, seed: int = 0, modules: list[str] | None = None) -> list[str]:
    """At most ``per_module`` mutant names of each module (whose path contains one of ``modules``, if
    given), chosen by a seeded hash of the name: the same names for the same mutants and seed."""

    def rank(name: str) -> str:
        return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).hexdigest()

    names: list[str] = []
    for mod, codes in _metas(root):
        if modules and not any(m in mod for m in modules):
            continue
        names += sorted(sorted(codes), key=rank)[:per_module]
    return names


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"unsupported TOML value {v!r}")


def prepare(pass_name: str, dest: str, root: str = ".") -> Path:
    """A copy of the tree in ``dest`` whose ``[tool.mutmut]`` is ``[tool.safesteer.mutants-<pass_name>]``."""
    src = Path(root)
    text = (src / "pyproject.toml").read_text()
    table = tomllib.loads(text).get("tool", {}).get("safesteer", {}).get(f"mutants-{pass_name}")
    if table is None:
        raise SystemExit(f"error: pyproject.toml has no [tool.safesteer.mutants-{pass_name}] table")
    body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in table.items())
    # drop the main pass's table (up to the next table header) and put this pass's in its place
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[)", "", text)
    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sub in ("src", "tests"):
        shutil.copytree(src / sub, out / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "pyproject.toml").write_text(text.rstrip() + "\n\n[tool.mutmut]\n" + body + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["prepare"] and len(argv) == 3:
        print(prepare(argv[1], argv[2]))
        return 0
    if argv[:1] == ["sample"]:
        ap = argparse.ArgumentParser(prog="mutants.py sample")
        ap.add_argument("n", type=int)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--module", nargs="*", default=None)
        ap.add_argument("--root", default="mutants")
        a = ap.parse_args(argv[1:])
        if not _metas(a.root):
            print(
                f"no mutmut mutants under {a.root}/; run `mutmut run` once to generate them", file=sys.stderr
            )
            return 2
        print("\n".join(sample(a.root, a.n, a.seed, a.module)))
        return 0
    root = (argv or ["mutants"])[0]
    if not _metas(root):
        print(f"no mutmut results under {root}/; run `make mutants` first", file=sys.stderr)
        return 2
    print(summarise(root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
