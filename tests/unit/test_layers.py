"""The module map in ``areplica/__init__.py`` holds: lower layers never import higher ones.

Every import of an areplica module counts, wherever it is written: at the top, inside a
function, or under ``if TYPE_CHECKING:`` (a cycle hidden from the interpreter is still one
for a reader).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import areplica

SRC = Path(areplica.__file__).parent
MAP_LINE = re.compile(r"^\s+(\d+)\s+([\w.]+)\s+\S")


def layers() -> dict[str, int]:
    doc = areplica.__doc__ or ""
    return {m.group(2): int(m.group(1)) for line in doc.splitlines() if (m := MAP_LINE.match(line))}


def top_module(path: Path) -> str:
    """The map's name for a file: ``reads`` for reads.py, ``testing`` for testing/*."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> set[str]:
    """The areplica modules (map names) a file imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC).parent.parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = [*base, *(node.module or "").split(".")] if node.module else base
                names = [target] if node.module else [[*base, a.name] for a in node.names]
            elif (node.module or "").startswith("areplica."):
                names = [node.module.split(".")[1:]] if node.module else []
            else:
                continue
            out.update(n[0] for n in names if n and n[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("areplica."):
                    out.add(alias.name.split(".")[1])
    return out


def test_every_module_is_on_the_map() -> None:
    mapped = layers()
    files = {top_module(p) for p in SRC.rglob("*.py")} - {"__init__", "__main__", "py"}
    assert files - set(mapped) == set(), "modules missing from the map in areplica/__init__.py"
    assert set(mapped) - files == set(), "the map names modules that do not exist"


def test_lower_layers_never_import_higher_ones() -> None:
    mapped = layers()
    wrong = []
    for path in SRC.rglob("*.py"):
        own = top_module(path)
        if own in ("__init__", "__main__"):
            continue
        for other in imported(path) - {own}:
            if other in mapped and mapped[other] > mapped[own]:
                wrong.append(
                    f"{path.relative_to(SRC)} ({mapped[own]}) imports {other} ({mapped[other]})"
                )
    assert wrong == []


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        own = top_module(path)
        if own in ("__init__", "__main__"):
            continue
        graph.setdefault(own, set()).update(imported(path) - {own, "__init__", "__main__"})
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(name: str, stack: list[str]) -> None:
        seen[name] = 1
        for other in sorted(graph.get(name, ())):
            if seen.get(other) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, name, other])}")
            if other not in seen:
                visit(other, [*stack, name])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])
