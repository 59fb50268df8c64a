"""The house rules of docs/design.md ("Dependency direction"), read from the source with ast:

- models/ and rewards/ never import ray, rayjobs or each other: the training step and the rewards are importable
  and testable without Ray;
- inside rayjobs/, only the cluster/ and tune/ wings import ray; config/, data/, training/ and tools/ never do;
- no import cycle between the project's modules, counting imports inside functions too (a function-level import
  that closes a cycle only hides it);
- no private name (``_x``) imported from another module of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("models", "rewards", "rayjobs")
FORBIDDEN = {"models": {"ray", "rayjobs", "rewards"}, "rewards": {"ray", "rayjobs", "models"}}
RAY_FREE_WINGS = ("config", "data", "training", "tools")
RAY_WINGS = ("cluster", "tune")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[Path]:
    return sorted(f for p in PACKAGES for f in (ROOT / p).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, module level or inside functions; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def imported_packages(path: Path) -> set[str]:
    return {module.split(".")[0] for module, _ in imports(path)}


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as importing pkg.mod)."""
    known = {module_name(f): f for f in project_files()}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for module, names in imports(path):
            if module in known:
                edges.add(module)
            edges |= {f"{module}.{n}" for n in names if f"{module}.{n}" in known}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_dependency_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {f.relative_to(ROOT).as_posix(): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_only_the_cluster_and_tune_wings_import_ray():
    wings = sorted(p.name for p in (ROOT / "rayjobs").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(wings) == set(RAY_FREE_WINGS) | set(RAY_WINGS), "a new wing needs a rule here and a line in docs/design.md"
    top = sorted((ROOT / "rayjobs").glob("*.py"))
    free = [f for w in RAY_FREE_WINGS for f in (ROOT / "rayjobs" / w).rglob("*.py")] + top
    bad = sorted(f.relative_to(ROOT).as_posix() for f in free if "ray" in imported_packages(f))
    # the front door reaches Ray only through the wings (rayjobs/cli.py imports them, never ray itself)
    assert bad == []
    assert any("ray" in imported_packages(f) for w in RAY_WINGS for f in (ROOT / "rayjobs" / w).rglob("*.py"))


def test_no_import_cycle_between_project_modules():
    graph = project_graph()
    assert len(graph) > 50 and "rayjobs.training.loop" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    """The rule above can fail: a hand-made cycle (and one closed only by a function-level import) is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = project_graph()
    graph["rayjobs.config.base"] = graph["rayjobs.config.base"] | {"rayjobs.training.loop"}
    assert find_cycle(graph) is not None


def test_function_level_imports_are_seen(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from rayjobs.training import loop\n    import ray\n")
    found = imports(tmp_path / "m.py")
    assert ("rayjobs.training", ["loop"]) in found and ("ray", []) in found


def test_no_private_name_is_imported_across_modules():
    bad = []
    for f in project_files():
        for module, names in imports(f):
            if module.split(".")[0] in PACKAGES:
                bad += [f"{f.relative_to(ROOT)}: {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []
