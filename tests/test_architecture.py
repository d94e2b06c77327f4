"""The layer rule of docs/ARCHITECTURE.md, checked by reading every import (module level and inside
functions) of cluster_service/ and feature_extraction/ with `ast`:

    core <- train <- runtime <- ops;  serve on core and io;  everything may use io and config;
    curate (duplicates, outliers, samples, export) on serve, core and index, used by ops and bench;
    report (evaluation, plots, the run report; reads models via serve) only from runtime, ops and bench;
    bench sits on top (it measures ops);  only ops and bench import feature_extraction;
    mlflow only in runtime/tracking.py and serve/pyfunc.py;  torch.distributed only in train/comm.py;
    faiss only in index.py;  no import cycles between modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"config", "io"}  # every layer may use these
ALLOWED = {
    "core": {"core", "index"},
    "io": set(),
    "serve": {"serve", "core", "index"},
    "train": {"train", "core", "serve", "index"},
    "report": {"report", "serve", "index"},  # the run report reads the model directory
    "curate": {"curate", "serve", "core", "index"},  # duplicates, outliers, samples, export of a run
    "runtime": {"runtime", "train", "serve", "core", "report", "index"},
    "ops": {"ops", "runtime", "train", "serve", "core", "report", "curate", "index", "datasets"},
    "bench": {"bench", "ops", "runtime", "train", "serve", "core", "report", "curate", "index", "datasets"},
    "index": set(),
    "config": set(),
    "datasets": set(),
    "feature_extraction": {"runtime.ray_session"},
}
ONLY_IN = {  # third-party package -> the modules allowed to import it
    "mlflow": {"cluster_service/runtime/tracking.py", "cluster_service/serve/pyfunc.py"},
    "torch.distributed": {"cluster_service/train/comm.py"},
    "faiss": {"cluster_service/index.py"},
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for the project's own packages."""
    out = {}
    for pkg in ("cluster_service", "feature_extraction"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import in the file, functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "feature_extraction":
        return "feature_extraction"
    return parts[1] if len(parts) > 1 else "package"


def test_layers_import_only_what_the_rule_allows():
    mods = modules()
    bad = []
    for name, path in mods.items():
        if name in ("cluster_service", "feature_extraction"):
            continue
        own = layer(name)
        allowed = ALLOWED[own] | BASE | {own}
        for target, line in imports_of(path):
            if target.startswith("feature_extraction") and own not in ("ops", "feature_extraction", "bench"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (only ops imports feature_extraction)")
            if not target.startswith("cluster_service.") or target not in mods:
                continue
            dep = target.split(".", 1)[1]
            top = dep.split(".")[0]
            if top not in allowed and dep not in allowed and dep.rsplit(".", 1)[0] not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target}")
    assert not bad, "layer rule broken (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_framework_touch_points_stay_in_their_modules():
    bad = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        for target, line in imports_of(path):
            for pkg, owners in ONLY_IN.items():
                if (target == pkg or target.startswith(pkg + ".")) and rel not in owners:
                    bad.append(f"{rel}:{line} imports {target} (only {', '.join(sorted(owners))})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        for target, _ in imports_of(path):
            if target in mods and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    # Tarjan's strongly connected components; any component of two or more modules is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(comp))

    for v in list(mods):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_test_sees_a_violation(tmp_path):
    """The checker itself: an import that breaks the rule is reported (so a passing test means something)."""
    f = tmp_path / "engine.py"
    f.write_text("def f():\n    from cluster_service.ops.cli import app\n    import mlflow\n")
    assert ("cluster_service.ops.cli", 2) in imports_of(f) and ("mlflow", 3) in imports_of(f)
    assert "ops" not in ALLOWED["train"] and layer("cluster_service.train.engine") == "train"


def test_the_module_table_names_every_module():
    """docs/ARCHITECTURE.md's module table has a row per package whose modules column names each of its files."""
    rows = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`") and cells[1].endswith("/`"):
            rows[cells[1].strip("`").rstrip("/")] = cells[3]
    missing = []
    for pkg in ("cluster_service", "feature_extraction", "jobs", "deploy"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            row = parts[1] if pkg == "cluster_service" and len(parts) > 2 else pkg
            if f.stem == "__init__" and (pkg != "cluster_service" or len(parts) > 2):
                continue  # a subpackage's __init__ holds only its docstring
            if f"`{f.stem}`" not in rows.get(row, ""):
                missing.append(str(f.relative_to(ROOT)))
    assert not missing, "not in the module table of docs/ARCHITECTURE.md: " + ", ".join(missing)
