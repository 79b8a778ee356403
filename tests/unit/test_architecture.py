"""The import structure of ``mlpkg``, read from the source with ``ast`` (nothing is imported).

Rules (see /work/shared/ARCHITECTURE.md):

* the product never imports the simulator, not even through another module;
* the import graph of the product has no cycle, counting imports inside functions too;
* every room sits on a floor and no import points to a higher floor;
* an ``mlpkg`` import inside a function is there for start-up time, never to hide a cycle:
  lifting it to module level must create none.

A room is a module or a package (``mlpkg.allocation`` places every module in it); a more
specific entry wins over its package's.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = "mlpkg"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
SIMULATOR = "mlpkg.simulator"

#: Floors, ground up. Names that do not exist yet are the target layout's (ARCHITECTURE.md), so
#: a module created under one of them is placed already.
FLOOR_NAMES = [
    "config, contracts, db",
    "validation, evaluation",
    "sources, ingest, features, models",
    "registry, training",
    "allocation, delivery, feedback",
    "gate, reports",
    "stages",
    "cli",
    "simulator and its lab",
]
FLOORS: dict[str, int] = {
    "mlpkg": 0,  # the package's own __init__ (a docstring and the version)
    "mlpkg.config": 0,
    "mlpkg.progress": 0,  # progress reports of long stages (the CLI's bar listens)
    "mlpkg.mlflow_links": 0,  # MLflow UI links in the model-training workflow
    "mlpkg.contracts": 0,
    "mlpkg.db": 0,
    "mlpkg.validation": 1,
    "mlpkg.event_store": 1,  # the Parquet parts of behaviour events beside the warehouse
    "mlpkg.privacy": 1,  # keyed pseudonyms, forget and retention purge (ingest pseudonymises with it)
    "mlpkg.evaluation": 1,
    "mlpkg.sources": 2,
    "mlpkg.ingest": 2,
    "mlpkg.data": 2,  # ingest + point-in-time frames
    "mlpkg.campaign_logs": 2,  # ingest of a historical campaign log (bring-your-own data)
    "mlpkg.features": 2,
    "mlpkg.models": 2,
    "mlpkg.registry": 3,
    "mlpkg.training": 3,
    "mlpkg.train": 3,
    "mlpkg.recommend": 3,  # the product recommender: fit, time-split evaluation, MLflow registration
    "mlpkg.allocation": 4,
    "mlpkg.delivery": 4,
    "mlpkg.feedback": 4,
    "mlpkg.gate": 5,
    "mlpkg.model_selection": 5,  # each training's model family, chosen on the log's validation part
    "mlpkg.reports": 5,  # reads feedback and the registry for product owners
    "mlpkg.report_page": 0,  # the campaign page (Jinja2 template and number formats), no product imports
    "mlpkg.offline_eval": 5,  # `couponops evaluate`: any policy on a logged campaign or the ledger
    "mlpkg.campaign_runs": 5,  # the campaigns as plain rows (the Airflow plugin's Campaigns view)
    "mlpkg.stages": 6,
    "mlpkg.cli": 7,
    "mlpkg.simulator": 8,  # the world and its lab (closed loop, policy quality against the oracle)
}
LAB_FLOOR = FLOORS[SIMULATOR]

#: Product modules that still reach the simulator (directly or through another module), by name,
#: with what to fix. ``mlpkg.stages`` (load_world), ``mlpkg.cli`` (the closed-loop command) and
#: ``mlpkg.evaluation.closed_loop`` (lab code, now mlpkg.simulator.lab.closed_loop) were the
#: last ones. Keep it empty: an entry is for a known offence being removed, and the test fails
#: once its module is clean so that the entry goes too.
KNOWN_OFFENDERS: dict[str, str] = {}

#: The simulated world (what ``import mlpkg.simulator`` runs) may load only this floor of the product.
WORLD_MAY_IMPORT_FLOOR = 0


@dataclass(frozen=True)
class Import:
    """One import of an ``mlpkg`` module found in the source."""

    importer: str
    target: str
    path: Path
    line: int
    function_level: bool
    type_only: bool
    written: str = ""  # the module named in the source, when it is not ``target`` (no such module)

    @property
    def resolved(self) -> bool:
        """Return whether the import names a module that exists."""
        return not self.written

    def where(self) -> str:
        """Return ``path:line``, relative to the repository for mlpkg's own files."""
        path = (
            self.path.relative_to(PACKAGE_DIR.parent) if self.path.is_relative_to(PACKAGE_DIR) else self.path
        )
        return f"{path}:{self.line}"


