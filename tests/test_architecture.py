"""The layout docs/architecture.md draws, checked on the source: imports flow one way (type-only
imports included), the config is a leaf, the report needs nothing of training, and the
training functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "clipfnd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path = PKG) -> dict[str, Path]:
    return {_module_name(p): p for p in package.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The clipfnd modules ``name`` imports, anywhere in the file (functions and
    ``TYPE_CHECKING`` blocks included): ``from .x import y`` counts as importing ``x.y`` when
    that is a module, else ``x``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph(package: Path = PKG) -> dict[str, set[str]]:
    mods = _modules(package)
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_among_clipfnd_modules():
    assert _cycles(_graph()) == []


def test_import_circles_in_the_data_and_eval_packages():
    """``data_pipelines`` and ``eval`` (``clipfnd_eval``; it imports itself relatively), type-only
    imports included. The error and the plain records have modules of their own, so labels,
    remote shards and the manifest no longer import each other. One circle is left, and named
    here so that a new one fails: the loader's stream hands itself to its workers and batcher,
    which import it back for its type (issue 34: a frozen plan instead)."""
    assert _cycles(_graph(ROOT / "eval")) == []
    assert _cycles(_graph(ROOT / "data_pipelines")) == [
        [
            "data_pipelines.loader.batcher",
            "data_pipelines.loader.stream",
            "data_pipelines.loader.worker",
        ]
    ]


def test_the_config_is_a_leaf():
    """Loading a config imports nothing of clipfnd but the error classes (which import
    nothing), so it needs no torch and no registry."""
    graph = _graph()
    assert graph["clipfnd.config"] <= {"clipfnd.errors"}
    assert graph["clipfnd.errors"] == set()


def test_the_report_needs_nothing_of_training():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("clipfnd.report"):
            assert not {d for d in deps if d.startswith("clipfnd.train")}, name


def test_the_step_checkpoints_and_metrics_take_their_pieces_as_arguments():
    """Nothing in train/ imports the loop or the build but the loop (and the CLI)."""
    graph = _graph()
    for name, deps in graph.items():
        if name in ("clipfnd.train.loop", "clipfnd.cli.main"):
            continue
        assert "clipfnd.train.loop" not in deps, name
        if name != "clipfnd.train.build" and name.startswith("clipfnd.train"):
            assert "clipfnd.train.build" not in deps, name


def test_no_function_in_train_is_over_80_lines():
    long = []
    for path in (PKG / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (parts[1:] and parts[1] in PACKAGES) else module


PACKAGES = ("models", "losses", "methods", "fnd", "state", "train", "export", "report", "cli")

# what each room may import of the project (docs/architecture.md, "Rooms")
ALLOWED = {
    "clipfnd.errors": set(),
    "clipfnd.config": {"clipfnd.errors"},
    "clipfnd.distributed": set(),
    "clipfnd.plots": set(),
    "clipfnd.losses": set(),
    "clipfnd.models": {"clipfnd.errors"},
    "clipfnd.state": {"clipfnd.distributed", "clipfnd.errors"},
    "clipfnd.methods": {"clipfnd.losses", "clipfnd.state", "clipfnd.config"},
    "clipfnd.fnd": {"clipfnd.state", "clipfnd.distributed", "clipfnd.config"},
    "clipfnd.registry": {"clipfnd.config", "clipfnd.methods", "clipfnd.fnd"},
    "clipfnd.checkpoints": {"clipfnd.models", "clipfnd.errors"},
    "clipfnd.export": {"clipfnd.checkpoints", "clipfnd.models", "clipfnd.errors"},
    "clipfnd.report": {
        "clipfnd.checkpoints",
        "clipfnd.config",
        "clipfnd.registry",
        "clipfnd.fnd",
        "clipfnd.state",
        "clipfnd.plots",
        "clipfnd.errors",
    },
}


def test_each_room_imports_only_what_the_architecture_page_allows():
    uses: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        room = _room(name)
        uses.setdefault(room, set()).update(_room(d) for d in deps if _room(d) != room)
    train_may = set(uses) - {"clipfnd.train", "clipfnd.report", "clipfnd.cli", "clipfnd.export"}
    for room, deps in uses.items():
        if room == "clipfnd.train":
            assert deps <= train_may, deps - train_may
        elif room in ALLOWED:
            assert deps <= ALLOWED[room], f"{room} imports {sorted(deps - ALLOWED[room])}"


def _project_imports(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "clipfnd":  # from clipfnd import distributed
                    names = [f"clipfnd.{a.name}" for a in node.names]
            out |= {_room(n) for n in names if n.split(".")[0] == "clipfnd"}
    return out


def test_data_pipelines_and_eval_stay_below_training():
    assert _project_imports(ROOT / "data_pipelines") == set()
    allowed = {"clipfnd.checkpoints", "clipfnd.models", "clipfnd.distributed", "clipfnd.errors"}
    assert _project_imports(ROOT / "eval") <= allowed


def test_no_benchmark_reaches_into_the_tests():
    """Helpers the benchmarks share with the tests live in ``clipfnd.testing``: no benchmark
    puts ``tests/`` on ``sys.path`` or imports a module of ``tests/``."""
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    found = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in test_modules]
        found += [
            f"{path.name}: {line.strip()}"
            for line in text.splitlines()
            if "sys.path" in line and "tests" in line
        ]
    assert not found, found


def test_nothing_of_the_package_imports_its_testing_helpers():
    """``clipfnd.testing`` serves the tests and benchmarks: training, evaluation, the report and
    the CLI never import it."""
    users = sorted(
        n
        for n, deps in _graph().items()
        if not n.startswith("clipfnd.testing")
        and any(d.startswith("clipfnd.testing") for d in deps)
    )
    assert not users, users
