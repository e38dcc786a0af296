"""Fan-out: a batch's rows run on a Dask cluster, the batch itself stays in the flow's process.

``batch_to_s3(..., cluster="tcp://scheduler:8786")`` (CLI ``batch --cluster ADDRESS``) hands each
row task (:func:`~prefect_gptimage.tasks.rows.generate_and_stage`) to prefect-dask's
``DaskTaskRunner`` connected to a running ``distributed`` scheduler. Everything else stays in the
flow's process: reading and validating the file, the window of rows in flight, the request-id
ledger, the manifest, the progress artifact and the summary. So a fanned-out batch is still one
batch: one flow run, one manifest, one progress artifact, one summary.

Why Dask: it is the task runner Prefect users already run on many machines, and its scheduler
reschedules the tasks of a worker that dies (``kill -9``, a lost machine) on the workers left. A
row that was running there starts again elsewhere and resumes its fal request from the shared
cache (its submit record is committed the moment fal accepts it), so nothing is paid twice. A
row whose worker was lost three times (distributed's ``allowed-failures``) fails with Dask's
``KilledWorker``, and the batch reports it like any failed row.

What each worker needs (the flow's Prefect settings travel with every task, but the plugin's own
settings and credentials are read where the row runs):

* the same Python packages (``pip install "prefect-gptimage[dask]"``);
* a Prefect server every worker reaches (``PREFECT_API_URL`` where the flow runs; the temporary
  API of a lone process is refused, see :func:`check_cluster`);
* shared result storage (``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``), so that a row rescheduled on
  another machine finds what the first one paid for;
* ``FAL_KEY`` (unless ``credentials`` are passed) and the ``PREFECT_GPTIMAGE_*`` settings;
* S3 credentials: a bucket name is staged with boto3's standard chain on the worker (its own
  ``AWS_*``); an ``S3Bucket`` block travels with each row and signs with its credentials.

The fal cap across workers is a Prefect global concurrency limit on that server (see
:mod:`prefect_gptimage.tasks.concurrency`); without one, each worker process caps only its own
requests, which :func:`check_cluster` logs as a warning.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from prefect_gptimage.errors import ConfigurationError
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks._remote import stand_in_flow_fn, stop_profiler
from prefect_gptimage.tasks.concurrency import global_limit_exists

__all__ = ["CONNECT_TIMEOUT", "check_cluster", "row_runner", "stop_profiler"]

#: Seconds to reach the Dask scheduler before the batch is refused (nothing paid yet).
CONNECT_TIMEOUT = 15.0
_INSTALL = 'pip install "prefect-gptimage[dask]"'


def _dask() -> Any:
    try:
        import prefect_dask
    except ImportError as exc:
        raise ConfigurationError(
            f"cluster: fanning rows out to a Dask cluster needs prefect-dask ({_INSTALL}): {exc}"
        ) from exc
    return prefect_dask


def check_cluster(cluster: str, log: logging.Logger | logging.LoggerAdapter[Any]) -> int:
    """Refuse a cluster the batch cannot use, before anything is paid; returns its worker count.

    Raises :class:`ConfigurationError` without prefect-dask, without a Prefect server the workers
    can reach, or when the scheduler does not answer within :data:`CONNECT_TIMEOUT`. Logs a
    warning when no global concurrency limit caps fal requests across the workers, when results
    are stored on this machine's disk only, and when the cluster has no worker yet.
    """
    _dask()
    from distributed import Client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api_url = settings.api.url
    if not api_url:
        raise ConfigurationError(
            "cluster: the workers report to the flow's Prefect server and share its global "
            "concurrency limit, and this process has only a temporary API of its own: set "
            "PREFECT_API_URL to a Prefect server every worker can reach"
        )
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
        info = client.scheduler_info(n_workers=-1)
        try:
            stopped = [a for a, s in client.run(stop_profiler).items() if s]
        except Exception as exc:  # a worker that cannot import this package fails its rows too
            log.warning("could not prepare the Dask workers (%s: %s)", type(exc).__name__, exc)
            stopped = []
    workers = info.get("workers", {})
    threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    log.info("fanning rows out to %s: %d worker(s), %d thread(s)", cluster, len(workers), threads)
    if not workers:
        log.warning("cluster %s has no worker yet: rows wait until one joins", cluster)
    if stopped:
        log.warning(
            "stopped Dask's statistical profiler on %d worker(s): on Python 3.11 it can deadlock "
            "a worker (CPython gh-116969, dask/distributed#8616); start workers with "
            "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
            len(stopped),
        )
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


def row_runner(cluster: str | None, max_workers: int) -> TaskRunner[Any]:
    """The runner of a batch's rows: a thread pool in this process, or a Dask cluster."""
    if not cluster:
        return ThreadPoolTaskRunner(max_workers=max_workers)
    runner: TaskRunner[Any] = _cluster_runner_class()(address=cluster)
    return runner


_RUNNER_CLASS: list[type[Any]] = []


