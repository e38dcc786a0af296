"""Checking that a callback comes from fal: ED25519 signatures against fal's published keys.

fal signs each webhook delivery (fal-protocol §3) with ED25519 over four lines joined by
``\\n``: the ``X-Fal-Webhook-Request-Id``, ``X-Fal-Webhook-User-Id`` and
``X-Fal-Webhook-Timestamp`` headers and the hex SHA-256 of the raw body; the signature comes hex
encoded in ``X-Fal-Webhook-Signature``. The public keys are a JWKS (``kty: OKP``,
``crv: Ed25519``, ``x`` base64url) at ``PREFECT_GPTIMAGE_FAL_JWKS_URL``.

:class:`JwksKeys` fetches them, keeps them :data:`JWKS_TTL` (24 h), and fetches again when no key
known verifies a signature (fal rotated its key), at most once per :data:`MIN_REFRESH_GAP`, so
forged callbacks cannot make the receiver hammer fal. :class:`Verifier` refuses a missing
header, a timestamp more than :data:`SKEW` (300 s) away from now (a replay) and a signature no
key verifies, raising :class:`SignatureRejected`, whose reason names no key and no signature.
The cryptography is the ``cryptography`` package's; nothing here is hand-written crypto.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "HEADERS",
    "JWKS_TTL",
    "MIN_REFRESH_GAP",
    "SKEW",
    "JwksKeys",
    "KeysUnavailable",
    "SignatureRejected",
    "Verifier",
    "signed_message",
]

#: Seconds a fetched key set is trusted before it is fetched again.
JWKS_TTL = 24 * 3600.0
#: Least seconds between two fetches forced by a signature no known key verifies.
MIN_REFRESH_GAP = 60.0
#: Largest allowed distance, in seconds, between a callback's timestamp and now.
SKEW = 300
#: fal's webhook headers, in the order their values are signed (then the body's digest).
HEADERS = (
    "X-Fal-Webhook-Request-Id",
    "X-Fal-Webhook-User-Id",
    "X-Fal-Webhook-Timestamp",
)
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"


class SignatureRejected(Exception):
    """A callback that is not fal's (or not now): answered 401, nothing recorded.

    ``reason`` is safe to log: it never holds the signature or a key.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """fal's key set could not be fetched: the callback cannot be checked now (answered 503, so
    fal delivers it again later)."""


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes fal signs for a callback."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join([request_id, user_id, timestamp, digest]).encode()


def _b64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def parse_jwks(document: Any) -> list[Ed25519PublicKey]:
    """The ED25519 keys of a JWKS document (other key types are skipped)."""
    keys = []
    for jwk in (document or {}).get("keys", []) if isinstance(document, dict) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(_b64url(str(jwk["x"]))))
        except (KeyError, ValueError, binascii.Error):
            continue
    return keys


class JwksKeys:
    """fal's public keys from ``url``, cached for ``ttl`` seconds (see the module docs)."""

    def __init__(
        self,
        url: str,
        http: httpx.Client | None = None,
        *,
        ttl: float = JWKS_TTL,
        min_refresh_gap: float = MIN_REFRESH_GAP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl, self.min_refresh_gap = ttl, min_refresh_gap
        self._http = http or httpx.Client(timeout=httpx.Timeout(10.0))
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        self.fetches = 0

    def keys(self, *, refresh: bool = False) -> list[Ed25519PublicKey]:
        """The keys; fetched when none are cached or they are older than ``ttl``, and with
        ``refresh`` unless the last fetch was under ``min_refresh_gap`` seconds ago."""
        with self._lock:
            now = self._clock()
            age = None if self._fetched_at is None else now - self._fetched_at
            stale = age is None or age >= self.ttl
            if stale or (refresh and age is not None and age >= self.min_refresh_gap):
                self._fetch(now)
            return list(self._keys)

    def _fetch(self, now: float) -> None:
        try:
            answer = self._http.get(self.url)
            answer.raise_for_status()
            keys = parse_jwks(answer.json())
        except (httpx.HTTPError, ValueError) as exc:
            if self._keys:  # keep the keys we have; try again after the gap
                self._fetched_at = now - self.ttl + self.min_refresh_gap
                return
            raise KeysUnavailable(f"fal's webhook keys could not be fetched: {exc}") from None
        if not keys:
            raise KeysUnavailable("fal's key set holds no Ed25519 key")
        self.fetches += 1
        self._keys, self._fetched_at = keys, now


class Verifier:
    """Checks a callback's headers and raw body (see the module docs)."""

    def __init__(
        self, keys: JwksKeys, *, skew: int = SKEW, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys, self.skew, self._clock = keys, skew, clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The request id the callback is signed for; :class:`SignatureRejected` if it is not
        fal's, or not fresh; :class:`KeysUnavailable` if fal's keys cannot be had."""
        values = [headers.get(name) or headers.get(name.lower()) for name in HEADERS]
        signature = headers.get(SIGNATURE_HEADER) or headers.get(SIGNATURE_HEADER.lower())
        if not all(values) or not signature:
            raise SignatureRejected("missing signature header(s)")
        request_id, user_id, timestamp = (str(v) for v in values)
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise SignatureRejected("timestamp is not a number") from None
        if abs(self._clock() - sent_at) > self.skew:
            raise SignatureRejected(f"timestamp outside +-{self.skew} s (stale or replayed)")
        try:
            raw = bytes.fromhex(signature)
        except ValueError:
            raise SignatureRejected("signature is not hex") from None
        message = signed_message(request_id, user_id, timestamp, body)
        if _any_verifies(self.keys.keys(), raw, message):
            return request_id
        if _any_verifies(self.keys.keys(refresh=True), raw, message):  # fal rotated its key?
            return request_id
        raise SignatureRejected("signature verifies with none of fal's keys")


def _any_verifies(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False
