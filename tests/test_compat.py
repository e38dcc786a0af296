"""The supported Prefect range: what _compat says about the installed Prefect and fastapi."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

from prefect_gptimage import _compat
from prefect_gptimage._compat import Version


def test_docstring_examples_run() -> None:
    result = doctest.testmod(_compat, optionflags=doctest.ELLIPSIS, report=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_installed_prefect_is_in_the_supported_range() -> None:
    assert _compat.MIN_PREFECT <= _compat.prefect_version() < Version("4")


def test_this_environment_can_serve_the_prefect_api() -> None:
    """The suite's own install (either CI environment) is a pair that works."""
    assert _compat.server_dependency_problem() is None


@pytest.mark.parametrize(
    ("prefect", "fastapi", "broken"),
    [
        ("3.6.29", "0.136.3", False),
        ("3.6.29", "0.137.0", True),
        ("3.6.29", "0.150.0", True),
        ("3.7.8", "0.150.0", False),
        ("3.9.1", "0.150.0", False),
        ("3.9.1", "0.151.0", True),
    ],
)
def test_server_dependency_problem_names_the_fix(prefect: str, fastapi: str, broken: bool) -> None:
    problem = _compat.server_dependency_problem(Version(prefect), Version(fastapi))
    assert (problem is not None) == broken
    if problem is not None:
        assert prefect in problem and fastapi in problem and "pip install" in problem


def test_importing_the_package_imports_no_prefect() -> None:
    code = (
        "import sys, prefect_gptimage\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""
