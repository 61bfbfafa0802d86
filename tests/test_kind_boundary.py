"""The engine knows no job kind: a third kind is a new package, not an edit of the engine.

Every module of ``bec/pipeline/`` and ``bec/control/`` is shared by all kinds, except the stage
modules only one kind names (``JobKind.stage_modules``: ldv1's inference and post processes
live in ``bec/pipeline/`` as process kinds of the diagram; fetch is every kind's). None of the shared ones
imports a kind's package; the registry (``jobkinds.KINDS``) names them by module path only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import bec
from bec.control import jobkinds

KIND_PACKAGES = ("bec.ldv1", "bec.ocr")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_shared_engine_module_imports_a_kind() -> None:
    root = Path(bec.__file__).parent
    named = [module for name in jobkinds.KINDS for module in jobkinds.kind_of(name).stage_modules.values()]
    own = {module for module in named if named.count(module) == 1}  # a stage two kinds run is shared
    shared = [path for folder in ("pipeline", "control") for path in sorted((root / folder).rglob("*.py"))]
    assert len(shared) > 20
    offenders = {}
    for path in shared:
        module = "bec." + ".".join(path.relative_to(root).with_suffix("").parts)
        if module in own:
            continue
        kinds = sorted(m for m in imported_modules(path) if m.startswith(KIND_PACKAGES))
        if kinds:
            offenders[module] = kinds
    assert offenders == {}
    assert "bec.pipeline.fetch" not in own  # fetch is every kind's: the check covers it
