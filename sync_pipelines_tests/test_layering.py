"""The engine's stage packages import in one direction only, and the Dagster layer goes through
the facade.

Static checks over the source (``ast``), no database: every import inside
``sync_pipelines/engine`` is resolved to the stage package it names and checked against the
allowed dependencies below (capture never imports delivery; sinks never import capture, the
slot or the state store; nothing imports dagster), and ``sync_pipelines/defs`` may import the
engine only as ``sync_pipelines.engine``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sync_pipelines"
ENGINE = ROOT / "engine"
BASE = {"errors", "faults", "spec", "http_reads"}  # http_reads: the readers' httpx client

# stage → stages it may import (besides itself and the base modules). One comment per rule.
ALLOWED: dict[str, set[str]] = {
    # the I/O-free ground floor: nothing above it
    "wire": set(),
    # the state DB knows changes and positions, not mapping, sinks or sources
    "staging": {"wire"},
    # mapping is pure: relations and changes in, operations out
    "mapping": {"wire"},
    # capture ends in staged changes: it never reaches into delivery, mapping or backfill
    "capture": {"wire", "staging"},
    # the delivery loop: staged changes, mapped, to sinks (a two-way link's check in between)
    "delivery": {"wire", "staging", "mapping", "delivery.sinks", "links"},
    # a link's check: mapped changes against the target's rows and the agreed base
    "links": {"wire", "staging", "mapping", "delivery.sinks"},
    # sinks see mapped changes and their own target; of the state only the held-change types
    "delivery.sinks": {"wire", "mapping", "staging.held"},
    # snapshots read the source (capture's helpers) into the stream (staging)
    "backfill": {"wire", "staging", "mapping", "capture"},
    # reconciliation reads everything and repairs through backfill
    "reconcile": {"wire", "staging", "mapping", "capture", "backfill", "delivery",
                  "delivery.sinks"},
    # the embedded server knows only PostgreSQL
    "runtime": set(),
}
FACADE = {"pipeline", "health", "recovery", "receiver", "__init__"}  # wiring over stages


def stage_of(module: str) -> str:
    """``delivery.sinks.http`` → ``delivery.sinks``; ``staging.held`` → ``staging``; ``spec``
    → ``base``."""
    parts = module.split(".")
    if parts[0] in BASE:
        return "base"
    if parts[0] in FACADE:
        return "facade"
    if parts[:2] == ["delivery", "sinks"]:
        return "delivery.sinks"
    return parts[0]


def engine_imports(path: Path) -> list[str]:
    """Engine modules (dotted, relative to the engine) that ``path`` imports."""
    rel = path.relative_to(ENGINE).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                names = [".".join([*base, node.module])] if node.module else [
                    ".".join([*base, a.name]) for a in node.names]
            elif node.module and node.module.startswith("sync_pipelines.engine."):
                names = [node.module.removeprefix("sync_pipelines.engine.")]
            else:
                names = []
            out += names
        elif isinstance(node, ast.Import):
            out += [a.name.removeprefix("sync_pipelines.engine.") for a in node.names
                    if a.name.startswith("sync_pipelines.engine.")]
    return out


def test_stage_of():
    assert stage_of("delivery.sinks.http") == "delivery.sinks"
    assert stage_of("delivery.loop") == "delivery"
    assert stage_of("staging.held") == "staging"
    assert stage_of("spec") == "base"


MODULES = sorted(ENGINE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ENGINE)) for p in MODULES])
def test_engine_imports_point_one_way(path: Path):
    rel = ".".join(path.relative_to(ENGINE).with_suffix("").parts)
    stage = stage_of(rel)
    bad = []
    for imported in engine_imports(path):
        target = stage_of(imported)
        if stage == "facade" or target == "base" or target == stage:
            continue
        if stage == "base":
            bad.append(imported)  # errors, faults and spec import no stage
            continue
        allowed = ALLOWED[stage]
        if target in allowed or any(imported.startswith(a + ".") or imported == a
                                    for a in allowed):
            continue
        bad.append(imported)
    assert not bad, f"{rel} ({stage}) must not import {bad}"


def test_nothing_in_the_engine_imports_dagster():
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "dagster"]
    assert not offenders, offenders


def test_the_dagster_layer_imports_the_engine_through_its_facade():
    offenders = []
    for path in [*sorted((ROOT / "defs").rglob("*.py")), ROOT / "definitions.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith("sync_pipelines.engine.")]
    assert not offenders, offenders


def test_the_walk_saw_every_stage():
    stages = {stage_of(".".join(p.relative_to(ENGINE).with_suffix("").parts)) for p in MODULES}
    assert set(ALLOWED) | {"base", "facade"} <= stages


def test_a_run_process_does_not_import_pandas():
    """Every Dagster run process imports the definitions at start-up: pandas and numpy (~0.5 s
    of it, measured) come in only where a reconciliation compares rows."""
    probe = ("import sys, sync_pipelines.definitions; "
             "print(sorted({'pandas', 'numpy'} & set(sys.modules)))")
    env = {**os.environ, "SYNC_SPEC": str(ROOT.parent / "sync.yaml")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
