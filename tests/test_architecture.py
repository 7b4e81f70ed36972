"""The shape of the code: imports only go down the layers, with no cycle anywhere (imports made
inside functions and a package's own __init__ count), and the pages reach the library through
its doors."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict:
    found = {}
    for path in (ROOT / "phpn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """Every phpn module ``name`` imports, wherever the import stands, with the packages the
    import runs on the way (importing a.b.c runs a/__init__ and a/b/__init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            pieces = target.split(".")
            for i in range(2, len(pieces) + 1):
                step = ".".join(pieces[:i])
                if step in modules and step != name and not name.startswith(step + "."):
                    out.add(step)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_round_a_loop():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(modules) > 50 and sum(map(len, graph.values())) > 200  # the graph is really read
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_loop_through_an_import_inside_a_function():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_imports_only_go_down_the_layers():
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_the_app_entry_point_is_three_lines_and_the_pages_are_installed_with_the_package():
    lines = [line for line in (ROOT / "app.py").read_text().splitlines() if line.strip()]
    assert len(lines) <= 4 and "from phpn.app.main import main" in lines
    setup = (ROOT / "setup.py").read_text()
    assert '"phpn.app.pages": "pages"' in setup
    from phpn.app.main import PAGES

    for key, _, _ in PAGES:
        assert (ROOT / "pages" / f"{key}.py").is_file()


def test_pages_hold_no_maths():
    """Pages call the library: no torch or numpy arithmetic of their own."""
    for page in sorted((ROOT / "pages").glob("*.py")):
        tree = ast.parse(page.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"scipy", "sklearn"}, page.name


# What a page may import of phpn: the one door (phpn.api), the app's shared frame, and the
# words, defaults and drawings the pages show. Workflows (pipeline, runs, models, images,
# method) are reached through phpn.api only.
PAGE_IMPORTS = ("phpn.api", "phpn.app", "phpn.config", "phpn.errors", "phpn.glossary", "phpn.show", "phpn.evaluate")


def test_pages_reach_the_library_through_its_door():
    for page in sorted((ROOT / "pages").glob("*.py")):
        tree = ast.parse(page.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "phpn":
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "phpn" else [node.module]
                for name in names:
                    assert name.startswith(PAGE_IMPORTS), f"{page.name}:{node.lineno} imports {name}: use phpn.api"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] != "phpn" or a.name.startswith(PAGE_IMPORTS), \
                        f"{page.name}:{node.lineno} imports {a.name}: use phpn.api"
        top = {id(n) for n in tree.body}
        local = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
                 and not (isinstance(n, ast.Import) and n.names[0].name.startswith("plotly"))]
        assert not local, f"{page.name}: imports inside blocks at lines {local} (only optional plotly may be)"


# Files whose ``.meta`` is not a run's: torch.fx nodes' metadata (shapes, module stacks) and
# torchvision weights' metadata (class names).
OTHER_METAS = {
    "phpn/models/split/walk.py": "torch.fx node.meta['nn_module_stack']",
    "phpn/models/split/plan.py": "torch.fx node.meta['tensor_meta']",
    "phpn/models/zoo.py": "torchvision weights.meta['categories']",
    "phpn/demos/lite0_photos.py": "torchvision weights.meta['categories']",
}


def _meta_key_reads(source: str) -> list:
    """Lines that read or write a key of something's ``.meta``: ``x.meta[...]``, ``x.meta.get(...)``,
    ``.setdefault``, ``.pop`` or ``.update``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            inner = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "setdefault", "pop", "update"):
            inner = node.func.value
        else:
            continue
        if isinstance(inner, ast.Attribute) and inner.attr == "meta":
            found.append(node.lineno)
    return sorted(found)


def test_the_meta_key_finder_sees_subscripts_and_gets():
    source = ('a = run.meta["certificate"]\nb = r.meta.get("classes", [])\nrun.meta["demo"] = 1\nc = run.settings["k"]\n'
              'run.meta.setdefault("data", {})\n')
    assert _meta_key_reads(source) == [1, 2, 3, 5]


def test_only_phpn_runs_reads_run_json_by_its_keys():
    """Outside phpn.runs a run's record is read through Run's named properties (run.settings,
    run.recorded_certificate, run.class_records…), so that run.json's layout has one home."""
    files = [p for p in (ROOT / "phpn").rglob("*.py") if "runs" not in p.relative_to(ROOT / "phpn").parts[:1]]
    files += sorted((ROOT / "pages").glob("*.py"))
    offenders = []
    for path in files:
        where = path.relative_to(ROOT).as_posix()
        if where in OTHER_METAS:
            continue
        offenders += [f"{where}:{line}" for line in _meta_key_reads(path.read_text(encoding="utf-8"))]
    assert not offenders, f"run.json read by its keys outside phpn.runs (use Run's properties): {offenders}"
    for where in OTHER_METAS:  # the allow-list names files that still need it
        assert _meta_key_reads((ROOT / where).read_text(encoding="utf-8")), f"{where} no longer needs its exception"
