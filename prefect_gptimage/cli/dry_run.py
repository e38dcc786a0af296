"""``prefect-gptimage batch FILE --dry-run``: validation and cost estimate, with no Prefect server.

A dry run submits nothing, so it needs no flow run and no API: it loads and validates the prompt
file, drops identical rows, prices the rest and counts the rows already paid for (cached, or
whose earlier submit's outcome is unknown) as free, exactly as the batch flow does before its
first submit. It prints the same lines (``RUN: N requests, C cached, estimated cost $X`` and
``dry run: $X for N requests``) and ``--json`` summary as a dry run of the flow did.

The cache is read where it can be read without an API:

* the result store is local (``PREFECT_LOCAL_STORAGE_PATH``, default ``$PREFECT_HOME/storage``):
  when it holds no record of this package (a fresh home), every row is uncached and Prefect is
  not even imported; otherwise the records are read through Prefect's own result store;
* the store is a block (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``): loading it needs a Prefect
  API, so it is read only when one is configured (``PREFECT_API_URL`` or the profile's); without
  one, every row is counted as uncached and the output says so (a real run would start a
  temporary server to read it).

``--bucket``, ``--max-cost`` and a custom ``FAL_QUEUE_RUN_HOST`` are checked as the flow checks
them (bucket name, finite budget, trusted media host), without touching the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.prompts import (
    PromptRow,
    load_prompt_file,
    reads_inputs,
    resolve_row_inputs,
    run_key_for,
    unique_rows,
)
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.reporting.wording import counted, dry_run_message

__all__ = ["DryRunPlan", "plan_dry_run"]

#: Prefix of every record this package writes to the result store (submit, result, intent).
RECORD_PREFIX = "gptimage-"
_STORAGE_BLOCK_VARS = (
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
)
_LOCAL_PATH_VARS = ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH")

#: What the output says when the cache lives in a block and no API is there to load it.
CACHE_NEEDS_API = (
    "cache not read: the result store is a block (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK), which "
    "needs a Prefect API (PREFECT_API_URL); every row is counted as uncached"
)


# -- where the cache is ------------------------------------------------------------------------


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _active_profile() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: unknown, so not "certainly empty"
        return {"?": "?"}
    path = Path(
        os.environ.get("PREFECT_PROFILES_PATH") or _prefect_home() / "profiles.toml"
    ).expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"?": "?"}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(active, {})
    return profile if isinstance(profile, dict) else {}


def _settings_elsewhere() -> bool:
    """Whether Prefect may read result settings from a file in the working directory."""
    cwd = Path.cwd()
    if (cwd / "prefect.toml").exists() or (cwd / ".env").exists():
        return True
    try:
        return "tool.prefect" in (cwd / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False


def certainly_no_records() -> bool:
    """True when the result store is surely local and holds no record of this package.

    Decided from the environment, the active profile and the storage folder alone (no Prefect
    import). False means "perhaps": then Prefect's settings and store decide. Once Prefect is
    imported (a dry run called from Python, where temporary settings may point elsewhere than the
    environment), its settings decide: the shortcut only spares the CLI the import.
    """
    if "prefect" in sys.modules:
        return False
    if any(os.environ.get(v) for v in _STORAGE_BLOCK_VARS) or _settings_elsewhere():
        return False
    profile = _active_profile()
    if any(("STORAGE" in k or "RESULTS" in k) for k in profile):
        return False
    path = next((os.environ[v] for v in _LOCAL_PATH_VARS if os.environ.get(v)), None)
    folder = Path(path).expanduser() if path else _prefect_home() / "storage"
    try:
        with os.scandir(folder) as entries:
            return not any(e.name.startswith(RECORD_PREFIX) for e in entries)
    except FileNotFoundError:
        return True
    except OSError:
        return False


class DryRunPlan:
    """What a dry run found: rows, cost, cached rows, and a note when the cache was not read."""

    def __init__(
        self, run_key: str, rows: list[PromptRow], estimate: float, cached: int, note: str | None
    ) -> None:
        self.run_key, self.rows, self.estimate, self.cached, self.note = (
            run_key,
            rows,
            estimate,
            cached,
            note,
        )

    @property
    def estimate_line(self) -> str:
        return (
            f"{self.run_key}: {counted(len(self.rows), 'request')}, {self.cached} cached, "
            f"estimated cost ${self.estimate:.3f}"
        )

    @property
    def message(self) -> str:
        return dry_run_message(self.estimate, len(self.rows), self.cached)

    def summary(self) -> RunSummary:
        return RunSummary(estimated_cost_usd=self.estimate)


def _uncached_cost(rows: list[PromptRow]) -> float:
    return round(sum(estimate_cost(r.request) for r in rows), 6)


def _read_cache(rows: list[PromptRow], resubmit_unknown: bool) -> tuple[float, int, str | None]:
    """(cost, cached, note) with the cache read through Prefect, unless that needs an API."""
    from prefect.settings import (
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url:  # the user's own server: the store is read as a run reads it
        return (*_plan_cost(rows, resubmit_unknown), None)
    if settings.results.default_storage_block:
        return _uncached_cost(rows), 0, CACHE_NEEDS_API
    # Prefect asks the API for a server-side default store before using the local one: with no
    # API configured, that question would start a temporary server. Forbid it here, so Prefect
    # falls back to the local store (PREFECT_LOCAL_STORAGE_PATH) at once.
    with temporary_settings(updates={PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}):
        return (*_plan_cost(rows, resubmit_unknown), None)


def _plan_cost(rows: list[PromptRow], resubmit_unknown: bool) -> tuple[float, int]:
    """What the batch's own plan says (the one answer to "cached, resumable, to be paid")."""
    # moves to prefect_gptimage.engine.plan (same signature, same Plan fields)
    from prefect_gptimage.engine.plan import plan_rows

    plan = plan_rows(rows, resubmit_unknown=resubmit_unknown)
    return plan.cost, plan.cached