def _cluster_runner_class() -> type[Any]:
    """``DaskTaskRunner`` whose futures always end in a final state (built on first use, so
    that prefect-dask is imported only by a batch that fans out)."""
    if _RUNNER_CLASS:
        return _RUNNER_CLASS[0]
    _dask()
    from distributed import Future
    from prefect.context import AssetContext, serialize_context
    from prefect.utilities.engine import collect_task_run_inputs_sync
    from prefect_dask.task_runners import DaskTaskRunner, PrefectDaskFuture

    from prefect_gptimage.tasks._remote import run_row

    class _RowFuture(PrefectDaskFuture):  # type: ignore[misc,type-arg]
        """A Dask future whose task never returned a state (its worker was lost too often, or
        the future was cancelled) ends Failed with Dask's error, instead of answering with the
        task run's last state on the server (``Running``, from the lost worker)."""

        def wait(self, timeout: float | None = None) -> None:
            super().wait(timeout)
            future = self._wrapped_future
            if self._final_state is None and future.done():  # type: ignore[no-untyped-call]
                try:
                    error = future.exception()  # type: ignore[no-untyped-call]
                except BaseException as exc:  # cancelled
                    error = exc
                if error is not None:
                    self._final_state = _failed(error)

    class ClusterTaskRunner(DaskTaskRunner):  # type: ignore[misc]
        """prefect-dask's runner, connected to a running scheduler, with :class:`_RowFuture`.

        A row is submitted as prefect-dask submits a task, with two differences:

        * the flow run's context travels with each row, the flow object included, and a flow is
          pickled by value: with its module's globals (a batch's stop event holds a lock) and
          its state hooks (the CLI's signal handling). Those stay in the flow's process: the
          workers get a stand-in flow of the same name and result settings instead;
        * on the worker the task run borrows its thread's Prefect client
          (:func:`prefect_gptimage.tasks._remote.run_row`) instead of building new ones.
        """

        _stand_in: tuple[Any, Any] | None = None
        _shipped: tuple[Any, dict[str, Any]] | None = None

        def _context_for(
            self, task: Any, task_run_id: uuid.UUID, inputs: dict[str, Any]
        ) -> dict[str, Any]:
            """What ``serialize_context`` gives, its costly part made once per flow run: the
            flow run's context dumps its result storage block, whose secrets check builds the
            block's JSON schema (about 0.15 s of the flow's CPU per row, measured)."""
            flow_run = FlowRunContext.get()
            if self._shipped is None or self._shipped[0] is not flow_run:
                with self._shippable_context():
                    self._shipped = (flow_run, serialize_context())
            asset = AssetContext.from_task_and_inputs(
                task=task, task_run_id=task_run_id, task_inputs=inputs, copy_to_child_ctx=True
            )
            return {**self._shipped[1], "asset_context": asset.serialize()}

        def submit(
            self,
            task: Any,
            parameters: dict[str, Any],
            wait_for: Any = None,
            dependencies: dict[str, Any] | None = None,
        ) -> Any:
            if not self._started:
                raise RuntimeError("The task runner must be started before submitting work.")
            if task.isasync:  # the row task is sync; an async one would need run_task_async
                raise TypeError(f"{task.name}: only sync tasks run on the cluster")
            parameters = self._optimize_futures(parameters)
            wait_for = self._optimize_futures(wait_for) if wait_for else None
            task_run_id = uuid.uuid4()
            inputs = {
                k: collect_task_run_inputs_sync(v, future_cls=Future) for k, v in parameters.items()
            }
            for k, extra in (dependencies or {}).items():
                inputs[k] = inputs.get(k, set()) | set(extra)
            context = self._context_for(task, task_run_id, inputs)
            future = self.client.submit(  # type: ignore[no-untyped-call]
                run_row,
                key=f"{task.name}-{task_run_id.hex}",
                pure=False,
                task=task,
                task_run_id=task_run_id,
                parameters=parameters,
                wait_for=wait_for,
                return_type="state",
                dependencies=inputs,
                context=context,
            )
            return _RowFuture(task_run_id=task_run_id, wrapped_future=future)

        @contextlib.contextmanager
        def _shippable_context(self) -> Iterator[None]:
            context = FlowRunContext.get()
            if context is None or context.flow is None:
                yield
                return
            if self._stand_in is None or self._stand_in[0] is not context.flow:
                self._stand_in = (context.flow, _stand_in_for(context.flow))
            shipped = context.model_copy(update={"flow": self._stand_in[1]})
            shipped._token = None  # a copy of an entered context; entered here on its own
            with shipped:
                yield

        def duplicate(self) -> Any:
            return type(self)(address=self.address, client_kwargs=self.client_kwargs)

    _RUNNER_CLASS.append(ClusterTaskRunner)
    return ClusterTaskRunner


def _stand_in_for(flow: Flow[Any, Any]) -> Flow[Any, Any]:
    return Flow(
        fn=stand_in_flow_fn,
        name=flow.name,
        log_prints=flow.log_prints,
        persist_result=flow.persist_result,
        result_storage=flow.result_storage,
        result_serializer=flow.result_serializer,
        cache_result_in_memory=flow.cache_result_in_memory,
        validate_parameters=False,
    )


def _failed(error: BaseException) -> State[Any]:
    message = f"lost on the cluster: {type(error).__name__}: {error}"
    return Failed(data=error, message=message)
