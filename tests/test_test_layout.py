"""The test suite's own layout: no test module imports another test module (shared constants and functions
live in tests/helpers.py, fixtures in tests/conftest.py), so that each test file can be run, moved or deleted
on its own."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in the file, nested (lazy) imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_no_test_module_imports_another_test_module():
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    offenders = [f"{path.name}:{line}: imports {name}" for path in sorted(TESTS.glob("*.py"))
                 for line, name in imported_modules(path) if name in test_modules]
    assert not offenders, "move the shared names to tests/helpers.py or a fixture in conftest.py:\n" + "\n".join(offenders)


def test_the_check_sees_lazy_imports(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("def test_a():\n    from test_cli import lesion_kd\n    import test_io.sub\n")
    assert imported_modules(f) == [(2, "test_cli"), (3, "test_io")]
