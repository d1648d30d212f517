"""What README.md ("Layout") says about the code's structure, checked on the code itself: which
package may import which, no import cycles, TensorFlow only inside the model package's
TensorFlow modules, test modules sharing helpers only through helper modules.

Imports are read from the source (every ``import`` statement, those inside functions too), so
a lazy import counts as much as one at the top."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    "shared",
    "activity_model",
    "device_agent",
    "trainer_service",
    "simulator",
    "dashboard",
    "har",
    "bench",
    "tests",
)
# Who may import whom: the contract at the bottom, the model above it, each role above both,
# the simulator reusing the device's and the trainer's parts, the `har` command over all.
MAY_IMPORT = {
    "shared": set(),
    "activity_model": {"shared"},
    "device_agent": {"shared", "activity_model"},
    "trainer_service": {"shared", "activity_model"},
    "dashboard": {"shared"},
    "simulator": {"shared", "activity_model", "device_agent", "trainer_service"},
    "har": set(PACKAGES) - {"har", "bench", "tests"},
    "bench": set(PACKAGES) - {"tests", "bench"},
    "tests": set(PACKAGES) - {"tests", "bench"},
}
# The modules that may import TensorFlow (itself, or through import_tensorflow) or LiteRT.
TENSORFLOW_MODULES = {
    "activity_model.tensorflow_import",
    "activity_model.tracker",
    "activity_model.export",
    "activity_model.lite_export",
    "activity_model.tensorflow_runtime",
}
LITERT_MODULES = {"activity_model.litert_runtime", "activity_model.lite_export"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported_names(path: Path) -> Iterator[str]:
    """Every module name an import statement in ``path`` names (absolute imports)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(path):
            module = imported
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_package_imports_only_the_layers_below_it() -> None:
    crossings = {
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] != name.split(".")[0]
        and target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]]
    }
    assert crossings == set()


def test_tensorflow_and_litert_are_imported_only_inside_the_model_package() -> None:
    outside = set()
    for name, path in modules().items():
        if name.split(".")[0] in ("tests", "bench"):
            continue  # tests and benchmarks look at the model from outside on purpose
        for imported in imported_names(path):
            root = imported.split(".")[0]
            if imported.endswith("import_tensorflow") or root == "tensorflow":
                if name not in TENSORFLOW_MODULES:
                    outside.add((name, "tensorflow"))
            elif root == "ai_edge_litert" and name not in LITERT_MODULES:
                outside.add((name, "ai_edge_litert"))
    assert outside == set()


def test_test_modules_share_helpers_only_through_helper_modules() -> None:
    reaching = {
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if target.startswith("tests.test_")
    }
    assert reaching == set()


TOPIC_LEVEL = re.compile(r"(^|/)(devices|model|trainer)/|/(sensor|prediction|confirmation|status)$")


def test_topics_are_spelled_only_in_shared_topics() -> None:
    """Every topic the programs use comes from ``shared.topics.Topics``: a topic level written
    anywhere else would be a second definition of the contract."""
    spelled = set()
    for name, path in modules().items():
        if name.split(".")[0] in ("tests", "bench") or name == "shared.topics":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and TOPIC_LEVEL.search(node.value):
                spelled.add((name, node.value))
    assert spelled == set()
