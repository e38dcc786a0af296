"""The fal webhook receiver: verified callbacks recorded where every run can read them.

``prefect-gptimage webhooks serve --host H --port P`` runs :func:`~.app.create_app` on uvicorn.
fal calls it when a request ends (every submit carries ``PREFECT_GPTIMAGE_WEBHOOK_URL``); it
checks the ED25519 signature against fal's keys (:mod:`.verify`) and records the callback once in
the result storage the cache uses (:mod:`prefect_gptimage.tasks.callbacks`), where a waiting row
reads it instead of polling fal; it resumes the suspended batch runs waiting for those callbacks
(:mod:`.resume`). See docs/webhooks.md ("Waiting without a worker").
"""

from prefect_gptimage.webhooks.app import WEBHOOK_PATH, ReceiverStats, create_app
from prefect_gptimage.webhooks.resume import Resumer
from prefect_gptimage.webhooks.verify import (
    JwksKeys,
    KeysUnavailable,
    SignatureRejected,
    Verifier,
)

__all__ = [
    "WEBHOOK_PATH",
    "JwksKeys",
    "KeysUnavailable",
    "ReceiverStats",
    "Resumer",
    "SignatureRejected",
    "Verifier",
    "create_app",
]
