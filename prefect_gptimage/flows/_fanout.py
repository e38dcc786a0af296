"""Fan-out: a batch's rows run on a Dask cluster, the batch itself stays in the flow's process.

``batch_to_s3(..., cluster="tcp://scheduler:8786")`` (CLI ``batch --cluster ADDRESS``) hands each
row task to prefect-dask's ``DaskTaskRunner(address=...)``, used only through its public API
(constructor, context manager, ``submit``, the futures' ``wait``/``result``/``state``/
``add_done_callback``). Everything else stays in the flow's process: reading and validating the
file, the window of rows in flight, the request-id ledger, the manifest, the progress artifact
and the summary. So a fanned-out batch is still one batch: one flow run, one manifest, one
progress artifact, one summary.

Why Dask: it is the task runner Prefect users already run on many machines, and its scheduler
reschedules the tasks of a worker that dies (``kill -9``, a lost machine) on the workers left. A
row that was running there starts again elsewhere and resumes its fal request from the shared
cache (its submit record is committed the moment fal accepts it), so nothing is paid twice. A
row whose worker was lost too often (distributed's ``allowed-failures``, 3 by default) ends with
Dask's ``KilledWorker`` and no Prefect state: :class:`RowFuture` turns that (and any other error
Dask itself raises, a cancellation included) into a Failed state, and the batch reports it like
any failed row; a re-run resumes what it had paid for.

What prefect-dask sends with every row, and so what must pickle (``cloudpickle``): the row task
and its parameters, and the flow run's context (``prefect.context.serialize_context``: the flow
object, its parameters, its result store, the flow's settings). A flow function is pickled by
value, with the module globals it names; a lock among them (a ``threading.Event``) cannot be
sent. :func:`check_cluster` pickles that context once, before anything is paid.

What each worker needs (the flow's Prefect settings travel with every task, but the plugin's own
settings and credentials are read where the row runs):

* the same Python packages (``pip install "prefect-gptimage[dask]"``), the same versions;
* a Prefect server every worker reaches (``PREFECT_API_URL`` where the flow runs; the temporary
  API of a lone process is refused, see :func:`check_cluster`);
* shared result storage (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``), so that a row rescheduled on
  another machine finds what the first one paid for;
* ``FAL_KEY`` (unless ``credentials`` are passed) and the ``PREFECT_GPTIMAGE_*`` settings;
* S3 credentials: a bucket name is staged with boto3's standard chain on the worker (its own
  ``AWS_*``); an ``S3Bucket`` block travels with each row and signs with its credentials;
* on Python < 3.12, Dask's statistical profiler off
  (``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False``): its ``sys._current_frames()`` can
  deadlock a worker (CPython gh-116969, dask/distributed#8616). :func:`check_cluster` warns.

The fal cap across workers is a Prefect global concurrency limit on that server (see
:mod:`prefect_gptimage.tasks.concurrency`); without one, each worker process caps only its own
requests, which :func:`check_cluster` logs as a warning.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any, Generic, TypeVar

from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.collections import visit_collection

from prefect_gptimage.errors import ConfigurationError
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.concurrency import global_limit_exists

__all__ = [
    "CONNECT_TIMEOUT",
    "ClusterTaskRunner",
    "RowFuture",
    "WorkerFacts",
    "check_cluster",
    "row_runner",
    "worker_facts",
]

R = TypeVar("R")

#: Seconds to reach the Dask scheduler before the batch is refused (nothing paid yet).
CONNECT_TIMEOUT = 15.0
#: A flow run context larger than this (pickled) is sent with every row: worth a warning.
LARGE_CONTEXT_BYTES = 1 << 20
_INSTALL = 'pip install "prefect-gptimage[dask]"'
_PROFILE_KEY = "distributed.worker.profile.enabled"
_VERSIONED = ("prefect-gptimage", "prefect", "prefect-dask")


def _prefect_dask() -> ModuleType:
    """prefect-dask's task runners module, or a :class:`ConfigurationError` saying how to get it."""
    try:
        import prefect_dask.task_runners
    except ImportError as exc:
        raise ConfigurationError(
            f"cluster: fanning rows out to a Dask cluster needs prefect-dask ({_INSTALL}): {exc}"
        ) from exc
    return prefect_dask.task_runners


def row_runner(cluster: str | None, max_workers: int) -> TaskRunner[Any]:
    """The runner of a batch's rows: a thread pool in this process, or a Dask cluster."""
    if not cluster:
        return ThreadPoolTaskRunner(max_workers=max_workers)
    return ClusterTaskRunner(cluster)


