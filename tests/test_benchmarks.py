"""The benchmarks import edgeft inside main() (so `--help` stays fast): a renamed function breaks
them only when someone runs them. Check every name they import from edgeft exists."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_exist(script):
    tree = ast.parse(script.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("edgeft")]
    for node in imports:
        module = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                f"{script.name}:{node.lineno} imports {alias.name} from {node.module}, which has no such name"
            )
