"""What a command prints on the terminal besides its own lines: nothing, unless ``--verbose``.

The command prints its summary and one line per failure. Prefect's console lines would repeat
them: "Created flow run", "Starting temporary server", per-task lines, each failure again with a
traceback, "Finished in state Failed". So, without ``--verbose``, the console handlers of the
root logger (where Prefect's logging configuration puts its console handler) get a filter that
passes only errors that are not a run's own log (those the command reports itself), without
their traceback. Only the console is filtered: the run's logs still reach the Prefect API (the UI
shows them), and a user's own logging configuration keeps its other handlers.
"""

from __future__ import annotations

import logging

__all__ = ["RUN_LOGGERS", "quiet_console"]

#: Loggers whose records the command reports itself (a run's progress, its tasks' failures).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect_gptimage")


class _ConsoleFilter(logging.Filter):
    """Errors not from a run, without traceback; nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return False
        if record.name.startswith(RUN_LOGGERS) and record.levelno < logging.CRITICAL:
            return False
        record.exc_info, record.exc_text = None, None
        return True


def quiet_console(verbose: bool) -> None:
    """Configure Prefect's logging (as ``import prefect`` does) and, unless ``verbose``, filter
    the console as the module docs say. Call it once, before the first flow call."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    if verbose:
        return
    console = _ConsoleFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(console)
