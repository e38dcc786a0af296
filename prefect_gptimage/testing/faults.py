"""Fault rules for the fal emulator: what can go wrong, where, how often.

A :class:`Fault` is a rule the emulator checks on each call of one operation. When it matches
(operation, optional endpoint, optional prompt substring, remaining count, probability roll) it
*fires*: the emulator answers with the failure instead of (or, for the ``*_after_accept`` kinds,
after) doing the normal work. The shapes mimic what fal and its nginx ingress really send
(fal-protocol §1.7, §2.3, §2.4), so client retry logic meets the same signals as in production.

Example:
    >>> f = Fault.parse("status:503_json:3")
    >>> (f.operation, f.kind, f.count)
    ('status', '503_json', 3)
    >>> Fault("submit", "fail", status_code=422, match="row-7").error_type_for_failure()
    'content_policy_violation'
    >>> forged_id("id_dotdot", "a", "b")
    'a/../b'
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from typing import Any, Literal, get_args

Operation = Literal["submit", "status", "status_stream", "result", "cancel", "media", "any"]
FaultKind = Literal[
    "429",
    "500_json",
    "502_json",
    "503_json",
    "504_json",
    "500_ingress",
    "502_ingress",
    "503_ingress",
    "504_ingress",
    "drop",
    "drop_after_accept",
    "error_after_accept",
    "fail",
    "404",
    "truncate",
    "wrong_format",
    "slow",
    "stuck",
    "trickle",
    "huge",
    "echo_key",
    "foreign_urls",
    "id_slash",
    "id_dotdot",
    "id_absolute",
    "id_other",
    "few_images",
]

OPERATIONS: tuple[str, ...] = get_args(Operation)
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)

#: Kinds that accept a submit, then answer it with a request id that is not its own (a hostile or
#: broken fal, issue 18): ``<id>/x`` (a ``/``), ``<id>/../<other id>`` (which resolves to another
#: request's path), ``/tmp/<id>`` (an absolute path), or the id of the request accepted before it
#: (a well-formed id, but another request's). The URLs in the answer are built on the same id.
FORGED_ID_KINDS = frozenset({"id_slash", "id_dotdot", "id_absolute", "id_other"})
#: Kinds that only make sense when a request is being submitted.
SUBMIT_ONLY_KINDS = (
    frozenset({"drop_after_accept", "error_after_accept", "fail", "foreign_urls"}) | FORGED_ID_KINDS
)
#: Kinds that only make sense when an image file is downloaded.
MEDIA_ONLY_KINDS = frozenset({"truncate", "wrong_format"})
#: Kinds for a request that never gets anywhere: status and result answer 202 ``IN_QUEUE``.
STUCK_KINDS = frozenset({"stuck"})
#: Kinds that only make sense for a result: a huge body, streamed (``size`` bytes), or a
#: result with one image fewer than ``num_images`` (``few_images``: fal ran, and bills, it).
RESULT_ONLY_KINDS = frozenset({"huge", "few_images"})
#: Bytes written per piece by ``trickle`` (every ``delay`` seconds: 64 B/s by default).
TRICKLE_PIECE = 64
#: Size of a ``huge`` result when no ``size`` is given.
DEFAULT_HUGE_SIZE = 1 << 30

#: Kinds that replace the whole answer (nothing else happens).
RESPONSE_KINDS = frozenset(
    {"429", "404", "drop", "echo_key"}
    | {f"{c}_{s}" for c in (500, 502, 503, 504) for s in ("json", "ingress")}
)

#: fal's ``error_type`` for each infrastructure status code (fal-protocol §1.7).
ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    422: "content_policy_violation",
    499: "client_cancelled",
    500: "runner_server_error",
    502: "runner_incomplete_response",
    503: "runner_scheduling_failure",
    504: "request_timeout",
}

_INGRESS_TITLES: dict[int, str] = {
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}


def error_type_for(status_code: int) -> str:
    """fal's ``error_type`` for an HTTP status (``internal_error`` when there is no better one)."""
    return ERROR_TYPES.get(status_code, "internal_error")


def reason(status_code: int) -> str:
    """The standard reason phrase, e.g. ``Service Unavailable``."""
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def ingress_html(status_code: int) -> bytes:
    """The HTML page nginx answers with; fal-client recognises it by the word ``nginx``."""
    title = _INGRESS_TITLES.get(status_code, f"{status_code} {reason(status_code)}")
    return (
        f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center>"
        "<hr><center>nginx</center></body></html>"
    ).encode()


