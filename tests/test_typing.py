"""run() and run_blocking() are typed by shape: mypy --strict and pyright agree with tests/typing_cases.py.

The cases file also carries the wrong assignment ``y: str = await c.run(lambda: 1)`` under an ignore
comment that both checkers are told to report when unused: the test fails if the error disappears.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = "tests/typing_cases.py"


def test_mypy_infers_the_result_types() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores", "--no-incremental", CASES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyright_infers_the_result_types(tmp_path: Path) -> None:
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent))
    if pyright is None:  # pragma: no cover - pyright is in requirements.txt; it needs node at run time
        pytest.skip("pyright is not installed")
    config = tmp_path / "pyrightconfig.json"
    # Strict, and held to its own `# pyright: ignore` comments only (the `# type: ignore` ones are mypy's).
    settings = {"typeCheckingMode": "strict", "enableTypeIgnoreComments": False}
    config.write_text(json.dumps({**settings, "reportUnnecessaryTypeIgnoreComment": "error"}))
    result = subprocess.run(
        [pyright, "--project", str(config), "--pythonpath", sys.executable, CASES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