def module_name(path: Path, package_dir: Path) -> str:
    """Return the dotted name of the module in ``path``."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(package_dir: Path) -> dict[str, Path]:
    """Return every module of the package by dotted name."""
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def is_package(name: str, modules: Mapping[str, Path]) -> bool:
    """Return whether ``name`` is a package (its file is an ``__init__.py``)."""
    return name in modules and modules[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Collect ``mlpkg`` imports with whether they run inside a function or only for type checkers."""

    def __init__(self, importer: str, path: Path, modules: Mapping[str, Path], root: str):
        self.importer, self.path, self.modules, self.root = importer, path, modules, root
        self.depth = 0
        self.type_only = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function  # noqa: N815

    def visit_If(self, node: ast.If) -> None:  # noqa: N802
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_only += 1
        for child in node.body:
            self.visit(child)
        self.type_only -= 1
        for child in node.orelse:
            self.visit(child)

    def _add(self, dotted: str, line: int) -> None:
        # A name that is no module (a typo, a module moved away): the longest prefix that is one,
        # which is what Python runs before it fails; the import is marked unresolved.
        target = dotted
        while target not in self.modules and "." in target:
            target = target.rsplit(".", 1)[0]
        self.found.append(
            Import(
                self.importer,
                target,
                self.path,
                line,
                self.depth > 0,
                self.type_only > 0,
                written="" if target == dotted else dotted,
            )
        )

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            if alias.name == self.root or alias.name.startswith(self.root + "."):
                self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        base = node.module or ""
        if node.level:
            package = self.importer
            if not is_package(package, self.modules):
                package = package.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{base}" if base else package
        if base != self.root and not base.startswith(self.root + "."):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else base, node.lineno)


def collect_imports(modules: Mapping[str, Path], root: str = PACKAGE) -> list[Import]:
    """Return every import of a module of ``root``, at module level and inside functions.

    ``from a import x, y`` of two names that are not modules is one import of ``a``.
    """
    found: dict[Import, None] = {}
    for name, path in modules.items():
        collector = _Collector(name, path, modules, root)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.update(dict.fromkeys(collector.found))
    return list(found)


def runs_on_import(importer: str, target: str) -> list[str]:
    """Return the modules that importing ``target`` from ``importer`` executes.

    Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first; those of the
    importer's own packages are already running, so they are left out.
    """
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts))]
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return [p for p in chain if p not in own] + [target]


def build_graph(
    imports: Iterable[Import], *, exclude: str | None = None, with_type_only: bool = False
) -> dict[str, dict[str, Import]]:
    """Return ``{importer: {imported: the import that causes it}}`` (package inits included)."""
    graph: dict[str, dict[str, Import]] = {}

    def excluded(name: str) -> bool:
        return exclude is not None and (name == exclude or name.startswith(exclude + "."))

    for imp in imports:
        if excluded(imp.importer) or (imp.type_only and not with_type_only):
            continue
        edges = graph.setdefault(imp.importer, {})
        for target in runs_on_import(imp.importer, imp.target):
            if target != imp.importer and not excluded(target):
                edges.setdefault(target, imp)
    return graph


def path_between(graph: Mapping[str, Mapping[str, Import]], start: str, goal: set[str]) -> list[str] | None:
    """Return the shortest import chain from ``start`` to a module in ``goal`` (BFS), or None."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, {})):
            if nxt in goal:
                chain = [node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])  # type: ignore[arg-type]
                return [*chain[::-1], nxt]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def find_cycle(graph: Mapping[str, Mapping[str, Import]]) -> list[str] | None:
    """Return one import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    for start in sorted(graph):
        back = path_between(graph, start, {start})
        if back is not None:
            return back
    return None


def describe(chain: list[str], graph: Mapping[str, Mapping[str, Import]]) -> str:
    """Return an import chain with the file and line of every step."""
    steps = [f"{a} -> {b} ({graph[a][b].where()})" for a, b in zip(chain, chain[1:], strict=False)]
    return "\n    ".join(steps)


