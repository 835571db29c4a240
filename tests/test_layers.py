"""The package's layering (pyproject.toml, [tool.importlinter]) holds, and the check fails on a back-import."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of ``root``/pyproject.toml over ``root``/msif_ray (found first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(LINT + ["--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_imports_flow_down_the_layers():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_a_back_import_breaks_the_contract(tmp_path):
    """A copy of the package whose engine imports the pipeline (a layer above it) is refused, naming the import."""
    shutil.copytree(REPO / "msif_ray", tmp_path / "msif_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "msif_ray" / "engine" / "scoring.py"
    planted.write_text(planted.read_text() + "\nfrom msif_ray.pipeline.plan import GB  # planted back-import\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "msif_ray.engine.scoring -> msif_ray.pipeline.plan" in result.stdout, result.stdout
