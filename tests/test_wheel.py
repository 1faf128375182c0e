"""The package builds as a wheel that holds every module of runtime/phi3v_ort and the `phi3v-ort` command (issue
23: README's install from a clone or a built wheel). Built from a copy of the tree, so the clone stays clean."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "runtime" / "phi3v_ort"


def _build_wheel(src: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m build --wheel` when `build` is installed, else pip's own wheel builder; without isolation (the
    installed setuptools builds it: no index needed)."""
    try:
        has_build = importlib.util.find_spec("build.__main__") is not None  # not a folder named build in the cwd
    except ModuleNotFoundError:
        has_build = False
    if has_build:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_package_and_the_command(tmp_path):
    setuptools = importlib.util.find_spec("setuptools")
    if setuptools is None:
        pytest.skip("building a wheel without an index needs setuptools installed (pyproject's build backend)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = _build_wheel(src, tmp_path / "dist")
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip(f"the build backend is not importable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("phi3v_ort-*.whl"))
    assert len(wheels) == 1, proc.stdout
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "phi3v-ort = phi3v_ort.cli:main" in wheel.read(entry_points).decode()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    modules = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    if (PACKAGE / "py.typed").exists():
        assert "phi3v_ort/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    assert "Provides-Extra: build" in metadata and "Provides-Extra: serve" in metadata
