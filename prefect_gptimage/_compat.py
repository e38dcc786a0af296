"""Which Prefect is installed, and what that means here: the one place that asks.

The package supports Prefect 3.6 (from 3.6.24) to 3.9 (``pyproject.toml``). Everything it uses
of Prefect's public API exists, with the same signatures, across that range (checked for 3.6.29
and 3.9.1); what differs is named here, each with the one line a user sees:

* Prefect 3.6's API server needs ``fastapi<0.137`` (3.7 and later ask fastapi>=0.139 themselves):
  on 3.6 it deletes the routers it included, which newer fastapi still reads, so every API call
  to a server started here (the CLI's temporary one, ``prefect server start``, the test
  harness) answers 500 while ``/api/health`` passes. pip cannot key the fastapi pin on Prefect's
  version, so the ``prefect36`` extra carries it (``pip install 'prefect-gptimage[prefect36]'``)
  and the CLI says so in one line, instead of starting its temporary server, when the pair is
  wrong (:func:`server_dependency_problem`).
* No feature of this package needs a newer Prefect than 3.6.24: assets (``materialize``,
  ``add_asset_metadata``), events, global concurrency limits with leases, transactions and
  locks, artifacts, ``serve``/``deploy`` and the flow-run functions all exist in 3.6.29 with the
  signatures 3.9.1 has. A feature that comes to need one is checked here, against
  :func:`prefect_version`, and says so in one line instead of failing the run.

Versions are read from the installed distributions' metadata, so nothing here imports Prefect
(the CLI's dry run must not).

Example:
    >>> prefect_version() >= Version("3.6")
    True
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

__all__ = [
    "MIN_PREFECT",
    "Version",
    "installed_version",
    "prefect_version",
    "server_dependency_problem",
]

#: The oldest Prefect this package supports (``pyproject.toml``'s floor).
MIN_PREFECT = Version("3.6.24")
#: The first Prefect whose API server works with fastapi 0.137 and later.
_FASTAPI_ROUTES_FIX = Version("3.7")
#: fastapi releases that break Prefect 3.6's server, and every Prefect's (3.9 caps it itself).
_FASTAPI_BREAKS_36 = Version("0.137")
_FASTAPI_BREAKS_ALL = Version("0.151")


@cache
def installed_version(distribution: str) -> Version | None:
    """The installed version of ``distribution`` (from its metadata), or None if absent."""
    try:
        return Version(version(distribution))
    except PackageNotFoundError:
        return None


def prefect_version() -> Version:
    """The installed Prefect's version."""
    found = installed_version("prefect")
    if found is None:  # pragma: no cover - prefect is a dependency
        raise RuntimeError("prefect is not installed")
    return found


def server_dependency_problem(
    prefect: Version | None = None, fastapi: Version | None = None
) -> str | None:
    """One line saying why a Prefect API server started here would fail, or None.

    >>> server_dependency_problem(Version("3.6.29"), Version("0.150.0"))[:40]
    'Prefect 3.6.29 with fastapi 0.150.0: its'
    >>> server_dependency_problem(Version("3.6.29"), Version("0.136.3")) is None
    True
    >>> server_dependency_problem(Version("3.9.1"), Version("0.150.0")) is None
    True
    """
    prefect = prefect or prefect_version()
    fastapi = fastapi or installed_version("fastapi")
    if fastapi is None:
        return None
    if prefect < _FASTAPI_ROUTES_FIX and fastapi >= _FASTAPI_BREAKS_36:
        return (
            f"Prefect {prefect} with fastapi {fastapi}: its API server answers 500 to every "
            "call; pip install 'prefect-gptimage[prefect36]' (fastapi<0.137)"
        )
    if fastapi >= _FASTAPI_BREAKS_ALL:
        return (
            f"Prefect {prefect} with fastapi {fastapi}: its API server refuses deployments "
            "(422) or fails to start; pip install 'fastapi<0.151'"
        )
    return None
