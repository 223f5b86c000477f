"""The wheel and the sdist, built as a release would build them, carry what users and packagers need."""

from __future__ import annotations

import email
import email.policy
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import starlette_concurrency

ROOT = Path(__file__).parent.parent
NAME = f"starlette_concurrency-{starlette_concurrency.__version__}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel and the sdist once for the module, with `python -m build` as a release does."""
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")  # pragma: no cover - e.g. tests run from an installed copy
    outdir = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return outdir


def sources(*directories: str) -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for directory in directories
        for path in (ROOT / directory).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def test_the_wheel_holds_the_package_its_licence_and_its_metadata(dist: Path) -> None:
    with zipfile.ZipFile(dist / f"{NAME}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
        metadata = email.message_from_bytes(wheel.read(f"{NAME}.dist-info/METADATA"), policy=email.policy.compat32)
    assert sources("starlette_concurrency") <= names
    assert {"starlette_concurrency/py.typed", f"{NAME}.dist-info/licenses/LICENSE"} <= names
    assert not {name for name in names if name.startswith(("tests/", "examples/", "bench/", "scripts/"))}
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Author"] or metadata["Author-email"]
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL", []))
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert {"dask", "examples", "prometheus"} <= set(metadata.get_all("Provides-Extra", []))
    requirements = metadata.get_all("Requires-Dist", [])
    for extra, package in [("examples", "fastapi"), ("examples", "flask"), ("prometheus", "prometheus-client")]:
        assert any(r.lower().replace("_", "-").startswith(package) and f"extra == '{extra}'" in r for r in requirements)


def test_the_sdist_holds_what_the_tests_and_scripts_need(dist: Path, tmp_path: Path) -> None:
    with tarfile.open(dist / f"{NAME}.tar.gz") as sdist:
        members = {member.name.removeprefix(f"{NAME}/"): member for member in sdist.getmembers()}
        sdist.extractall(tmp_path, filter="data")
    names = set(members)
    assert sources("starlette_concurrency", "tests", "examples", "bench") <= names
    assert {"LICENSE", "README.md", "pyproject.toml", "requirements.txt", "scripts/test", "scripts/install"} <= names
    assert members["scripts/test"].mode & 0o111, "scripts/test lost its executable bit"
    assert not {name for name in names if "__pycache__" in name or name.startswith((".venv/", ".git/", ".ci/"))}
    # The tests import examples/ by name: from the unpacked sdist, that works.
    unpacked = tmp_path / NAME
    subprocess.run(
        [sys.executable, "-c", "import examples.app, examples.work, tests.helpers"],
        cwd=unpacked,
        check=True,
        timeout=120,
    )


def test_the_installed_dependencies_are_within_the_declared_ranges() -> None:
    # What the tests run against is what pyproject.toml promises: a pin in requirements.txt outside a
    # range (a cloudpickle past its bound), or a floor below what the lowest-versions job installed, fails.
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")  # pragma: no cover - e.g. tests run from an installed copy
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    requirements = [Requirement(r) for r in declared]
    installed = {r.name: importlib.metadata.version(r.name) for r in requirements}
    outside = {r.name: installed[r.name] for r in requirements if not r.specifier.contains(installed[r.name], True)}
    assert not outside, f"installed outside pyproject.toml's ranges: {outside}"
    cloudpickle = next(r for r in requirements if r.name == "cloudpickle")
    assert any(spec.operator == "<" for spec in cloudpickle.specifier), "cloudpickle needs an upper bound"


def test_scripts_example_installs_the_extras_the_example_links_to() -> None:
    # The example's page links to /prometheus, which it serves only with prometheus_client installed.
    installs = re.findall(r"pip install .* -e '\.\[([\w,]+)\]'", (ROOT / "scripts/example").read_text())
    assert installs, "scripts/example installs no extras"
    assert {"examples", "prometheus"} <= set(installs[0].split(","))
    assert 'href="/prometheus"' in (ROOT / "examples/app.py").read_text()


def test_scripts_example_refuses_a_port_that_is_not_a_number() -> None:
    # Before it installs anything; serving on a given port is `uvicorn --port`, which test_uvicorn exercises.
    run = subprocess.run([str(ROOT / "scripts/example"), "80a"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "usage: scripts/example [PORT]" in run.stderr
    assert "got '80a'" in run.stderr
