"""Where fal's queue is: fal_client's host variables, read and parsed here and nowhere else.

fal_client takes its hosts from ``FAL_QUEUE_RUN_HOST`` and ``FAL_RUN_HOST`` (``host`` or
``host:port``, always https) when it is first imported, and builds every queue URL on
``fal_client.client.QUEUE_URL_FORMAT``. The client layer sends its own calls to the same base
(:func:`queue_base`) and follows a URL fal returned only when it stays there
(:func:`on_queue_host`); the media policy trusts the hosts those variables name
(:func:`configured_hosts`); the flows' preflight checks a custom queue host
(:func:`custom_queue_host`).

Example:
    >>> parse_host("localhost:8443"), parse_host("Queue.Fal.Run."), parse_host("not a host")
    ('localhost', 'queue.fal.run', None)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import httpx

__all__ = [
    "DEFAULT_QUEUE_HOST",
    "FAL_HOST_VARIABLES",
    "QUEUE_HOST_VARIABLE",
    "HostSetting",
    "configured_hosts",
    "custom_queue_host",
    "host_setting",
    "on_queue_host",
    "parse_host",
    "queue_base",
]

#: fal_client's variable naming its queue host.
QUEUE_HOST_VARIABLE = "FAL_QUEUE_RUN_HOST"
#: fal_client's variables naming the hosts it talks to: images they serve are trusted like fal's.
FAL_HOST_VARIABLES = (QUEUE_HOST_VARIABLE, "FAL_RUN_HOST")
#: fal's own queue host (fal_client's default).
DEFAULT_QUEUE_HOST = "queue.fal.run"

_HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]+$")  # a name, an IPv4 or a bracketed IPv6 address
#: The characters a queue URL is made of: no ``%`` escapes, ``?``, ``#``, ``\\`` or spaces.
_URL_TEXT = re.compile(r"^https://[A-Za-z0-9._~:@\[\]/!$&'()*+,;=-]+$")


@dataclass(frozen=True)
class HostSetting:
    """One host variable as set: its ``value`` and the bare host name in it (``None``: the value
    names no host, so fal_client cannot use it either)."""

    variable: str
    value: str
    host: str | None


def parse_host(value: str) -> str | None:
    """The bare host name (lower case, no port) in a ``host[:port]`` value, or None."""
    try:
        host = httpx.URL(f"https://{value}").host.lower().rstrip(".")
    except (httpx.InvalidURL, ValueError):
        return None
    return host if host and _HOST.match(host) else None


def host_setting(variable: str) -> HostSetting | None:
    """``variable`` as set in the environment, parsed; None when it is unset or empty."""
    value = os.environ.get(variable, "").strip()
    return HostSetting(variable, value, parse_host(value)) if value else None


def configured_hosts() -> tuple[str, ...]:
    """The bare host names (no port) that the set host variables name, without duplicates.

    Unset variables do not count: fal's default hosts serve no media (it comes from
    ``*.fal.media``).
    """
    hosts: list[str] = []
    for variable in FAL_HOST_VARIABLES:
        setting = host_setting(variable)
        if setting is not None and setting.host and setting.host not in hosts:
            hosts.append(setting.host)
    return tuple(hosts)


def custom_queue_host() -> HostSetting | None:
    """``FAL_QUEUE_RUN_HOST`` when it names anything but fal's own queue host, else None."""
    setting = host_setting(QUEUE_HOST_VARIABLE)
    if setting is None or setting.value.lower().rstrip(".") == DEFAULT_QUEUE_HOST:
        return None
    return setting


def queue_base() -> httpx.URL:
    """The base of every queue URL, as fal_client builds it (its host variables, read when
    fal_client was first imported)."""
    import fal_client.client  # deferred: it reads its hosts from the environment at import

    return httpx.URL(fal_client.client.QUEUE_URL_FORMAT)


def on_queue_host(url: str | None, base: httpx.URL) -> bool:
    """True when ``url`` may be called with the key: an https URL on the queue's host and port
    (``base``), without credentials, query or fragment, whose path has no ``.`` or ``..`` segment
    and no escapes (httpx would resolve the dots, and a server the escapes, to another path).

    Example:
        >>> base = httpx.URL("https://queue.fal.run/")
        >>> on_queue_host("https://queue.fal.run/fal-ai/gpt-image-1.5/requests/1/status", base)
        True
        >>> on_queue_host("https://queue.fal.run/fal-ai/gpt-image-1.5/requests/1/../2", base)
        False
        >>> on_queue_host("https://elsewhere.example/fal-ai/gpt-image-1.5/requests/1", base)
        False
    """
    if not url or not _URL_TEXT.match(url):
        return False
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return False
    path = url.split("://", 1)[-1].partition("/")[2]
    return (
        (parsed.scheme, parsed.host, parsed.port) == (base.scheme, base.host, base.port)
        and not parsed.userinfo
        and not {".", ".."} & set(path.split("/"))
    )
