"""The package's shape: stages import only stages below them, no Ray in the core, small modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from nucleiscope.pipeline import STAGES, __version__

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(level, absolute-or-relative dotted name) of every ``from ... import`` and ``import`` in a file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
    return found


def _stage_of(path: Path, level: int, module: str) -> str | None:
    """The pipeline stage an import of a module in ``pipeline/<stage>/`` refers to (None: outside)."""
    if level == 0:
        parts = module.split(".")
        return parts[2] if parts[:2] == ["nucleiscope", "pipeline"] and len(parts) > 2 else None
    package = list(path.relative_to(PIPELINE).parent.parts)  # [stage]
    base = package[: len(package) - (level - 1)]
    target = base + (module.split(".") if module else [])
    return target[0] if target else None


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_stages_below_it(stage: str) -> None:
    allowed = set(STAGES[: STAGES.index(stage) + 1])
    bad = []
    for path in sorted((PIPELINE / stage).rglob("*.py")):
        for level, module in _imported_modules(path):
            if level > len(path.relative_to(PIPELINE).parts) - 1 + 1:
                bad.append(f"{path.name}: relative import beyond the pipeline package ({'.' * level}{module})")
                continue
            target = _stage_of(path, level, module)
            if target is not None and target not in allowed and target in STAGES:
                bad.append(f"{path.relative_to(REPO)} imports stage {target!r} ({'.' * level}{module})")
    assert not bad, "\n".join(bad)


def test_every_stage_is_a_documented_subpackage() -> None:
    folders = {p.name for p in PIPELINE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(STAGES)
    loose = sorted(p.name for p in PIPELINE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a stage: {loose}"
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PIPELINE / stage / "__init__.py").read_text()))
        assert doc and "May use" in doc, f"pipeline/{stage}/__init__.py must say what it holds and may use"


def test_the_core_never_imports_ray_actors_or_jobs() -> None:
    bad = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for level, module in _imported_modules(path):
            top = module.split(".")[0]
            if (level == 0 and top == "ray") or module.split(".")[-1] in ("actors", "jobs") or ".actors" in module \
                    or ".jobs" in module or module.startswith(("actors", "jobs")):
                bad.append(f"{path.relative_to(REPO)}: {'.' * level}{module}")
    assert not bad, bad


def test_modules_stay_small() -> None:
    big = []
    for folder in ("pipeline", "actors", "jobs"):
        for path in (REPO / folder).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > 400:
                big.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not big, big


def test_version_is_the_installed_one() -> None:
    from importlib import metadata

    assert __version__ == metadata.version("nucleiscope")
    done = subprocess.run([sys.executable, "-m", "nucleiscope.jobs.cli", "--version"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"nucleiscope {__version__}", done
