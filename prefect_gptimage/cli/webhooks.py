"""``prefect-gptimage webhooks serve``: run the fal webhook receiver in the foreground.

The app is :func:`prefect_gptimage.webhooks.create_app` on uvicorn (a well-kept ASGI server):
SIGTERM or Ctrl+C finish the callbacks in progress, then exit 0. It serves plain HTTP; put it
behind a TLS-terminating proxy (see docs/webhooks.md) and give fal that public URL in
``PREFECT_GPTIMAGE_WEBHOOK_URL``. It records callbacks in the result storage the cache uses, so
start it with the same ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` (or ``PREFECT_LOCAL_STORAGE_PATH``)
as the runs, and the same ``PREFECT_API_URL``: it resumes suspended batch runs through it
(:mod:`prefect_gptimage.webhooks.resume`).
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

#: The receiver's own logger (callbacks refused, runs resumed): shown beside uvicorn's lines.
RECEIVER_LOGGER = "prefect_gptimage.webhooks"


def build_parser() -> argparse.ArgumentParser:
    """The ``webhooks`` command's own parser."""
    parser = argparse.ArgumentParser(
        prog="prefect-gptimage webhooks",
        description="The fal webhook receiver: verifies fal's signed callbacks and records them "
        "where every run reads them.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve the receiver until SIGTERM or Ctrl+C")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8787, help="port (default 8787)")
    serve.add_argument(
        "--jwks-url",
        default=None,
        help="fal's key set (default: PREFECT_GPTIMAGE_FAL_JWKS_URL, fal's own)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the receiver; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    from prefect_gptimage.settings import get_settings
    from prefect_gptimage.webhooks import WEBHOOK_PATH, JwksKeys, Resumer, Verifier, create_app

    jwks_url = args.jwks_url or get_settings().fal_jwks_url
    # resumes suspended batch runs (PREFECT_GPTIMAGE_WEBHOOK_SUSPEND) through Prefect's API:
    # only a configured one (none would start a temporary server inside the receiver)
    resumer = Resumer() if PREFECT_API_URL.value() else None
    app = create_app(Verifier(JwksKeys(jwks_url)), resumer=resumer)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="info",
        log_config=_log_config(uvicorn.config.LOGGING_CONFIG),
        lifespan="off",
    )
    server = uvicorn.Server(config)
    print(
        f"# fal webhook receiver on http://{args.host}:{args.port}{WEBHOOK_PATH} "
        f"(health: /health); keys from {jwks_url}",
        flush=True,
    )
    # uvicorn catches SIGTERM/SIGINT, finishes the callbacks in progress, then raises the signal
    # again under the handler it found: this one, so a stop by signal is a clean exit (0)
    stops: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    if resumer is None:
        print("# no PREFECT_API_URL: suspended batch runs are not resumed", flush=True)
    else:
        resumer.start()
    try:
        server.run()
    finally:
        if resumer is not None:
            resumer.stop()
    print(f"# fal webhook receiver stopped ({len(stops)} signal(s))", file=sys.stderr, flush=True)
    return 0


def _log_config(uvicorn_config: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's logging config, with the receiver's logger on uvicorn's console handler (at
    INFO): what it refuses and which runs it resumes show in the receiver's output."""
    config = copy.deepcopy(uvicorn_config)
    config["loggers"][RECEIVER_LOGGER] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config