def _validate_run_options(bucket: str | None, prefix: str | None, max_cost: float | None) -> None:
    """The checks the flow makes before a dry run's estimate (imported only when they apply)."""
    from prefect_gptimage.fal.hosts import custom_queue_host

    if max_cost is None and not bucket and custom_queue_host() is None:
        return
    from prefect_gptimage.flows._preflight import check_budget, preflight_bucket

    check_budget(max_cost)
    preflight_bucket(bucket or None, prefix, presign_expires=86400, probe=False)


def plan_dry_run(
    prompt_file: str,
    *,
    bucket: str | None = None,
    prefix: str | None = None,
    max_cost: float | None = None,
    resubmit_unknown: bool = False,
) -> DryRunPlan:
    """Validate ``prompt_file`` and the run options; price the rows not already paid for.

    Raises what the flow would (``InvalidRequestError``, ``ConfigurationError``).
    """
    rows = load_prompt_file(prompt_file)
    if reads_inputs(rows):  # edits of local/s3:// inputs: read and checked, keyed by content
        from prefect_gptimage.inputs import InputResolver

        rows = resolve_row_inputs(rows, InputResolver(read_only=True), prompt_file)
    rows = unique_rows(rows)
    _validate_run_options(bucket, prefix, max_cost)
    if certainly_no_records():
        cost, cached, note = _uncached_cost(rows), 0, None
    else:
        cost, cached, note = _read_cache(rows, resubmit_unknown)
    return DryRunPlan(run_key_for(prompt_file), rows, round(cost, 6), cached, note)


def print_plan(plan: DryRunPlan, as_json: bool) -> None:
    """The estimate and dry-run lines (stderr), and the ``--json`` summary (stdout)."""
    if plan.note:
        print(f"prefect-gptimage: {plan.note}", file=sys.stderr)
    print(plan.estimate_line, file=sys.stderr)
    print(plan.message, file=sys.stderr)
    if as_json:
        print(plan.summary().model_dump_json())
