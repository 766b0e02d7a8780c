"""The import graph of src/hdopt: every part imports only parts on a lower floor, and no cycle crosses parts.

A part is a top-level module or package of hdopt (``hdopt.zo``, ``hdopt.io``, ...; ``hdopt`` itself is the
package's ``__init__``, which holds ``__version__``). The floors, bottom to top, are :data:`LAYERS`. A part
may import any part on a lower floor, never one on its own floor or above. Imports inside functions count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("hdopt", "io", "registry", "plotting", "memory"),  # the bottom floor: writes, registries, plots, memory
    ("zo",),  # forward-only optimizers: torch only
    ("distributed", "lm"),  # the distributed engine; models, tasks and evaluation
    ("dynamics",),  # measurements and the lab's experiments (Local SGD's runs on distributed)
    ("finetune", "tint", "demo"),  # fine-tuning recipes (on lm, zo, distributed), TinT, the demo
    ("integrations",),  # adapters to other ecosystems
    ("report",),  # the runnable talk: runs everything below
    ("cli",),  # the one entry point; nothing imports it...
    ("__main__",),  # ...except ``python -m hdopt``
)
FLOOR = {part: floor for floor, parts in enumerate(LAYERS) for part in parts}

# Known exceptions: (importing module, imported part) -> why, and what removes it. Add nothing here: fix
# the import instead (move the shared piece down, or the importing module up).
ALLOWED: dict[tuple[str, str], str] = {
}


def source_modules(root: Path = SRC) -> dict[str, str]:
    """``{module name: source}`` for every ``.py`` file under ``root/hdopt``."""
    out = {}
    for path in sorted((root / "hdopt").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text(encoding="utf-8")
    return out


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def imports(module: str, source: str, known: set[str], is_package: bool = False) -> list[tuple]:
    """``(imported hdopt module, imported name, line)`` for each import of hdopt in ``source``.

    ``from hdopt.x import y`` counts as importing ``hdopt.x.y`` when that is a module, else ``hdopt.x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (base, alias.name, node.lineno))
    return [(target, name, line) for target, name, line in found if target.split(".")[0] == "hdopt"]


def import_edges(modules: dict[str, str], packages: set[str] = frozenset()) -> list[tuple]:
    """``(importer, imported module, imported name, line)`` for every hdopt import in ``modules``."""
    known = set(modules)
    return [(module, target, name, line) for module, source in modules.items()
            for target, name, line in imports(module, source, known, module in packages)]  # fmt: skip


def upward_imports(edges, allowed=ALLOWED) -> list[str]:
    """Imports of a part on the importer's floor or above, as ``importer:line imports target``."""
    bad = []
    for module, target, _, line in edges:
        src, dst = part_of(module), part_of(target)
        if src != dst and FLOOR[dst] >= FLOOR[src] and (module, dst) not in allowed:
            floors = f"{src} is on floor {FLOOR[src]}, {dst} on {FLOOR[dst]}"
            bad.append(f"{module}:{line} imports {target} ({floors})")
    return bad


def part_cycle(edges, allowed=ALLOWED) -> list[str]:
    """One cycle of the part graph (``[a, b, ..., a]``), or ``[]`` when there is none."""
    graph: dict[str, set[str]] = {}
    for module, target, _, _ in edges:
        src, dst = part_of(module), part_of(target)
        if src != dst and (module, dst) not in allowed:
            graph.setdefault(src, set()).add(dst)
    done: set[str] = set()

    def visit(part: str, path: list[str]) -> list[str]:
        if part in path:
            return path[path.index(part):] + [part]
        if part in done:
            return []
        for nxt in sorted(graph.get(part, ())):
            if cycle := visit(nxt, path + [part]):
                return cycle
        done.add(part)
        return []

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return []


def private_imports(edges) -> list[str]:
    """``from hdopt.x import _name`` in a module other than ``hdopt.x``."""
    return [f"{module}:{line} imports {name} from {target}" for module, target, name, line in edges
            if name.startswith("_") and not name.startswith("__") and module != target]  # fmt: skip


def _real_edges():
    modules = source_modules()
    packages = {m for m in modules if (SRC / Path(*m.split(".")) / "__init__.py").is_file()}
    return modules, import_edges(modules, packages)


def test_every_part_has_a_floor():
    modules, _ = _real_edges()
    missing = sorted({part_of(m) for m in modules} - set(FLOOR))
    assert not missing, f"parts without a floor: {missing}; add them to LAYERS in {Path(__file__).name}"


def test_no_part_imports_a_part_on_its_floor_or_above():
    _, edges = _real_edges()
    assert upward_imports(edges) == []


def test_no_import_cycle_across_parts():
    _, edges = _real_edges()
    assert part_cycle(edges) == []


def test_every_allowed_exception_is_still_needed():
    _, edges = _real_edges()
    used = {(module, part_of(target)) for module, target, _, _ in edges}
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"nothing needs these entries of ALLOWED in {Path(__file__).name}: delete {stale}"


def test_no_private_name_is_imported_from_another_module():
    _, edges = _real_edges()
    assert private_imports(edges) == []


def test_the_checks_catch_upward_and_sideways_imports_cycles_and_private_names():
    modules = {
        "hdopt.io": "import os\n",
        "hdopt.zo": "",
        "hdopt.zo.optim": "from hdopt.io import atomic_write_bytes\n",  # down: fine
        "hdopt.zo.noise": "def f():\n    from hdopt.finetune import trainer\n",  # up, inside a function
        "hdopt.finetune": "",
        "hdopt.finetune.trainer": "from hdopt import zo\nfrom hdopt.lm.scoring import _unwrap, score\n",
        "hdopt.lm.scoring": "from hdopt.distributed import comm\nfrom . import models\n",  # sideways
        "hdopt.lm.models": "from ..io import atomic_write_json\n",  # relative, down: fine
        "hdopt.distributed.comm": "",
    }
    edges = import_edges(modules, packages={"hdopt.finetune", "hdopt.zo"})
    assert ("hdopt.lm.models", "hdopt.io", "atomic_write_json", 1) in edges
    assert upward_imports(edges) == [
        "hdopt.zo.noise:2 imports hdopt.finetune.trainer (zo is on floor 1, finetune on 4)",
        "hdopt.lm.scoring:1 imports hdopt.distributed.comm (lm is on floor 2, distributed on 2)",
    ]
    assert part_cycle(edges) == ["finetune", "zo", "finetune"]
    assert part_cycle(edges, allowed={("hdopt.zo.noise", "finetune")}) == []
    allowed = {("hdopt.zo.noise", "finetune"), ("hdopt.lm.scoring", "distributed")}
    assert upward_imports(edges, allowed) == []
    assert private_imports(edges) == ["hdopt.finetune.trainer:2 imports _unwrap from hdopt.lm.scoring"]
