"""fal_client's host variables, read in one place (:mod:`prefect_gptimage.fal.hosts`)."""

from __future__ import annotations

import pytest

from prefect_gptimage.fal.hosts import (
    FAL_HOST_VARIABLES,
    HostSetting,
    configured_hosts,
    custom_queue_host,
    queue_base,
)
from prefect_gptimage.tasks.policies import configured_fal_hosts, media_policy
from prefect_gptimage.testing import FalEmulator


@pytest.fixture
def no_hosts(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in FAL_HOST_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("queue", "run", "hosts"),
    [
        (None, None, ()),
        ("localhost:8443", "localhost:8443", ("localhost",)),
        ("Gateway.Example.:443", "fal.run", ("gateway.example", "fal.run")),
        ("*.example", "not a host", ()),  # a pattern, and nothing fal_client could use
        ("[::1]:8443", None, ("::1",)),
    ],
)
def test_configured_hosts(
    no_hosts: pytest.MonkeyPatch, queue: str | None, run: str | None, hosts: tuple[str, ...]
) -> None:
    for variable, value in zip(FAL_HOST_VARIABLES, (queue, run), strict=True):
        if value is not None:
            no_hosts.setenv(variable, value)
    assert configured_hosts() == configured_fal_hosts() == hosts
    assert set(hosts) <= set(media_policy().allowed_hosts)


def test_custom_queue_host(no_hosts: pytest.MonkeyPatch) -> None:
    assert custom_queue_host() is None
    no_hosts.setenv("FAL_QUEUE_RUN_HOST", " queue.fal.run ")
    assert custom_queue_host() is None  # fal's own
    no_hosts.setenv("FAL_QUEUE_RUN_HOST", "gw.example:8443")
    assert custom_queue_host() == HostSetting("FAL_QUEUE_RUN_HOST", "gw.example:8443", "gw.example")
    no_hosts.setenv("FAL_QUEUE_RUN_HOST", "not a host")
    assert custom_queue_host() == HostSetting("FAL_QUEUE_RUN_HOST", "not a host", None)


def test_the_client_talks_to_the_host_fal_client_was_given(fal_emulator: FalEmulator) -> None:
    base = queue_base()
    assert (base.scheme, base.host, base.port) == ("https", "localhost", fal_emulator.port)
