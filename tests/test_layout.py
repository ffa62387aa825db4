"""The tree's shape: no import circles (lazy imports inside functions counted too), no modules
grouped by a name prefix in `harness/`, and the public names of `harness` as the README uses them."""

from __future__ import annotations

import ast
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "impls")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every project module that ``path`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # `from harness.fuzz import driver` names a module; `from harness.model import X` does not.
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own packages are not edges
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circles_even_through_lazy_imports():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_a_lazy_circle(tmp_path):
    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    modules = {"a": a, "b": b}
    graph = {n: _imports(p, n, modules) for n, p in modules.items()}
    assert _cycle(graph) == ["a", "b", "a"]


def test_no_modules_grouped_by_a_name_prefix_in_harness():
    for package in [ROOT / "harness", *(p for p in (ROOT / "harness").iterdir() if p.is_dir())]:
        names = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
        for n in names:
            for other in names:
                assert not other.startswith(n + "_"), f"{package.name}/: {n}.py and {other}.py"
        heads = [n.split("_")[0] for n in names if "_" in n]
        assert len(heads) == len(set(heads)), f"{package.name}/: modules share a prefix: {sorted(names)}"


def test_public_names_of_harness_stay_importable():
    readme_names = {
        "JaggedBatch", "Pooling", "TableConfig", "check_agreement", "load_backend", "make_weights",
    }  # fmt: skip
    earlier_names = {
        "Backend", "BackendUnavailable", "Outcome", "Problem", "ProblemError", "Verdict",
        "check_problem", "validate_problem",
    }  # fmt: skip
    for name in readme_names | earlier_names:
        assert name in harness.__all__ and hasattr(harness, name), name
    readme = (ROOT / "README.md").read_text()
    assert "from harness import JaggedBatch, Pooling, TableConfig, check_agreement, load_backend" in readme
