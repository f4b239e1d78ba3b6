"""The package's shape, checked from its source with ``ast`` (docs/architecture.md).

Rooms, lowest first; a module may import its own room and the rooms below it,
never one above (imports inside functions count as much as those at the top):

    core     errors, roles, runtime, tensor_filter
    io       read and write, trusting nothing
    math     pure tensor functions
    passes   streaming loops over experts (Experts, selections, analyses, the merge driver)
    config   mergekit / OTA-fork YAML read and written, parameter forms, slices, tokenizer
    studies  many merges or frames at once: sweeps, soups, fronts, findings, regime
    zoo      the demo zoo (builds on studies: its Fisher study)
    views    figures, explorers, the report
    entry    the package's front door (curvlens/__init__.py), __main__, cli/, demo, demo_report, notebooks

Besides the rooms: no module imports another module's ``_private`` name; no
import cycle among curvlens modules (function-level imports counted, so a lazy
import cannot hide one; third-party imports are not curvlens's and do not count);
no module over 450 lines; notebooks use ``import curvlens as cl`` only.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "curvlens"
MAX_LINES = 450

#: (room, module prefixes relative to the package), lowest room first; "" is the package itself.
ROOMS = (
    ("core", ("arguments", "errors", "roles", "runtime", "tensor_filter")),
    ("io", ("io",)),
    ("math", ("math",)),
    ("passes", ("passes",)),
    ("config", ("config",)),
    ("studies", ("studies",)),
    ("zoo", ("zoo",)),
    ("evaluators", ("evaluators",)),
    ("views", ("views",)),
    ("entry", ("", "__main__", "cli", "demo", "demo_report", "notebooks")),
)


@dataclass(frozen=True)
class Import:
    importer: str   # dotted module name
    target: str     # the dotted module imported (a package's name for its __init__)
    names: tuple    # the names taken from it (``from x import a, b``), else ()
    line: int
    in_function: bool


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``package`` (a package by its name)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(base: str, name: str, known: set[str]) -> str:
    """``from base import name``: the submodule when ``name`` is one, else ``base``."""
    return f"{base}.{name}" if f"{base}.{name}" in known else base


def imports(package: Path) -> list[Import]:
    """Every import of a module of ``package`` by a module of ``package``."""
    known = modules(package)
    top = package.name
    found = []
    for mod, f in known.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            in_function = node.col_offset > 0
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        found.append(Import(mod, a.name, (), node.lineno, in_function))
                continue
            if node.level:  # relative: from the importer's package
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != top and not base.startswith(top + "."):
                continue
            names = []
            for a in node.names:
                sub = _resolve(base, a.name, set(known))
                if sub != base:  # a module imported by name
                    found.append(Import(mod, sub, (), node.lineno, in_function))
                else:
                    names.append(a.name)
            if names:
                found.append(Import(mod, base, tuple(names), node.lineno, in_function))
    return found


def room_of(module: str, top: str, rooms=ROOMS) -> int | None:
    """Index of the room ``module`` belongs to (its longest matching prefix), or None."""
    rel = module[len(top) + 1:] if module != top else ""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(rooms):
        for p in prefixes:
            hit = rel == p if p in ("",) else (rel == p or rel.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_imports(package: Path, rooms=ROOMS) -> list[str]:
    """Imports of a room above the importer's, and modules in no room."""
    top = package.name
    bad = [f"{m}: in no room (add it to ROOMS)" for m in modules(package) if room_of(m, top, rooms) is None]
    for imp in imports(package):
        src, dst = room_of(imp.importer, top, rooms), room_of(imp.target, top, rooms)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{imp.importer}:{imp.line} ({rooms[src][0]}) imports {imp.target} ({rooms[dst][0]})"
                       + (" inside a function" if imp.in_function else ""))
    return bad


def private_imports(package: Path) -> list[str]:
    """``from other import _name`` and ``other_module._name``, for other modules of the package."""
    known = modules(package)
    bad = []
    for imp in imports(package):
        if imp.target == imp.importer:
            continue
        bad += [f"{imp.importer}:{imp.line} imports {imp.target}.{n}" for n in imp.names
                if n.startswith("_") and not n.startswith("__")]
    for mod, f in known.items():  # attribute reaches through an imported module: m._name
        tree = ast.parse(f.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in known:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != mod
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}:{node.lineno} reaches {aliases[node.value.id]}.{node.attr}")
    return bad


