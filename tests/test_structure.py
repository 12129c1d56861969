"""The package's seams: no import cycle between modules or packages (imports inside functions counted, only
``if TYPE_CHECKING:`` blocks left out), packages import only the layers below them, a root of leaves, generic code
imports no family, the compiler does not import the
runtime, the runtime imports neither the compiler nor the proof, weight formats and checkpoint reading stand on
their own, importing a model has no side effects (no torch op registered, no torch imported), and files and
functions stay short enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qvlc"
FAMILY_DIRS = tuple(sorted(p.name for p in (PKG / "models").iterdir()
                           if p.is_dir() and p.name != "common" and (p / "__init__.py").exists()))
# The script that writes the shipped tiny tokenizer's files: a tokenizer's data names its special tokens (every family
# shares the one tiny tokenizer; nothing branches on them there).
TOKENIZER_DATA = {"qvlc.checkpoint.build_tiny_tokenizer"}
MAX_FILE_LINES = 320
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (they import nothing at run time)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(x) for stmt in node.body for x in ast.walk(stmt))
    return skip


def qvlc_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of qvlc imported by ``path``: anywhere in it (inside functions too), or at module level only;
    never what an ``if TYPE_CHECKING:`` block imports."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    skip = _type_checking_only(tree)
    found = set()
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qvlc"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qvlc"))
    return found


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def package_of(module: str) -> str:
    """The top-level package a module belongs to (``qvlc.models.common.text`` -> ``qvlc.models``); a root module
    is its own."""
    return ".".join(module.split(".")[:2])


MODULE_GRAPH = {m: resolve(qvlc_imports(p)) - {m} for m, p in MODULES.items()}
PACKAGE_GRAPH: dict[str, set[str]] = {}
for _m, _deps in MODULE_GRAPH.items():
    PACKAGE_GRAPH.setdefault(package_of(_m), set()).update(package_of(d) for d in _deps if package_of(d) != package_of(_m))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [node, nxt] if nxt in stack else stack + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    """Counting imports made inside functions: a cycle hidden in a function is still a cycle."""
    cycle = find_cycle(MODULE_GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    cycle = find_cycle(PACKAGE_GRAPH)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


# The order in which packages may import each other (docs/layout.md): a package imports only those before it.
LAYERS = ("qvlc.errors", "qvlc.precision", "qvlc", "qvlc.system", "qvlc.artifact", "qvlc.weights", "qvlc.parallel",
          "qvlc.host", "qvlc.models", "qvlc.checkpoint", "qvlc.config", "qvlc.runtime", "qvlc.export",
          "qvlc.validate", "qvlc.compile", "qvlc.serve", "qvlc.eval", "qvlc.cli", "qvlc.__main__")


def test_packages_import_only_the_layers_below():
    assert set(PACKAGE_GRAPH) <= set(LAYERS), f"a package docs/layout.md does not place: {set(PACKAGE_GRAPH) - set(LAYERS)}"
    upward = {f"{a} -> {b}" for a, deps in PACKAGE_GRAPH.items() for b in deps
              if LAYERS.index(b) >= LAYERS.index(a)}
    assert not upward, f"imports against the layer order: {sorted(upward)}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The rule would pass vacuously if function-level imports were dropped: a cycle through one is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from qvlc.b import g\n")
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qvlc.x import y\nfrom qvlc.a import f\n")
    graph = {"qvlc.a": {i for i in qvlc_imports(a) if i in ("qvlc.a", "qvlc.b")},
             "qvlc.b": {i for i in qvlc_imports(b) if i in ("qvlc.a", "qvlc.b")}}
    assert find_cycle(graph) is not None
    assert "qvlc.x" not in qvlc_imports(b)


ROOT_LEAVES = {"qvlc", "qvlc.__main__", "qvlc.errors", "qvlc.precision"}


def test_the_root_holds_at_most_six_modules():
    """Every concern is a package named for it; the root keeps only leaves (``__init__``, ``__main__``, ``errors``,
    ``precision``, and at most two more)."""
    root = {m for m in MODULES if m.count(".") <= 1 and not (PKG / m.split(".")[-1]).is_dir()} | {"qvlc"}
    assert len(root) <= 6, sorted(root)
    assert ROOT_LEAVES <= root
    for m in root - {"qvlc.__main__"}:
        assert not resolve(qvlc_imports(MODULES[m])) - {m}, f"{m} is not a leaf"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("qvlc.models.")))
def test_generic_code_imports_no_family(module):
    imported = qvlc_imports(MODULES[module], top_level_only=False)
    bad = {i for i in imported if any(i.startswith(f"qvlc.models.{f}") for f in FAMILY_DIRS)}
    assert not bad, f"{module} imports family code {sorted(bad)}: go through the registry (qvlc.models)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("qvlc.models.common")))
def test_shared_model_code_imports_no_family(module):
    imported = qvlc_imports(MODULES[module], top_level_only=False)
    assert not {i for i in imported if any(i.startswith(f"qvlc.models.{f}") for f in FAMILY_DIRS)}


def test_compiler_does_not_import_the_runtime():
    for m, p in MODULES.items():
        if m.startswith(("qvlc.export", "qvlc.models", "qvlc.compile", "qvlc.config")):
            assert not {i for i in qvlc_imports(p, False) if i.startswith("qvlc.runtime")}, m


def test_no_family_name_in_generic_code():
    """Generic code never branches on a model name."""
    for m, p in MODULES.items():
        if m.startswith("qvlc.models.") or m == "qvlc.models" or m in TOKENIZER_DATA:
            continue
        tree = ast.parse(p.read_text())
        docs = {id(body[0].value) for node in ast.walk(tree) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (body := node.body) and isinstance(body[0], ast.Expr)}
        constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs]
        strings = " ".join(c for c in constants if isinstance(c, str))
        for name in ("qwen2_vl", "qwen2_5_vl", "Qwen2.5", "<|im_end|>", "self_attn.o_proj", "mlp.down_proj"):
            assert name not in strings, f"{m} has {name!r} in its code (comments and docstrings may say it)"
        assert 1176 not in constants, f"{m} hard-codes the patch width 1176: read it from the dims or the spec"


def test_importing_models_has_no_side_effects():
    code = ("import sys; import qvlc.models, qvlc.models.qwen2_vl, qvlc.models.qwen2_5_vl, qvlc.artifact.manifest, "
            "qvlc.host.rope, qvlc.host.vision, qvlc.models.qwen2_5_vl.host; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    code = ("import torch, qvlc.models.common.text, qvlc.parallel.allreduce; "
            "print(hasattr(torch.ops.qvlc, 'all_reduce'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def imports_of_package(package: str) -> dict[str, set[str]]:
    return {m: qvlc_imports(p, top_level_only=False) for m, p in MODULES.items()
            if m == package or m.startswith(package + ".")}


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {m: sorted(i for i in imported if i.startswith(forbidden))
           for m, imported in imports_of_package(package).items()}
    return {m: b for m, b in bad.items() if b}


def test_weight_formats_import_no_family_and_no_exporter():
    """qvlc.weights: integers and their views; no family, no ONNX exporter, no proof, no runtime."""
    bad = offending("qvlc.weights", ("qvlc.models", "qvlc.export", "qvlc.validate", "qvlc.runtime", "qvlc.compile"))
    assert not bad, f"weight formats import {bad}"


def test_checkpoint_reading_imports_only_the_registry():
    """qvlc.checkpoint reads folders; it reaches a family only through the registry (``qvlc.models``)."""
    fam = tuple(f"qvlc.models.{f}" for f in FAMILY_DIRS)
    bad = offending("qvlc.checkpoint", fam + ("qvlc.export", "qvlc.validate", "qvlc.runtime", "qvlc.weights",
                                               "qvlc.compile"))
    assert not bad, f"checkpoint reading imports {bad}"


def test_runtime_imports_neither_the_compiler_nor_the_proof():
    compiler = ("qvlc.export", "qvlc.compile", "qvlc.weights", "qvlc.config", "qvlc.validate")
    bad = offending("qvlc.runtime", compiler)
    assert not bad, f"the runtime imports compiler or proof code: {bad} (move what both need to a leaf)"


def test_serving_imports_the_runtime_never_the_compiler():
    for package in ("qvlc.serve", "qvlc.eval"):
        bad = offending(package, ("qvlc.export", "qvlc.compile", "qvlc.weights", "qvlc.validate", "qvlc.config"))
        assert not bad, f"{package} imports compiler or proof code: {bad}"
        users = {m for m, p in MODULES.items() if not m.startswith((package, "qvlc.cli"))
                 and any(i.startswith(package) for i in qvlc_imports(p, False))}
        assert not users, f"only the CLI reaches {package}: {sorted(users)}"


def test_files_stay_readable():
    long = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_functions_stay_readable():
    long = {}
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long[f"{m}.{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_structure_rules_see_the_layout():
    """The rules above would pass vacuously on a renamed package: each package they guard exists and has modules."""
    assert set(FAMILY_DIRS) >= {"qwen2_vl", "qwen2_5_vl"}
    for package in ("qvlc.weights", "qvlc.checkpoint", "qvlc.runtime", "qvlc.models.common", "qvlc.serve", "qvlc.cli",
                    "qvlc.config", "qvlc.artifact", "qvlc.compile", "qvlc.system", "qvlc.eval"):
        assert len(imports_of_package(package)) > 1, package