def floor_of(module: str, floors: Mapping[str, int] = FLOORS, root: str = PACKAGE) -> int | None:
    """Return the floor of the most specific room that holds ``module``, or None.

    The root package's entry places its ``__init__`` only: a new top-level module is unplaced.
    """
    room = room_of(module, floors, root)
    return None if room is None else floors[room]


def room_of(module: str, floors: Mapping[str, int] = FLOORS, root: str = PACKAGE) -> str | None:
    """Return the most specific room (a key of ``floors``) that holds ``module``, or None."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name == root and name != module:
            return None
        if name in floors:
            return name
    return None


def in_simulator(module: str) -> bool:
    """Return whether ``module`` is the simulator or one of its modules (lab included)."""
    return module == SIMULATOR or module.startswith(SIMULATOR + ".")


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return discover(PACKAGE_DIR)


@pytest.fixture(scope="module")
def imports(modules) -> list[Import]:
    return collect_imports(modules)


def test_the_source_is_found_and_imports_are_read(modules, imports):
    # Guards the rules below against passing on an empty or misread tree.
    assert {"mlpkg.config", "mlpkg.registry", "mlpkg.allocation.campaign", "mlpkg.simulator.world"} <= set(
        modules
    )
    pairs = {(i.importer, i.target) for i in imports}
    assert ("mlpkg.allocation.campaign", "mlpkg.allocation.solver") in pairs
    assert ("mlpkg.db.queries", "mlpkg.db.models") in pairs  # ``from mlpkg.db import models as m``


def _numbered() -> list[tuple[str, str]]:
    return [(str(i), name) for i, name in enumerate(FLOOR_NAMES)]


def test_every_mlpkg_import_names_a_module_that_exists(imports):
    broken = [
        f"{i.where()}: {i.importer} imports {i.written}, which is not a module of mlpkg"
        for i in imports
        if not i.resolved
    ]
    assert not broken, "imports of modules that do not exist (moved or renamed?):\n  " + "\n  ".join(broken)


def test_every_module_has_a_floor(modules):
    unplaced = sorted(m for m in modules if floor_of(m) is None)
    assert not unplaced, (
        f"{unplaced} sit on no floor: add each (or its package) to FLOORS in {Path(__file__).name}, on "
        f"the floor ARCHITECTURE.md gives its room ({'; '.join(map(': '.join, _numbered()))})"
    )


def test_no_import_points_to_a_higher_floor(imports):
    upward = []
    for imp in imports:
        low, high = floor_of(imp.importer), floor_of(imp.target)
        if low is None or high is None or high <= low:
            continue
        if imp.importer in KNOWN_OFFENDERS and high == LAB_FLOOR:
            continue  # reported (and ratcheted) by the simulator test below
        upward.append(
            f"{imp.where()}: {imp.importer} (floor {low}: {FLOOR_NAMES[low]}) imports {imp.target} "
            f"(floor {high}: {FLOOR_NAMES[high]})"
        )
    upward = sorted(set(upward))
    assert not upward, "imports that point up a floor; move the shared code down instead:\n  " + "\n  ".join(
        upward
    )


def _by_length(item: tuple[str, list[str]]) -> tuple[int, str]:
    return len(item[1]), item[0]  # the direct importers first: that is where to fix it


def test_the_product_never_imports_the_simulator(modules, imports):
    graph = build_graph(imports, with_type_only=True)
    goal = {m for m in modules if in_simulator(m)}
    reaching = {}
    for module in sorted(m for m in modules if not in_simulator(m)):
        chain = path_between(graph, module, goal)
        if chain is not None:
            reaching[module] = chain
    new = {m: c for m, c in reaching.items() if m not in KNOWN_OFFENDERS}
    assert not new, "product modules that import the simulator (the world is outside the product):\n  " + (
        "\n  ".join(f"{m}:\n    {describe(c, graph)}" for m, c in sorted(new.items(), key=_by_length)[:10])
    )
    cleaned = sorted(set(KNOWN_OFFENDERS) - set(reaching))
    assert not cleaned, f"{cleaned} no longer reach mlpkg.simulator: remove them from KNOWN_OFFENDERS"


def test_the_simulated_world_loads_only_the_ground_floor(modules, imports):
    # The world (what ``import mlpkg.simulator`` runs: the shop, its customers, its exports) is a
    # data source and a channel provider: it never loads the model, the allocator or the registry.
    # The lab and the simulator's command line drive the product and are imported on their own.
    graph = build_graph(imports)
    product = {m for m in modules if not in_simulator(m) and (floor_of(m) or 0) > WORLD_MAY_IMPORT_FLOOR}
    chain = path_between(graph, SIMULATOR, product)
    assert chain is None, "importing mlpkg.simulator loads the product:\n    " + describe(chain, graph)


def test_the_import_graph_of_the_product_has_no_cycle(imports):
    graph = build_graph(imports, exclude=SIMULATOR)
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle (imports inside functions count: they only hide a cycle):\n    "
        + describe(cycle, graph)
    )


def test_rooms_do_not_import_each_other_in_a_cycle(imports):
    # Rooms on one floor may import each other one way only (training imports the registry,
    # never the reverse); across floors the floor rule already forbids it.
    rooms: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.type_only:
            continue
        for target in runs_on_import(imp.importer, imp.target):
            a, b = room_of(imp.importer), room_of(target)
            if a is not None and b is not None and a != b:
                rooms.setdefault(a, {}).setdefault(b, imp)
    cycle = find_cycle(rooms)
    assert cycle is None, "rooms that import each other in a cycle:\n    " + describe(cycle, rooms)


def test_no_function_level_mlpkg_import_hides_a_cycle(imports):
    graph = build_graph(imports, exclude=SIMULATOR)
    hidden = []
    for imp in imports:
        if not imp.function_level or imp.type_only or in_simulator(imp.importer) or in_simulator(imp.target):
            continue
        for target in runs_on_import(imp.importer, imp.target):
            back = path_between(graph, target, {imp.importer})
            if back is not None:
                hidden.append(
                    f"{imp.where()}: {imp.importer} imports {imp.target} inside a function; at module "
                    f"level it would close the cycle\n    {describe(back, graph)}"
                )
                break
    assert not hidden, (
        "function-level imports that only dodge a cycle (move the shared code down a floor):\n  "
        + "\n  ".join(hidden)
    )


def _write_package(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_checker_sees_a_cycle_hidden_in_a_function_and_through_a_package_init(tmp_path):
    package_dir = _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "def f():\n    from pkg.high import g\n    return g\n",
            "pkg/high.py": "from pkg.sub.leaf import h\n",
            "pkg/sub/__init__.py": "from pkg.sub import reexport\n",
            "pkg/sub/reexport.py": "import pkg.low\n",
            "pkg/sub/leaf.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg import high\n",
            "pkg/moved.py": "from pkg.sub.gone import x\nimport pkg.sub.leaf\n",
        },
    )
    mods = discover(package_dir)
    found = collect_imports(mods, root="pkg")
    by_pair = {(i.importer, i.target): i for i in found}
    assert by_pair[("pkg.low", "pkg.high")].function_level
    assert not by_pair[("pkg.high", "pkg.sub.leaf")].function_level
    assert by_pair[("pkg.sub.leaf", "pkg.high")].type_only
    assert not by_pair[("pkg.moved", "pkg.sub")].resolved  # pkg.sub.gone does not exist
    assert by_pair[("pkg.moved", "pkg.sub.leaf")].resolved
    graph = build_graph(found)
    # high -> sub.leaf runs pkg.sub's __init__, which re-exports a module that imports low.
    assert find_cycle(graph) == ["pkg.high", "pkg.sub", "pkg.sub.reexport", "pkg.low", "pkg.high"]
    assert path_between(graph, "pkg.sub.leaf", {"pkg.high"}) is None  # type-only imports do not run


def test_floors_place_a_module_by_its_most_specific_room():
    assert floor_of("mlpkg.allocation.campaign") == FLOORS["mlpkg.allocation"]
    assert floor_of("mlpkg.simulator.lab.closed_loop") == LAB_FLOOR
    floors = {"mlpkg": 0, "mlpkg.evaluation": 1, "mlpkg.evaluation.lab_code": 8}
    assert floor_of("mlpkg.evaluation.lab_code", floors) == 8
    assert floor_of("mlpkg.evaluation.ope", floors) == 1
    assert room_of("mlpkg.evaluation.lab_code.x", floors) == "mlpkg.evaluation.lab_code"
    assert floor_of("mlpkg_other.x") is None
    assert floor_of("mlpkg.new_room") is None  # the root's entry does not place new top-level modules
    assert floor_of("mlpkg") == 0