def import_cycles(package: Path) -> list[list[str]]:
    """The strongly connected groups of more than one module (or a module importing
    itself) in the graph of every import, at module level or inside a function."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package)}
    for imp in imports(package):
        if imp.target in graph:
            graph[imp.importer].add(imp.target)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan, iterative enough for a package's depth
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_modules(package: Path, limit: int = MAX_LINES) -> list[str]:
    return [f"{m}: {n} lines" for m, f in modules(package).items()
            if (n := len(f.read_text().splitlines())) > limit]


_SUB_IMPORT = re.compile(r"^\s*(?:from\s+curvlens\.\w[\w.]*\s+import\b|import\s+curvlens\.\w)")


def notebook_sub_imports(notebooks: Path) -> list[str]:
    """``from curvlens.x import`` / ``import curvlens.x`` in the notebooks' sources
    and their .ipynb code cells: everything a notebook uses is ``cl.*`` or ``cl.views.*``."""
    bad = []
    for f in sorted(notebooks.glob("*.py")):
        bad += [f"{f.name}:{i}: {line.strip()}" for i, line in enumerate(f.read_text().splitlines(), 1)
                if _SUB_IMPORT.match(line)]
    for f in sorted(notebooks.glob("*.ipynb")):
        for k, cell in enumerate(json.loads(f.read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            bad += [f"{f.name} cell {k}: {line.strip()}" for line in src.splitlines() if _SUB_IMPORT.match(line)]
    return bad


# -- the package -----------------------------------------------------------------------

def test_rooms_import_only_rooms_below():
    assert upward_imports(PACKAGE) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(PACKAGE) == []


def test_no_import_cycle():
    assert import_cycles(PACKAGE) == []


def test_no_module_over_450_lines():
    assert long_modules(PACKAGE) == []


def test_notebooks_use_the_public_surface_only():
    assert notebook_sub_imports(ROOT / "notebooks") == []


def test_the_package_has_the_rooms_the_docs_name():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for room, prefixes in ROOMS:
        assert f"`{room}`" in doc, room
        for p in prefixes:
            if p and (PACKAGE / p).is_dir():
                assert f"{p}/" in doc, p


# -- the checker fails on violations (a synthetic package) ------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / "pkg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root / "pkg"


_CLEAN = {
    "__init__.py": "from pkg.passes.run import go\n",
    "errors.py": "class E(Exception):\n    pass\n",
    "io/__init__.py": "",
    "io/read.py": "from pkg.errors import E\nimport numpy\n",
    "math/__init__.py": "",
    "math/k.py": "from pkg.io import read\n",
    "passes/__init__.py": "",
    "passes/run.py": "from pkg.math.k import *\n\ndef go():\n    import torch  # optional, third-party\n",
    "views/__init__.py": "",
    "views/plot.py": "from pkg.passes.run import go\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    pkg = _write(tmp_path, _CLEAN)
    assert upward_imports(pkg) == private_imports(pkg) == import_cycles(pkg) == long_modules(pkg) == []


def test_checker_finds_an_upward_import_even_inside_a_function(tmp_path):
    pkg = _write(tmp_path, {**_CLEAN, "passes/run.py": "def go():\n    from pkg.views.plot import x\n"})
    bad = upward_imports(pkg)
    assert len(bad) == 1 and "pkg.passes.run:2 (passes) imports pkg.views.plot (views) inside a function" in bad[0]


def test_checker_finds_a_module_in_no_room(tmp_path):
    pkg = _write(tmp_path, {**_CLEAN, "stray.py": "x = 1\n"})
    assert upward_imports(pkg) == ["pkg.stray: in no room (add it to ROOMS)"]


def test_checker_finds_private_imports(tmp_path):
    pkg = _write(tmp_path, {**_CLEAN, "math/k.py": "from pkg.io.read import _helper\nfrom pkg.io import read\n"
                                                   "y = read._other()\nfrom pkg.io import _sub\n",
                            "io/_sub.py": "z = 1\n"})
    bad = private_imports(pkg)
    # a private module imported by name is the package's own business; private names are not
    assert bad == ["pkg.math.k:1 imports pkg.io.read._helper", "pkg.math.k:3 reaches pkg.io.read._other"]


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = _write(tmp_path, {**_CLEAN, "passes/a.py": "from pkg.passes.b import f\n",
                            "passes/b.py": "def f():\n    from pkg.passes.a import g\n"})
    assert import_cycles(pkg) == [["pkg.passes.a", "pkg.passes.b"]]


def test_checker_finds_a_long_module(tmp_path):
    pkg = _write(tmp_path, {**_CLEAN, "math/big.py": "x = 1\n" * 451})
    assert long_modules(pkg) == ["pkg.math.big: 451 lines"]


def test_checker_finds_sub_imports_in_notebooks(tmp_path):
    (tmp_path / "01_a.py").write_text("import curvlens as cl\nfrom curvlens.studies.sweep import sweep\n")
    cell = {"cell_type": "code", "source": ["import curvlens.views\n"], "metadata": {}, "outputs": []}
    (tmp_path / "01_a.ipynb").write_text(json.dumps({"cells": [cell]}))
    assert notebook_sub_imports(tmp_path) == ["01_a.py:2: from curvlens.studies.sweep import sweep",
                                              "01_a.ipynb cell 0: import curvlens.views"]


@pytest.mark.parametrize("module, room", [("curvlens", "entry"), ("curvlens.cli", "entry"),
                                          ("curvlens.passes.merge", "passes"), ("curvlens.tensor_filter", "core"),
                                          ("curvlens.zoo.build", "zoo")])
def test_room_of(module, room):
    assert ROOMS[room_of(module, "curvlens")][0] == room
