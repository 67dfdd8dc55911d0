"""The import graph of the `ldm` package, read from the source (AST, so imports inside functions
count as much as top-level ones): no cycle, the top-level `config.py` never imported, `ldm/weights`
a leaf that knows no network, and the networks knowing nothing of training, data or files."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LDM = os.path.join(ROOT, "ldm")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every .py file under ldm/."""
    out = {}
    for folder, _, files in os.walk(LDM):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _imports(name: str) -> set[str]:
    """Every module `name` imports (ldm modules resolved to the deepest module named, anything
    else by its top-level name), wherever the import statement stands."""
    with open(MODULES[name], encoding="utf-8") as f:
        tree = ast.parse(f.read(), MODULES[name])
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name if a.name.startswith("ldm") else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("ldm"):
                found.add(mod.split(".")[0])
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODULES else mod)
    found.discard(name)
    return found


GRAPH = {m: {t for t in _imports(m) if t in MODULES} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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


def test_the_graph_is_read():
    # a parser that found nothing would pass every check below
    assert len(MODULES) > 30
    assert "ldm.cascade.stage_c" in GRAPH["ldm.cascade.loading"]
    assert "ldm.weights.source" in {t for t in GRAPH["ldm.cascade.loading"]} | {
        t for m in GRAPH["ldm.cascade.loading"] for t in GRAPH.get(m, ())}


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_ldm_never_imports_the_top_level_config():
    offenders = sorted(m for m in MODULES if "config" in _imports(m))
    assert offenders == []


def test_weights_is_a_leaf():
    """ldm/weights knows no network: it imports only itself and ldm.utils."""
    bad = {m: sorted(t for t in GRAPH[m] if not t.startswith(("ldm.weights", "ldm.utils")))
           for m in MODULES if m.startswith("ldm.weights")}
    assert {m: t for m, t in bad.items() if t} == {}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ldm.cascade.") and m.split(".")[-1] in (
    "common", "attention", "cpu_kernels", "stage_a", "stage_b", "stage_c", "effnet", "previewer")))
def test_networks_know_nothing_of_training_data_or_files(module):
    """A network module imports no training, data, pipeline or weight-file code (the training code
    imports the networks, never the reverse; loading lives in ldm.cascade.loading)."""
    forbidden = ("ldm.train", "ldm.data", "ldm.weights", "ldm.cascade.loading", "ldm.cascade.pipeline",
                 "ldm.cascade.components", "paddlenlp")
    assert sorted(t for t in _imports(module) if t.startswith(forbidden)) == []


@pytest.mark.parametrize("package", ["ldm.cascade", "ldm.sd", "ldm.clip", "ldm.weights", "ldm.data"])
def test_only_training_code_knows_the_trainer(package):
    """The network, weights and data packages know nothing of the Trainer or the training recipes."""
    members = [m for m in MODULES if m == package or m.startswith(package + ".")]
    assert members
    bad = {m: sorted(t for t in _imports(m) if t.startswith("ldm.train") or t == "paddlenlp") for m in members}
    assert {m: t for m, t in bad.items() if t} == {}
