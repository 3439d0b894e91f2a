"""The install owns one import name, `vlmserve`, and the package has no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "vlmserve", "kernels": "vlmserve.kernels"}  # as setup.py maps them


def test_wheel_holds_only_the_vlmserve_package(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("vlmserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"vlmserve"}
    assert len(top) == 2, top
    # Every subpackage of both folders made it in (setup.py derives the list from the tree).
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{package.replace('.', '/')}/{rel}" in names
    assert "vlmserve/kernels/tuning/launch.json" in names  # package data travels too


def _module_name(path: Path) -> str:
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        if base in path.parents:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise AssertionError(path)


def _imports(tree: ast.AST, known: set[str]) -> set[str]:
    """vlmserve modules this module imports at run time (function-level imports included,
    `if TYPE_CHECKING:` blocks left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(subs or ({node.module} & known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_package_has_no_import_cycles() -> None:
    files = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(ast.parse(p.read_text()), known) for p in files}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v] - {v}:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("argv", [["-m", "vlmserve", "--help"], ["-m", "vlmserve.kernels.bench", "--help"]])
def test_module_entry_points_run_from_the_checkout_root(argv) -> None:
    # The checkout root on sys.path (as `python -m` puts it there) must not shadow the Hub's
    # `kernels`, which transformers imports.
    code = "import transformers.models.qwen2_vl.modeling_qwen2_vl, kernels, sys; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not out.stdout.strip().startswith(str(ROOT / "kernels"))
    subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, check=True)
