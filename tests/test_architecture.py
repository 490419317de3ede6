"""The house rules of issue 12 that a machine can check: no project module imports one that
imports it back (directly or around a loop), counting imports inside functions too."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f != "__init__.py")


def imports_of(module):
    """The project modules `module` imports anywhere in its file."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    named = lambda path: path[1] if path[0] == "medmoe" and len(path) > 1 else path[0]  # medmoe.data names data
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {named(a.name.split(".")) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "medmoe":
            found |= {a.name if a.name in MODULES else "medmoe" for a in node.names}  # from medmoe import data, IGNORE
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(named(node.module.split(".")))
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


def test_functions_are_short_and_take_few_arguments():
    """Issue 12: none over 60 lines or 10 parameters (self aside), Click commands excepted:
    their parameters are the command's options."""
    offenders = []
    for module in MODULES:
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            command = any("command" in ast.unparse(d) for d in node.decorator_list)
            if lines > 60 or (len(params) > 10 and not command):
                offenders.append(f"{module}.{node.name}: {lines} lines, {len(params)} parameters")
    assert offenders == []


# ----------------------------------------------------------------------------- a user's own files never stand in for ours


def test_a_folder_with_its_own_data_and_train_never_shadows_medmoe(tmp_path):
    """Where people run torchrun is often a folder holding their own data.py and train.py. From
    there, `import medmoe`, `python -m medmoe.cli`, torchrun and the installed `medmoe` command
    all use medmoe's modules: each of the user's files would stop the process if imported."""
    import tiny

    root = os.path.abspath(ROOT)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("data", "train", "files", "kernels", "cli", "vqa"):
        (work / f"{name}.py").write_text(f"raise SystemExit('the user\\'s own {name}.py was imported')\n")
    tiny.make_model(tmp_path / "m0")
    tiny.make_dataset(tmp_path / "d")
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    code = "import medmoe, medmoe.data, medmoe.train; print(medmoe.data.__file__, medmoe.train.__file__, medmoe.MedMoE.__name__)"
    imported = run(sys.executable, "-c", code)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [os.path.join(root, "data.py"), os.path.join(root, "train.py"), "MedMoE"]
    train_args = ["train", "--stage", "1", "--model", str(tmp_path / "m0"), "--data", str(tmp_path / "d" / "train.jsonl"),
                  "--max-steps", "1", "--batch-size", "2"]
    as_module = run(sys.executable, "-m", "medmoe.cli", *train_args, "--out", str(tmp_path / "one"))
    assert as_module.returncode == 0, as_module.stderr[-2000:]
    torchrun = run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29541", "-m", "medmoe.cli",
                   *train_args, "--out", str(tmp_path / "torchrun"))
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    assert (tmp_path / "torchrun" / "model.safetensors").is_file()
    command = shutil.which("medmoe")
    if command:  # installed (pip install -e .): the entry point, with no PYTHONPATH at all
        env.pop("PYTHONPATH")
        info = run(command, "info", str(tmp_path / "m0"))
        assert info.returncode == 0 and "vision" in info.stdout, info.stderr
