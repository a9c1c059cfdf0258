"""The house's layers, read from the source: which module may import which.

ground         errors, config helpers, the CPU (cores, flags), the run manifest and file safety, chat data and the chat-format
               rules, the model registry, the model as trained, fidelity, plots: any layer may use it
stages         pipeline (data, tune, merge), export, runtime: each imports the ground and itself only,
               except that export may use the runtime's check of an export folder and its loading
               of one (verification)
orchestration  the CLI, quickstart, report, evaluate, bench, doctor: may import across stages
A new edge against this direction fails here, naming the file and the import.
"""

import ast
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {"edgeft": "edgeft", "pipeline": "edgeft.pipeline", "export": "edgeft.export", "runtime": "edgeft.runtime"}
GROUND = {
    "errors",
    "extras",
    "artifacts",
    "config",
    "cpu",
    "models",
    "chatdata",
    "toolcalls",
    "trained",
    "fidelity",
    "plots",
    "progress",
}
ORCHESTRATION = {"cli", "quickstart", "report", "evaluate", "bench", "doctor", "__main__"}
STAGES = ("edgeft.pipeline", "edgeft.export", "edgeft.runtime")
ALLOWED_ACROSS = {
    ("edgeft.export.onnx", "edgeft.runtime.engine"),  # the runtime's own check of an export folder, its graph names
    ("edgeft.export.verify", "edgeft.runtime.engine"),  # verification loads the export as the runtime does
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every edgeft module this file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("edgeft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeft"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return out


def layer(name: str) -> str:
    if name == "edgeft":
        return "api"  # the package's lazy facade (ChatModel)
    for stage in STAGES:
        if name == stage or name.startswith(stage + "."):
            return stage
    leaf = name.split(".")[1]
    return "ground" if leaf in GROUND else "orchestration" if leaf in ORCHESTRATION else "unknown"


def test_every_module_has_a_layer():
    assert not [name for name in modules() if layer(name) == "unknown"], "add the new module to GROUND or ORCHESTRATION"


def test_imports_point_down():
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        here = layer(name)
        if here in ("orchestration", "api"):
            continue
        for target in sorted(imports(path)):
            target = max((m for m in known if target == m or target.startswith(m + ".")), key=len, default=None)
            if target in (None, name, "edgeft"):  # "edgeft": `from edgeft import __version__` or a submodule by name
                continue
            there = layer(target)
            ok = there == "ground" or (here != "ground" and there == here) or (name, target) in ALLOWED_ACROSS
            if not ok:
                wrong.append(f"{path.relative_to(REPO)}: {here} module {name} imports {there} module {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = {
            max((m for m in known if t == m or t.startswith(m + ".")), key=len, default=None) for t in imports(path)
        }
        graph[name] = {
            t for t in targets if t and t != name and not name.startswith(t + ".") and not t.startswith(name + ".")
        }
    cycles = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))
