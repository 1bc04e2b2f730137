"""One home for benchmarks: every bench/*.py is a shim over safesteer.bench.<same name>, which has a
main()."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scripts_are_shims_over_the_package():
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert {p.stem for p in scripts} >= {"extract", "sae", "serve_load", "steer_eval"}
    for path in scripts:
        tree = ast.parse(path.read_text())
        defs = [
            n.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        assert not defs, f"{path.name} defines {defs}: benchmark code belongs in src/safesteer/bench/"
        froms = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert f"safesteer.bench.{path.stem}" in froms, path.name
        assert callable(importlib.import_module(f"safesteer.bench.{path.stem}").main)
