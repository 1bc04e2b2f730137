"""Package shape: nothing outside ``safesteer.cli`` imports the CLI; no source file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import safesteer

ROOT = Path(safesteer.__file__).resolve().parent
MAX_LINES = 500

OVER_LIMIT_ELSEWHERE: set[str] = set()  # empty since issue #23: every file was split by responsibility


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, text: str | None = None) -> set[str]:
    """Every module ``path`` imports (``text``: its source, if not read from disk)."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    mods: set[str] = set()
    rel = path.relative_to(ROOT).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = ("safesteer",) + rel[: len(rel) - node.level]
                mod = ".".join(base + ((node.module,) if node.module else ()))
            else:
                mod = node.module or ""
            mods.add(mod)
            mods |= {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                mods.add(node.args[0].value)
    return mods


def _is_cli(mod: str) -> bool:
    return mod == "safesteer.cli" or mod.startswith("safesteer.cli.")


# the command-line layer: cli/ and the ``python -m safesteer`` entry point (what torchrun -m runs)
CLI_FILES = ("cli", "__main__.py")


def test_nothing_outside_cli_imports_the_cli():
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _sources()
        if p.relative_to(ROOT).parts[0] not in CLI_FILES
        for m in sorted(_imports(p))
        if _is_cli(m)
    ]
    assert not offenders, "library code must not import safesteer.cli:\n" + "\n".join(offenders)


def test_the_import_walk_sees_cli_imports():
    """The checker itself: absolute, from-, relative and __import__ forms are all caught."""
    where = ROOT / "pipeline" / "some_module.py"  # not written: the text is parsed as if it lived there
    for text in (
        "import safesteer.cli.main\n",
        "from safesteer.cli import main\n",
        "from ..cli import main\n",
        "def f():\n    from safesteer.cli.probes import x\n",
        "__import__('safesteer.cli.sae')\n",
        "from safesteer import cli\n",
    ):
        assert any(_is_cli(m) for m in _imports(where, text)), text
    assert not any(_is_cli(m) for m in _imports(where, "from ..clip import x\nimport safesteer.client\n"))
    assert not any(_is_cli(m) for m in _imports(ROOT / "pipeline" / "runner.py"))


def test_no_source_file_over_500_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _sources()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    offenders = {name: n for name, n in over.items() if name not in OVER_LIMIT_ELSEWHERE}
    assert not offenders, "source files over 500 lines: " + ", ".join(
        f"{k} ({v})" for k, v in sorted(offenders.items())
    )
    stale = sorted(name for name in OVER_LIMIT_ELSEWHERE if sizes.get(name, 0) <= MAX_LINES)
    assert not stale, f"now within the limit, remove from OVER_LIMIT_ELSEWHERE: {', '.join(stale)}"


def _ruff(*args: str):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        import pytest

        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    repo = ROOT.parent.parent
    return subprocess.run([exe, *args, "src", "tests", "bench"], cwd=repo, capture_output=True, text=True)


def test_ruff_format_and_check_are_clean():
    """`make lint` in the test run: the formatter has nothing to change and the linter nothing to say."""
    fmt = _ruff("format", "--check")
    assert fmt.returncode == 0, "run `make format`:\n" + fmt.stdout + fmt.stderr
    lint = _ruff("check")
    assert lint.returncode == 0, "run `make format` (or fix by hand):\n" + lint.stdout + lint.stderr


# ------------------------------------------------------------------------------------- floors
# Each top-level module or package of safesteer sits on one floor; a module may import its own floor
# and the floors below, never a floor above (the pipeline reads like the building: data and models at
# the bottom, the CLI on top).
FLOORS: tuple[tuple[str, ...], ...] = (
    (
        "errors",
        "paths",
        "net",
        "devices",
        "io",
        "progress",
        "layout",
        "distributed",
        "workers",
        "checks",
        "lazy",
    ),
    ("data", "models", "store"),
    ("extract", "sae", "probes", "testing"),
    ("steering", "cartography"),
    ("evaluate",),
    ("behaviour",),
    ("config",),
    ("serve",),
    ("interop",),
    ("pipeline", "bench"),
    ("cli", "__main__", "__init__"),
)
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def _modules() -> dict[str, Path]:
    out = {}
    for p in _sources():
        rel = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(("safesteer",) + (rel[:-1] if rel[-1] == "__init__" else rel))] = p
    return out


