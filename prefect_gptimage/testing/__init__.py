"""Test helpers shipped with the package: an offline fal.ai emulator.

``FalEmulator`` serves fal's queue API for ``fal-ai/gpt-image-1.5`` (and ``/edit``) over real
HTTPS on localhost, so flows can be tested end to end with the unmodified ``fal_client``;
``Fault`` rules make it misbehave the ways fal really does.

Importing this package never imports ``fal_client`` or prefect: start the emulator and export
``emu.env()`` first, *then* import ``fal_client`` (it reads its hosts at import time).

Example::

    from prefect_gptimage.testing import FalEmulator, Fault

    emu = FalEmulator(latency=0.1, concurrency_limit=4).start()
    os.environ.update(emu.env())
    emu.inject(Fault("submit", "429", count=2))
    ...
    emu.stop()
"""

from prefect_gptimage.testing.emulator import FalEmulator, serve_forever_cli
from prefect_gptimage.testing.faults import FAULT_KINDS, OPERATIONS, Fault, FaultKind, Operation
from prefect_gptimage.testing.records import EmulatorStats, RequestInfo

__all__ = [
    "FAULT_KINDS",
    "OPERATIONS",
    "EmulatorStats",
    "FalEmulator",
    "Fault",
    "FaultKind",
    "Operation",
    "RequestInfo",
    "serve_forever_cli",
]