@dataclass
class Fault:
    """One fault rule.

    Attributes:
        operation: where it applies: ``submit``, ``status``, ``status_stream``, ``result``,
            ``cancel``, ``media`` or ``any``.
        kind: what happens (see the module docs of :mod:`prefect_gptimage.testing`).
        count: how many times it fires; ``None`` = forever.
        probability: chance to fire on each matching call (drawn from the emulator's seeded RNG).
        endpoint: only for this endpoint (e.g. ``fal-ai/gpt-image-1.5/edit``).
        match: only when the request's prompt contains this text.
        status_code: for ``fail`` (default 500) and ``error_after_accept`` (default 503).
        error_type: override fal's ``error_type`` for ``fail``.
        delay: seconds, for ``slow`` (default 1.0 when left at 0), and for ``trickle`` the pause
            between pieces of 64 bytes (default 1.0: 64 B/s).
        size: bytes, for ``huge`` (default 1 GiB): the size of the result body.
        id: identifies the rule in the admin API.
        fired: how many times it has fired so far.
    """

    operation: Operation
    kind: FaultKind
    count: int | None = 1
    probability: float = 1.0
    endpoint: str | None = None
    match: str | None = None
    status_code: int | None = None
    error_type: str | None = None
    delay: float = 0.0
    size: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    fired: int = 0

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; use one of {OPERATIONS}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}")
        if self.kind in SUBMIT_ONLY_KINDS and self.operation not in ("submit", "any"):
            raise ValueError(f"fault kind {self.kind!r} only applies to operation 'submit'")
        if self.kind in MEDIA_ONLY_KINDS and self.operation not in ("media", "any"):
            raise ValueError(f"fault kind {self.kind!r} only applies to operation 'media'")
        if self.kind in STUCK_KINDS and self.operation not in ("status", "result", "any"):
            raise ValueError(f"fault kind {self.kind!r} only applies to 'status' and 'result'")
        if self.kind in RESULT_ONLY_KINDS and self.operation not in ("result", "any"):
            raise ValueError(f"fault kind {self.kind!r} only applies to operation 'result'")
        if self.size is not None and self.size < 0:
            raise ValueError("size must be >= 0")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0 or None (forever)")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.kind in ("slow", "trickle") and self.delay == 0:
            self.delay = 1.0
        if self.kind == "huge" and self.size is None:
            self.size = DEFAULT_HUGE_SIZE
        if self.status_code is not None and not 400 <= self.status_code <= 599:
            raise ValueError("status_code must be a 4xx or 5xx code")

    @property
    def exhausted(self) -> bool:
        """True once the rule has fired ``count`` times."""
        return self.count is not None and self.fired >= self.count

    @property
    def http_status(self) -> int:
        """The status code this rule answers with (or makes the request end with)."""
        if self.status_code is not None:
            return self.status_code
        if self.kind == "fail":
            return 500
        if self.kind == "error_after_accept":
            return 503
        head = self.kind.split("_", 1)[0]
        return int(head) if head.isdigit() else 500

    def error_type_for_failure(self) -> str:
        """fal's ``error_type`` for a ``fail`` rule."""
        return self.error_type or error_type_for(self.http_status)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as accepted by ``POST /_emulator/faults``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """Build from JSON (unknown keys are rejected; ``fired`` is ignored)."""
        if not isinstance(data, dict):
            raise ValueError("a fault must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        clean = {k: v for k, v in data.items() if k != "fired" and not (k == "id" and v is None)}
        for key in ("operation", "kind"):
            if key not in clean:
                raise ValueError(f"missing fault field {key!r}")
        return cls(**clean)

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse ``operation:kind[:count[:param]]``.

        ``count`` may be ``*`` or ``inf`` for forever; ``param`` is the delay in seconds for
        ``slow`` and ``trickle``, the body size in bytes for ``huge`` and the status code for
        ``fail`` / ``error_after_accept``.
        E.g. ``status:503_json:3``, ``media:slow:*:2.5``, ``submit:fail:1:422``,
        ``status:stuck:*``, ``result:trickle:1:0.5``, ``result:huge:1:300000000``.
        """
        parts = spec.strip().split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"bad fault spec {spec!r}; expected operation:kind[:count[:param]]")
        kwargs: dict[str, Any] = {"operation": parts[0], "kind": parts[1]}
        if len(parts) >= 3 and parts[2]:
            kwargs["count"] = None if parts[2] in ("*", "inf", "forever") else int(parts[2])
        if len(parts) == 4 and parts[3]:
            if parts[1] in ("slow", "trickle"):
                kwargs["delay"] = float(parts[3])
            elif parts[1] == "huge":
                kwargs["size"] = int(parts[3])
            else:
                kwargs["status_code"] = int(parts[3])
        return cls(**kwargs)


def forged_id(kind: str, own: str, other: str) -> str:
    """The request id a :data:`FORGED_ID_KINDS` rule answers a submit with.

    ``own`` is the id the emulator gave the request, ``other`` the id of another request.
    """
    forms = {
        "id_slash": f"{own}/x",
        "id_dotdot": f"{own}/../{other}",
        "id_absolute": f"/tmp/{own}",
        "id_other": other,
    }
    return forms[kind]


class FaultBook:
    """The thread-safe list of fault rules and the seeded RNG used to roll probabilities."""

    def __init__(self, seed: int | None = 0) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)
        self._seed = seed
        self.fired_total = 0
        self.fired_by_kind: Counter[str] = Counter()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> int:
        """Remove every rule; returns how many there were."""
        with self._lock:
            n = len(self._faults)
            self._faults.clear()
            return n

    def reset(self) -> None:
        """Forget rules and counters and re-seed the RNG."""
        with self._lock:
            self._faults.clear()
            self._rng = random.Random(self._seed)
            self.fired_total = 0
            self.fired_by_kind.clear()

    def list(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def pick(
        self,
        operation: str,
        kinds: Collection[str],
        *,
        endpoint: str | None = None,
        prompt: str | None = None,
    ) -> Fault | None:
        """The first rule that fires for this call, or None. Firing consumes one ``count``."""
        if not self._faults:
            return None
        with self._lock:
            for fault in self._faults:
                if fault.kind not in kinds or fault.operation not in (operation, "any"):
                    continue
                if fault.exhausted:
                    continue
                if fault.endpoint is not None and fault.endpoint != endpoint:
                    continue
                if fault.match is not None and (prompt is None or fault.match not in prompt):
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                self.fired_total += 1
                self.fired_by_kind[fault.kind] += 1
                return fault
        return None
