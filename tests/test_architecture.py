"""The house rules of issue 12 that a machine can check: no project module imports one that
imports it back (directly or around a loop), counting imports inside functions too."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports_of(module):
    """The project modules `module` imports anywhere in its file."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(MODULES) - {module})


def find_cycle(graph):
    """A list of modules forming an import loop, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    assert {"medmoe", "cli", "convert", "files"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


@pytest.mark.parametrize("module", ["files", "kernels"])
def test_the_base_modules_import_nothing_of_ours(module):
    assert imports_of(module) == []


def test_the_model_file_imports_only_the_base_modules():
    assert imports_of("medmoe") == ["files", "kernels"]