def _runtime_imports(path: Path, modules: dict[str, Path], text: str | None = None) -> set[str]:
    """The safesteer modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks aside):
    ``from pkg import mod`` counts as ``pkg.mod``; a module's own parent packages are not counted."""
    tree = ast.parse(path.read_text() if text is None else text)
    hidden = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    rel = path.relative_to(ROOT).with_suffix("").parts
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ("safesteer",) + rel[: len(rel) - node.level]
                mod = ".".join(base + ((node.module,) if node.module else ()))
            else:
                mod = node.module or ""
            names |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names}

    def resolve(m: str) -> str:
        while m and m not in modules:
            m = m.rpartition(".")[0]
        return m

    me = ".".join(("safesteer",) + (rel[:-1] if rel[-1] == "__init__" else rel))
    parents = {me.rsplit(".", k)[0] for k in range(1, me.count(".") + 1)}
    return {
        r
        for n in names
        if n.startswith("safesteer")
        for r in [resolve(n)]
        if r and r != me and r not in parents
    }


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_floor():
    units = {_unit(m) for m in _modules()} | {p.stem for p in ROOT.glob("*.py")}
    assert not units - set(FLOOR), f"put these in FLOORS: {sorted(units - set(FLOOR))}"


def test_no_import_runs_back_up_a_floor():
    modules = _modules()
    up = [
        f"{m} (floor {FLOOR[_unit(m)]}) imports {d} (floor {FLOOR[_unit(d)]})"
        for m, p in modules.items()
        for d in sorted(_runtime_imports(p, modules))
        if FLOOR[_unit(d)] > FLOOR[_unit(m)]
    ]
    assert not up, "imports that run back up a floor:\n" + "\n".join(up)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    modules = _modules()
    graph = {m: _runtime_imports(p, modules) for m, p in modules.items()}
    assert not _cycles(graph), "import circles:\n" + "\n".join(" -> ".join(c) for c in _cycles(graph))


def test_the_floor_and_circle_checks_see_what_they_must():
    """The checkers themselves: an up-import is seen in every form, TYPE_CHECKING imports are not, and a
    circle is found."""
    modules = _modules()
    where = ROOT / "models" / "backbone.py"  # floor 1; parsed text, not written
    for text in (
        "from safesteer.serve.engine import Engine\n",
        "def f():\n    from ..serve import engine\n",
        "import safesteer.pipeline.runner\n",
    ):
        found = _runtime_imports(where, modules, text)
        assert any(FLOOR[_unit(d)] > FLOOR["models"] for d in found), text
    hidden = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from safesteer.serve.engine import Engine\n"
    )
    assert not _runtime_imports(where, modules, hidden)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_command_line_and_the_config_load_no_heavy_library():
    """`safesteer --help` and reading a config stay light: package exports load on first use
    (safesteer.lazy), so a config section's module does not pull its package's torch or pandas."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "sklearn", "pandas", "scipy", "fastapi", "matplotlib")
    for module in ("safesteer.config", "safesteer.cli.main"):
        code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"


def test_lazy_exports_load_names_and_submodules_on_first_use():
    import importlib
    import subprocess
    import sys

    code = (
        "import sys, safesteer.sae as sae; assert 'safesteer.sae.trainer' not in sys.modules; "
        "t = sae.TrainConfig; assert 'safesteer.sae.trainer' not in sys.modules; "
        "assert sae.trainer.Trainer is sae.Trainer; assert 'TrainConfig' in dir(sae)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with __import__("pytest").raises(AttributeError, match="has no attribute 'nope'"):
        importlib.import_module("safesteer.evaluate").nope  # noqa: B018
