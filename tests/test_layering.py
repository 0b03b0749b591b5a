"""Imports go one way: kept_jax's library <- bridge (Hugging Face in and out) <- the command-line programs.

The library (models, mapping, distillation, data, sharding, ...) never imports `bridge`, so a model or a recipe can be
used and tested without the Hugging Face layer; `bridge` never imports a command-line program.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
# Programs that read and write Hugging Face directories: they may use both packages.
PROGRAMS = {"kept_jax.convert", "kept_jax.train", "kept_jax.score", "kept_jax.pretrain", "kept_jax.recipes",
            "kept_jax.generate", "kept_jax.harness", "kept_jax.evaluate"}


def _module(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: pathlib.Path) -> set[str]:
    """Every module an import statement names, at any depth (imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(package: str) -> list[pathlib.Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found under {package}"
    return files


def test_the_library_never_imports_bridge():
    offenders = {_module(f): sorted(n for n in _imports(f) if n == "bridge" or n.startswith("bridge."))
                 for f in _files("kept_jax") if _module(f) not in PROGRAMS}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_library_never_climbs_back_to_a_program():
    """A config goes down one road: the program reads it and the layouts, the library's plan (kept_jax.plan) resolves
    them, and the job, the dry run and the recipes consume the plan; no library module reaches back up into a
    program to re-derive a piece of it."""
    offenders = {_module(f): sorted(n for n in _imports(f) if any(n == p or n.startswith(p + ".") for p in PROGRAMS))
                 for f in _files("kept_jax") if _module(f) not in PROGRAMS}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_bridge_never_imports_a_program():
    offenders = {_module(f): sorted(n for n in _imports(f) if any(n == p or n.startswith(p + ".") for p in PROGRAMS))
                 for f in _files("bridge")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from bridge.checkpoint import load_checkpoint\n")
    assert "bridge.checkpoint" in _imports(probe)


def test_no_import_cycle_inside_the_library():
    """The modules of kept_jax and bridge import one another in one direction (imports inside functions count):
    `kept_jax.config` once needed the registry that imports every architecture, which imports it."""
    modules = {_module(f): f for package in ("kept_jax", "bridge") for f in _files(package)}
    graph = {m: {n for n in _imports(f) if n in modules and n != m} for m, f in modules.items()}
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for n in sorted(graph[module]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
