"""The package's import graph has no cycle: not between modules, not between top-level rooms.

Every module under ``src/decorrelate`` is parsed with :mod:`ast` (nothing is imported), and every
``import`` / ``from ... import`` statement counts — at module level, inside functions (lazy
imports), under ``if TYPE_CHECKING`` alike — with relative imports resolved. Importing
``a.b.c`` runs the ``__init__`` of ``a.b`` first, so an import of a module also counts as one of
every package above it (except packages that contain the importer: they are already being
imported). A *room* is a top-level module or package of ``decorrelate`` (``nn``, ``layers``,
``rules``, ``train``, ``fixedpoint``, ...); the rooms are layered (data → model, nn, layers →
rules → train → experiments → cli), so no two may import each other, directly or around a loop,
and the core rooms never import the loop, the experiments or the command line.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Mapping
from pathlib import Path

PACKAGE = "decorrelate"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

Graph = Mapping[str, set[str]]


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module below ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def imported_names(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules an import statement anywhere in ``tree`` needs, relative ones resolved.

    ``from X import y`` needs the module ``X.y`` if there is one (a submodule), else ``X``
    itself (a name its ``__init__`` defines); ``known`` is the set of module names."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in known else target)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules whose import it triggers}`` within the package at ``root``.

    Each needed module, and every package above it that does not contain the importer (those
    are already being imported when the importer runs)."""
    mods = modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in mods.items():
        deps: set[str] = set()
        for target in imported_names(ast.parse(path.read_text()), name, is_package, known):
            if target not in known:
                continue  # another distribution (torch, ...)
            deps.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                above = ".".join(parts[:i])
                if not name.startswith(above + "."):
                    deps.add(above)
        deps.discard(name)
        graph[name] = deps
    return graph


def room_of(module: str) -> str:
    """``decorrelate.nn.sampling`` → ``decorrelate.nn``: the top-level module or package."""
    return ".".join(module.split(".")[:2])


def room_graph(graph: Graph) -> dict[str, set[str]]:
    """Imports between rooms (within a room they are the module graph's business)."""
    out: dict[str, set[str]] = {room_of(m): set() for m in graph}
    for module, deps in graph.items():
        out[room_of(module)].update(room_of(d) for d in deps if room_of(d) != room_of(module))
    return out


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            node = next(stack[-1], None)
            if node is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(node) == 1:
                return [*path[path.index(node) :], node]
            elif node not in state:
                state[node] = 1
                path.append(node)
                stack.append(iter(sorted(graph.get(node, ()))))
    return None


def test_the_graph_sees_lazy_relative_and_package_imports():
    """The parser itself: a function-level relative import is an edge, so is the package
    ``__init__`` it runs, and a cycle through them is found and spelled out."""
    tree = ast.parse(
        "from ..nn.sampling import choose\n"
        "def f():\n"
        "    from . import kinds\n"
        "    import decorrelate.train\n"
    )
    graph = import_graph(ROOT)
    names = imported_names(tree, "decorrelate.layers.registry", False, set(graph))
    assert names == {"decorrelate.nn.sampling", "decorrelate.layers.kinds", "decorrelate.train"}
    assert "decorrelate.nn" in graph["decorrelate.metrics"]  # from .nn import capturing
    assert "decorrelate.nn.decorrelation" in graph["decorrelate.metrics"]
    assert "decorrelate.layers" in graph["decorrelate.nn.decorrelation"]  # from ..layers import
    looped = {"a.x": {"a.y"}, "a.y": {"b.z"}, "b.z": {"a.x"}, "c": set()}
    assert find_cycle(looped) == ["a.x", "a.y", "b.z", "a.x"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_around_a_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_two_rooms_import_each_other():
    """E.g. ``train`` may import ``rules`` (the alignment probe lives there) but nothing under
    ``rules`` may import ``train``, and ``layers`` recognises ``nn``'s wrappers by the
    protocol it defines itself (:class:`decorrelate.layers.LayerWrapper`)."""
    graph = import_graph(ROOT)
    rooms = room_graph(graph)
    cycle = find_cycle(rooms)
    if cycle is not None:

        def importers(a: str, b: str) -> str:
            found = (m for m in graph if room_of(m) == a and any(room_of(d) == b for d in graph[m]))
            return f"{a} -> {b} (in {', '.join(sorted(found))})"

        links = [importers(a, b) for a, b in itertools.pairwise(cycle)]
        raise AssertionError("rooms import each other: " + "; ".join(links))
    assert {"decorrelate.train", "decorrelate.rules", "decorrelate.nn"} <= set(rooms)


#: The library's core (data, models, layers, decorrelation, rules, their helpers) and what is
#: built on it (the training loop, the experiments, the command line): the core never imports
#: upward, not even lazily inside a function. Rooms that do not exist (yet) are ignored.
CORE = (
    "checkpoint",
    "context",
    "data",
    "distributed",
    "errors",
    "layers",
    "losses",
    "metrics",
    "models",
    "nn",
    "rules",
    "seeding",
)
ABOVE = ("align", "cli", "compare", "experiments", "train")


def test_the_core_never_imports_the_loop_the_experiments_or_the_cli():
    graph = import_graph(ROOT)
    above = {f"{PACKAGE}.{r}" for r in ABOVE}
    wrong = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if room_of(m).split(".")[-1] in CORE
        for d in deps
        if room_of(d) in above
    )
    assert not wrong, "the core imports upward: " + "; ".join(wrong)
