"""The package's imports run one way: the graph of orchestrator's modules importing each other, lazy imports
inside functions included, has no cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import orchestrator

PACKAGE = Path(orchestrator.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_orchestrator_imports_run_one_way():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _readme_order() -> list[str]:
    """The modules of README's "Layout of the code", in the order it lists them (a package as `name/`)."""
    text = (PACKAGE.parent / "README.md").read_text()
    section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    chain = section.split("\n`errors.py`", 1)[1].split("What each does", 1)[0]
    names = re.findall(r"`([\w./]+)`", "`errors.py`" + re.sub(r"\([^)]*\)", "", chain))
    return [name.removesuffix(".py").removesuffix("/") for name in names]


def _floors() -> dict[str, set[str]]:
    """The import graph with each subpackage as one node (its own modules import each other freely)."""
    floors: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        node = name.split(".")[1] if name.count(".") else name
        floors.setdefault(node, set()).update(t.split(".")[1] for t in targets if t.count("."))
    floors.pop("orchestrator", None)
    for node, targets in floors.items():
        targets.discard(node)
    return floors


def test_the_readme_lists_every_module_in_the_order_its_imports_run():
    order = _readme_order()
    floors = {node: targets for node, targets in _floors().items() if node != "__main__"}
    assert sorted(set(order)) == sorted(order), f"listed twice: {[n for n in order if order.count(n) > 1]}"
    assert set(floors) - {"hf"} <= set(order) | {"hf"}, f"not in README's list: {sorted(set(floors) - set(order))}"
    assert set(order) <= set(floors), f"README lists modules that do not exist: {sorted(set(order) - set(floors))}"
    place = {name: i for i, name in enumerate(order)}
    place["hf"] = place["config"]  # listed beside config.py, which it serves
    upward = [f"{a} imports {b}" for a, targets in floors.items() for b in targets if place[b] > place[a]]
    assert not upward, "README's module list runs against the imports: " + "; ".join(sorted(upward))


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages setuptools installs: a subpackage left out of it imports from a
    source tree but is missing from a wheel."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(orchestrator(?:\.\w+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
