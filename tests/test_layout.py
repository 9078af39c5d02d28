"""The package's architecture, checked: the import graph of nas/ (every import statement, those
inside functions included) has no cycle, between modules or between packages (nas.study,
nas.train, nas.run, ...: each top-level module or subpackage of nas), and no module imports a
command (a module defining main()) but the `python -m` shims. Run as a script it prints the graph's facts and the longest
functions:

    python tests/test_layout.py
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nas"
SHIM_LINES = 12  # a shim only hands `python -m nas.X` to nas/cli/X.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The nas modules `path` imports: `import a.b`, `from a import b` (b a module, else a), and
    relative imports, wherever the statement sits."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def package_of(module: str) -> str:
    """The top-level part of nas a module belongs to: nas.study for nas.study.confirm, nas.spec for nas.spec."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    """Which of nas's packages imports which, through any of its modules but the `python -m` shims
    (nas/data/__main__.py hands `python -m nas.data` to nas.cli.data: an entry point, not a layer)."""
    found, graph = modules(), {}
    for name, deps in import_graph().items():
        edges = graph.setdefault(package_of(name), set())
        if not is_shim(found[name]):
            edges.update(package_of(dep) for dep in deps)
    return {package: deps - {package} for package, deps in graph.items()}


def defines_main(path: Path) -> bool:
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in ast.parse(path.read_text()).body)


def is_shim(path: Path) -> bool:
    return len(path.read_text().splitlines()) <= SHIM_LINES and not defines_main(path)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def commands() -> set[str]:
    return {name for name, path in modules().items() if defines_main(path)}


def longest_functions(top: int = 10) -> list[tuple[int, str]]:
    lengths = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(lengths, reverse=True)[:top]


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_packages_have_no_cycle():
    assert cycles(package_graph()) == []


def test_only_shims_import_a_command():
    graph, found = import_graph(), modules()
    offenders = {name: sorted(graph[name] & commands()) for name in graph
                 if graph[name] & commands() and not is_shim(found[name])}
    assert offenders == {}


def test_commands_live_in_nas_cli_and_each_is_a_console_script():
    shared = {"nas.cli.args", "nas.cli.target"}  # what several commands share: flags, and what --model names
    assert commands() == {name for name in modules() if name.startswith("nas.cli.") and name not in shared}
    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target.split(":")[0] for target in scripts.values()} == commands()
    assert all(target.endswith(":main") for target in scripts.values())


def test_every_command_has_its_python_m_shim():
    found = modules()
    for command in commands():
        name = command.rpartition(".")[2]
        shim = found.get(f"nas.{name}.__main__") or found.get(f"nas.{name}")
        assert shim is not None and is_shim(shim), f"python -m nas.{name} has no shim"
        assert command in import_graph()[module_name(shim)]


STAGES = ("nas.spec", "nas.space", "nas.studyfile", "nas.data", "nas.model", "nas.train")


def test_stages_print_nothing_and_import_no_study_logic():
    graph, found = import_graph(), modules()
    for name in graph:
        if name.startswith(STAGES) and not name.endswith("__main__"):
            assert not any(dep.startswith(("nas.cli", "nas.study", "nas.experiments")) for dep in graph[name]), name
            calls = [node for node in ast.walk(ast.parse(found[name].read_text()))
                     if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
            assert calls == [], f"{name} prints"


def fixed_waits(path: Path) -> list[int]:
    """Lines of `path` that sleep a constant second or more: a test waits for its condition
    (tests/waiting.py), since on a loaded machine any fixed wait is too short some day."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("time.sleep", "sleep")
            and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value >= 1]


def test_no_test_waits_a_fixed_time():
    tests = Path(__file__).resolve().parent
    assert {path.name: fixed_waits(path) for path in sorted(tests.glob("*.py")) if fixed_waits(path)} == {}


MAX_POSITIONAL = 6  # beyond this a call can't be read or safely changed: the rest are keyword-only


def wide_signatures() -> list[str]:
    """Functions of nas taking more than MAX_POSITIONAL positional parameters (self aside), but a
    spawned process's target, which multiprocessing calls with a tuple of arguments."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > MAX_POSITIONAL and node.name not in SPAWN_TARGETS:
                    found.append(f"{name}.{node.name}")
    return found


SPAWN_TARGETS = {"_concurrent_training"}  # nas.experiments.bench: SPAWN.Process(target=..., args=(...))


def test_wide_signatures_take_keywords():
    assert wide_signatures() == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports; cycles: {cycles(graph) or 'none'}")
    packages = package_graph()
    print(f"{len(packages)} packages; cycles between them: {cycles(packages) or 'none'}")
    print("commands:", ", ".join(sorted(commands())))
    print("longest functions:")
    for lines, name in longest_functions():
        print(f"  {lines:>4}  {name}")
    sys.exit(0)