class RowFuture(PrefectFuture[R], Generic[R]):
    """A row on the cluster: prefect-dask's future, which also ends when Dask gives up on it.

    prefect-dask's future gets its final state from the task run's return value. When Dask
    itself fails the task (``KilledWorker`` after its worker was lost too often, a cancellation,
    a worker that could not unpickle it) there is no such value, and its ``state`` answers with
    the task run's last state on the server (``Running``, from the lost worker) forever. Here
    that row ends Failed with Dask's error instead. Read through the futures' public API only.
    """

    def __init__(self, future: Any) -> None:
        self._future = future  # a prefect_dask.PrefectDaskFuture
        self._lost_state: State[R] | None = None

    @property
    def dask_future(self) -> Any:
        """prefect-dask's ``PrefectDaskFuture`` of this row."""
        return self._future

    @property
    def task_run_id(self) -> Any:
        return self._future.task_run_id

    @property
    def state(self) -> State[R]:
        lost = self._lost()
        return lost if lost is not None else self._future.state  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None) -> None:
        self._future.wait(timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R:
        self.wait(timeout)
        lost = self._lost()
        if lost is None:
            return self._future.result(  # type: ignore[no-any-return]
                timeout=timeout, raise_on_failure=raise_on_failure
            )
        error: Any = lost.data
        if raise_on_failure and isinstance(error, BaseException):
            raise error
        return error  # type: ignore[no-any-return]  # (Failed's data: the exception)

    def add_done_callback(self, fn: Callable[[PrefectFuture[R]], None]) -> None:
        self._future.add_done_callback(lambda _done: fn(self))

    def _lost(self) -> State[R] | None:
        """Failed with Dask's own error, once Dask ended the task without a Prefect state."""
        if self._lost_state is not None:
            return self._lost_state
        dask = self._future.wrapped_future  # a distributed.Future (public property)
        if not dask.done():
            return None
        error: BaseException | None
        if dask.cancelled():
            error = CancelledError(f"Dask cancelled {dask.key}")
        elif dask.status == "error":
            error = dask.exception()
        else:
            return None
        if error is None:
            return None
        message = f"lost on the cluster: {type(error).__name__}: {error}"
        self._lost_state = Failed(data=error, message=message)
        return self._lost_state


class ClusterTaskRunner(TaskRunner[RowFuture[Any]]):
    """prefect-dask's ``DaskTaskRunner(address=...)``, whose futures are :class:`RowFuture`.

    It holds the Dask runner rather than subclassing it: only its constructor, context manager
    and ``submit`` are used, so an upgrade of prefect-dask that keeps those keeps this working.
    """

    def __init__(self, address: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.address = address
        self.dask_runner: Any = _prefect_dask().DaskTaskRunner(address=address)

    def duplicate(self) -> ClusterTaskRunner:
        return type(self)(self.address)

    def submit(  # type: ignore[override]  # (TaskRunner's overloads favour async tasks)
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> RowFuture[Any]:
        future = self.dask_runner.submit(
            task,
            parameters=_unwrapped(parameters),
            wait_for=[_unwrapped(f) for f in wait_for] if wait_for else None,
            dependencies=dependencies,
        )
        return RowFuture(future)

    def __enter__(self) -> ClusterTaskRunner:
        super().__enter__()
        self.dask_runner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.dask_runner.__exit__(*exc_info)
        finally:
            super().__exit__(*exc_info)


def _unwrapped(expr: Any) -> Any:
    """``expr`` with each :class:`RowFuture` replaced by prefect-dask's own future (which the
    Dask runner turns into a Dask dependency)."""
    if isinstance(expr, RowFuture):
        return expr.dask_future
    return visit_collection(
        expr,
        visit_fn=lambda x: x.dask_future if isinstance(x, RowFuture) else x,
        return_data=True,
    )


@dataclass(frozen=True)
class WorkerFacts:
    """What :func:`check_cluster` learns from one worker."""

    python: tuple[int, int]
    profiler_on: bool
    versions: tuple[tuple[str, str], ...]


def worker_facts() -> WorkerFacts:
    """Run on each worker by :func:`check_cluster` (``Client.run``): its Python, whether Dask's
    profiler is on, and the versions of the packages a row runs on. That it runs at all shows
    the worker imports this package."""
    import dask.config

    found = []
    for name in _VERSIONED:
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            found.append((name, "missing"))
    return WorkerFacts(
        python=(sys.version_info.major, sys.version_info.minor),
        profiler_on=bool(dask.config.get(_PROFILE_KEY, default=True)),
        versions=tuple(found),
    )


def _check_context_ships(log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Pickle what prefect-dask sends with every row (the flow run's context) once, here."""
    import cloudpickle  # type: ignore[import-untyped]  # (distributed's serializer)
    from prefect.context import serialize_context

    try:
        payload = cloudpickle.dumps(serialize_context())
    except Exception as exc:
        raise ConfigurationError(
            "cluster: the flow run's context travels with every row and cannot be pickled "
            f"({type(exc).__name__}: {exc}); a flow function sent to Dask must name no module "
            "global that holds a lock, a client or an open file; nothing was submitted"
        ) from exc
    if len(payload) > LARGE_CONTEXT_BYTES:
        log.warning(
            "the flow run's context sent with every row is %.1f MiB (pickled): its flow "
            "parameters or the module globals its flow function names are large",
            len(payload) / 2**20,
        )


def _check_workers(client: Any, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Refuse workers that cannot run a row; warn about mismatched versions and the profiler."""
    answers = client.run(worker_facts, on_error="return")
    broken = {a: f for a, f in answers.items() if not isinstance(f, WorkerFacts)}
    if broken:
        listed = "; ".join(f"{a}: {type(e).__name__}: {e}" for a, e in sorted(broken.items()))
        raise ConfigurationError(
            f"cluster: {len(broken)} worker(s) cannot run a row ({_INSTALL} there): {listed}; "
            "nothing was submitted"
        )
    here = worker_facts()
    for address, facts in sorted(answers.items()):
        if facts.versions != here.versions:
            log.warning(
                "worker %s runs %s, this process %s: a row's cache key includes its task's "
                "source, so a row rescheduled across versions may not find what was paid for",
                address,
                dict(facts.versions),
                dict(here.versions),
            )
    profiled = [a for a, f in answers.items() if f.profiler_on and f.python < (3, 12)]
    if profiled:
        log.warning(
            "Dask's statistical profiler is on on %d worker(s) running Python < 3.12: it can "
            "deadlock a worker (CPython gh-116969, dask/distributed#8616); start workers with "
            "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
            len(profiled),
        )


def check_cluster(cluster: str, log: logging.Logger | logging.LoggerAdapter[Any]) -> int:
    """Refuse a cluster the batch cannot use, before anything is paid; returns its worker count.

    Raises :class:`ConfigurationError` without prefect-dask, without a Prefect server the workers
    can reach, when the flow run's context cannot be pickled, when the scheduler does not answer
    within :data:`CONNECT_TIMEOUT`, or when a worker cannot import this package. Logs a warning
    when no global concurrency limit caps fal requests across the workers, when results are
    stored on this machine's disk only, when the cluster has no worker yet, when a worker runs
    other versions, and when a worker's profiler may deadlock it.
    """
    _prefect_dask()
    from distributed import Client
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigurationError(
            "cluster: the workers report to the flow's Prefect server and share its global "
            "concurrency limit, and this process has only a temporary API of its own: set "
            "PREFECT_API_URL to a Prefect server every worker can reach"
        )
    _check_context_ships(log)
    try:
        client = Client(  # type: ignore[no-untyped-call]
            cluster, timeout=CONNECT_TIMEOUT, set_as_default=False
        )
    except Exception as exc:
        raise ConfigurationError(
            f"cluster: no Dask scheduler answered at {cluster} within {CONNECT_TIMEOUT:.0f} s "
            f"({type(exc).__name__}: {exc}); nothing was submitted"
        ) from exc
    with client:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        _check_workers(client, log)
    threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    log.info("fanning rows out to %s: %d worker(s), %d thread(s)", cluster, len(workers), threads)
    if not workers:
        log.warning("cluster %s has no worker yet: rows wait until one joins", cluster)
    name = get_settings().concurrency_limit_name
    if not global_limit_exists(name):
        log.warning(
            "no global concurrency limit %r on the Prefect server: each worker process caps only "
            "its own fal requests (PREFECT_GPTIMAGE_LOCAL_CONCURRENCY); create one to cap them "
            "across the cluster: prefect gcl create %s --limit N",
            name,
            name,
        )
    context = FlowRunContext.get()
    storage = getattr(getattr(context, "result_store", None), "result_storage", None)
    if storage is None or type(storage).__name__ == "LocalFileSystem":
        log.warning(
            "results are stored on this machine's disk: workers on other machines neither share "
            "the cache nor see what a lost worker paid for; set "
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK to shared storage (an S3Bucket block)"
        )
    return len(workers)
