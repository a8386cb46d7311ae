"""The package's import graph: no cycle, no import from a lower layer up to a higher one.

Read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import`` of a
medst_fast module, at module level and inside functions alike (a function-level import that dodges a cycle
is still the cycle), relative ones resolved. ``medst_fast.kernels`` is the repository's top-level
``kernels/`` folder (bound into the package at import). The compiled extension ``medst_fast._C`` is not a
source module and is left out.
"""
import ast
import os
import sys
from typing import Dict, List, Optional, Set

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "medst_fast"
_COMPILED = {"medst_fast._C"}

# Each module's floor; a module may import only from its own floor or below. A key names a module or a
# package prefix (the longest match wins), so a new file lands on its package's floor.
LAYERS: Dict[str, int] = {
    # 0: the standard library only
    "medst_fast.files": 0, "medst_fast.version": 0, "medst_fast.build_stamp": 0,
    # 1: leaves: config, weights I/O, tokenizer, fused kernels, the one image transform, the extension loader,
    # the mean pairwise cosine
    "medst_fast.config": 1, "medst_fast.weights": 1, "medst_fast.text": 1, "medst_fast.kernels": 1,
    "medst_fast.data.transforms": 1, "medst_fast.ext": 1, "medst_fast.similarity": 1,
    # 2: the model, the losses, the data pipeline and its batched image op
    "medst_fast.models": 2, "medst_fast.losses": 2, "medst_fast.data": 2, "medst_fast.ops_image": 2,
    # 3: building and loading models: registered configs, model folders, checkpoint conversion
    "medst_fast.factory": 3, "medst_fast.hub": 3, "medst_fast.convert": 3,
    # 4: what uses a model: evaluation (zero-shot classification included), embedding, analysis, training
    "medst_fast.eval": 4, "medst_fast.zero_shot": 4, "medst_fast.embed": 4, "medst_fast.analysis": 4,
    "medst_fast.grounding": 4, "medst_fast.plot": 4, "medst_fast.train": 4,
    # 5: entry points and the public API (the package's __init__)
    "medst_fast": 5, "medst_fast.pretrain": 5, "medst_fast.reproduce": 5, "medst_fast.env": 5,
    "medst_fast.ground": 5, "medst_fast.launch": 5,
}

# Arrows that stay, each with its reason (none today).
ALLOWED_UP: set = set()


def _modules(repo: str) -> Dict[str, str]:
    """{dotted module name: file} for the package and the kernels folder bound into it."""
    mods = {}
    for top, prefix in ((os.path.join(repo, PKG), PKG), (os.path.join(repo, "kernels"), PKG + ".kernels")):
        for d, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), top)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join([prefix] + rel)] = os.path.join(d, f)
    if any(m.startswith(PKG + ".kernels.") for m in mods):
        mods.setdefault(PKG + ".kernels", os.path.join(repo, "kernels"))  # a namespace package: no __init__
    return mods


def _targets(mod: str, path: str, node, mods: Dict[str, str]) -> List[str]:
    """The medst_fast modules one import statement loads (a name that is a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    is_pkg = path.endswith("__init__.py") or os.path.isdir(path)
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    return [f"{src}.{a.name}" if f"{src}.{a.name}" in mods or f"{src}.{a.name}" in _COMPILED else src
            for a in node.names]


def import_graph(repo: str) -> Dict[str, Set[str]]:
    """{module: the medst_fast modules it imports}, module-level and function-level imports alike."""
    mods = _modules(repo)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if os.path.isdir(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for t in _targets(mod, path, node, mods):
                if t in _COMPILED:
                    continue
                while t and t not in mods:  # `import medst_fast.x.NAME`: the module that defines NAME
                    t = t.rpartition(".")[0]
                if t and t != mod and (t == PKG or t.startswith(PKG + ".")):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def floor(mod: str) -> Optional[int]:
    """The floor of a module: its own entry, else its package's; the package root's entry is its __init__ only."""
    keys = [k for k in LAYERS if mod == k or (k != PKG and mod.startswith(k + "."))]
    return LAYERS[max(keys, key=len)] if keys else None


def file_of(mod: str, repo: str = _REPO) -> str:
    path = _modules(repo).get(mod, mod)
    return os.path.relpath(path, repo)


def upward_arrows(graph: Dict[str, Set[str]], repo: str = _REPO) -> List[str]:
    bad = []
    for m in sorted(graph):
        for t in sorted(graph[m]):
            if floor(t) > floor(m) and (m, t) not in ALLOWED_UP:
                bad.append(f"{file_of(m, repo)} -> {file_of(t, repo)} (floor {floor(m)} imports floor {floor(t)})")
    return bad


def _cycle_text(cycle: List[str], repo: str = _REPO) -> str:
    return " -> ".join(file_of(m, repo) for m in cycle)


@pytest.fixture(scope="module")
def graph():
    return import_graph(_REPO)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """A cycle made of a relative module-level import and a function-level one is found and named."""
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n    return x\n")
    (pkg / "c.py").write_text("from . import _C\nimport medst_fast.a\n")
    g = import_graph(str(tmp_path))
    assert g[f"{PKG}.a"] == {f"{PKG}.sub.b"} and g[f"{PKG}.sub.b"] == {f"{PKG}.a"}
    assert g[f"{PKG}.c"] == {f"{PKG}.a"}  # the compiled extension is no edge
    cycle = find_cycle(g)
    assert cycle is not None and _cycle_text(cycle, str(tmp_path)) in (
        "medst_fast/a.py -> medst_fast/sub/b.py -> medst_fast/a.py",
        "medst_fast/sub/b.py -> medst_fast/a.py -> medst_fast/sub/b.py")


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_cycle_text(cycle)}"


def test_a_module_outside_the_table_is_reported():
    assert floor("medst_fast.no_such_module") is None and floor("medst_fast") == LAYERS[PKG]
    assert floor("medst_fast.data.new_reader") == LAYERS["medst_fast.data"]


def test_every_module_has_a_floor(graph):
    missing = [file_of(m) for m in sorted(graph) if floor(m) is None]
    assert not missing, f"modules missing from LAYERS in {__file__}: {missing}"


def test_no_import_from_a_lower_floor_up(graph):
    bad = upward_arrows(graph)
    assert not bad, "imports from a lower layer up to a higher one:\n" + "\n".join(bad)


def test_allowed_exceptions_are_still_needed(graph):
    """An allow-list entry whose import is gone must go too, or it would hide the next one."""
    stale = [f"{a} -> {b}" for a, b in sorted(ALLOWED_UP) if b not in graph.get(a, ())]
    assert not stale, f"ALLOWED_UP entries no longer needed: {stale}"


def test_files_and_weights_import_nothing_else_of_the_project(graph):
    assert graph[f"{PKG}.files"] == set(), graph[f"{PKG}.files"]
    assert graph[f"{PKG}.weights"] <= {f"{PKG}.files"}, graph[f"{PKG}.weights"]


def test_files_needs_only_the_standard_library():
    """setup.py loads files.py by path (through build_stamp.py) before anything is installed."""
    with open(os.path.join(_REPO, PKG, "files.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names), sorted(names - set(sys.stdlib_module_names))
