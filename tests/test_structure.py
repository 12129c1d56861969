"""The package's seams: no import cycles, generic code imports no family, the compiler does not import the
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


def qvlc_imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of qvlc imported by ``path`` (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks import nothing at run time
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


def test_no_import_cycles_at_module_level():
    graph = {m: resolve(qvlc_imports(p, top_level_only=True)) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


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
        if m.startswith(("qvlc.export", "qvlc.models")) or m in ("qvlc.pipeline", "qvlc.plan", "qvlc.config"):
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
    code = ("import sys; import qvlc.models, qvlc.models.qwen2_vl, qvlc.models.qwen2_5_vl, qvlc.contract, "
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
    bad = offending("qvlc.weights", ("qvlc.models", "qvlc.export", "qvlc.validate", "qvlc.runtime", "qvlc.pipeline"))
    assert not bad, f"weight formats import {bad}"


def test_checkpoint_reading_imports_only_the_registry():
    """qvlc.checkpoint reads folders; it reaches a family only through the registry (``qvlc.models``)."""
    fam = tuple(f"qvlc.models.{f}" for f in FAMILY_DIRS)
    bad = offending("qvlc.checkpoint", fam + ("qvlc.export", "qvlc.validate", "qvlc.runtime", "qvlc.weights",
                                               "qvlc.pipeline", "qvlc.plan"))
    assert not bad, f"checkpoint reading imports {bad}"


def test_runtime_imports_neither_the_compiler_nor_the_proof():
    compiler = ("qvlc.export", "qvlc.pipeline", "qvlc.plan", "qvlc.weights", "qvlc.memory", "qvlc.config",
                "qvlc.validate")
    bad = offending("qvlc.runtime", compiler)
    assert not bad, f"the runtime imports compiler or proof code: {bad} (move what both need to a leaf)"


def test_serving_imports_the_runtime_never_the_compiler():
    bad = offending("qvlc.serve", ("qvlc.export", "qvlc.pipeline", "qvlc.plan", "qvlc.weights", "qvlc.validate",
                                   "qvlc.config"))
    assert not bad, f"qvlc.serve imports compiler or proof code: {bad}"
    users = {m for m, p in MODULES.items() if not m.startswith(("qvlc.serve", "qvlc.cli"))
             and any(i.startswith("qvlc.serve") for i in qvlc_imports(p, False))}
    assert not users, f"only the CLI reaches qvlc.serve: {sorted(users)}"


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
    for package in ("qvlc.weights", "qvlc.checkpoint", "qvlc.runtime", "qvlc.models.common", "qvlc.serve"):
        assert len(imports_of_package(package)) > 1, package
