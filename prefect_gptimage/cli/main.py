"""``prefect-gptimage``: generate images, run a prompt file, run the emulator or the demo.

Configured only by the environment a user already has: fal_client's variables (``FAL_KEY``, ...),
Prefect's (``PREFECT_API_URL``, or none for an ephemeral API), boto3's (``AWS_*``).

A command that would call fal checks first that fal_client can find a key (``FAL_KEY``,
``FAL_KEY_ID`` with ``FAL_KEY_SECRET``, or a ``fal auth login`` token), before Prefect starts:
without one it says so in one line, exits 2 and writes nothing. ``--dry-run`` needs no key.

Exit status: 0 when every image was produced, 1 when any failed, 2 for invalid input (the message
names the field and nothing is submitted), 130 after SIGINT and 143 after SIGTERM (no new request
is submitted, none is cancelled at fal; a re-run resumes them: see :mod:`._signals`).

Example::

    prefect-gptimage generate "a lighthouse at dawn" --quality low --num-images 2 --json
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect_gptimage.cli._server import ApiUnavailable
from prefect_gptimage.cli._signals import Interrupts
from prefect_gptimage.errors import (
    BatchIncomplete,
    ConfigurationError,
    InvalidRequestError,
    StopBeforeStart,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: What ``prefect-gptimage --help`` says first (plain text: argparse prints it as is).
DESCRIPTION = (
    "Generate images with OpenAI GPT Image 1.5 on fal.ai as Prefect flows: one prompt, a prompt "
    "file, the bundled fal emulator, or an offline demo. Configured by FAL_KEY, AWS_* and "
    "Prefect's own settings."
)

#: The module of each command's flow (imported while Prefect's temporary server starts).
FLOW_MODULES = {
    "generate": "prefect_gptimage.flows.generate",
    "batch": "prefect_gptimage.flows.batch",
    "edit": "prefect_gptimage.flows.edit_batch",
}

#: The one line a user without a fal key reads (nothing was started, submitted or written).
MISSING_KEY = (
    "no fal key found: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET), or run 'fal auth login'; "
    "nothing was submitted"
)


def fal_key_available() -> bool:
    """Whether fal_client will find credentials, checked without importing it.

    The same places fal_client looks (``fal_client.auth``): ``FAL_KEY``, ``FAL_KEY_ID`` with
    ``FAL_KEY_SECRET``, then the token ``fal auth login`` saved in ``$FAL_HOME_DIR/auth0_token``
    (default ``~/.fal``).
    """
    if os.environ.get("FAL_KEY"):
        return True
    if os.environ.get("FAL_KEY_ID") and os.environ.get("FAL_KEY_SECRET"):
        return True
    home = Path(os.environ.get("FAL_HOME_DIR") or Path.home() / ".fal").expanduser()
    try:
        return bool((home / "auth0_token").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return False


def _add_request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw (2 to 32000 characters)")
    p.add_argument(
        "--edit-image",
        dest="image_urls",
        action="append",
        metavar="URL",
        help="edit this image (repeat for several): uses fal-ai/gpt-image-1.5/edit",
    )
    p.add_argument("--mask-image", dest="mask_image_url", metavar="URL", help="mask for the edit")
    p.add_argument("--num-images", type=int, metavar="N", help="1 to 4 (default 1)")
    p.add_argument("--quality", metavar="Q", help="low, medium or high (fal's default: high)")
    p.add_argument("--image-size", metavar="S", help="1024x1024, 1536x1024, 1024x1536 (edit: auto)")
    p.add_argument("--background", metavar="B", help="auto, transparent or opaque")
    p.add_argument("--output-format", metavar="F", help="png, jpeg or webp")
    p.add_argument("--input-fidelity", metavar="I", help="edit only: low or high")
    p.add_argument(
        "--sync-mode",
        action="store_true",
        default=None,
        help="images come back inline as data: URIs",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", metavar="DIR", help="where images are written")
    p.add_argument("--bucket", metavar="B", help="stage images to this S3 bucket")
    p.add_argument("--prefix", metavar="P", default="gptimage", help="S3 key prefix")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="cancel a request still running after this long",
    )
    p.add_argument("--refresh", action="store_true", help="ignore the cache and submit again")
    p.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="submit again requests whose earlier submit's outcome is unknown (possibly billed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary line last")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="log every task run and Prefect's tracebacks (default: the summary only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-gptimage", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate images for one prompt",
        description="Generate images for one prompt (edit images with --edit-image).",
    )
    _add_request_options(gen)
    _add_run_options(gen)

    batch = sub.add_parser(
        "batch",
        help="generate every row of a prompt file (JSONL or CSV)",
        description="Generate every row of a prompt file (JSONL or CSV), staged to S3.",
    )
    batch.add_argument("file", help="prompt file: .jsonl or .csv, one request per row")
    batch.add_argument(
        "--concurrency", type=int, default=8, metavar="C", help="requests in flight (default 8)"
    )
    batch.add_argument(
        "--lookahead",
        type=int,
        metavar="N",
        help="requests submitted beyond C to wait in fal's queue, when C is your fal account's "
        "limit (default: PREFECT_GPTIMAGE_LOOKAHEAD, else 0)",
    )
    batch.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="refuse the batch if its uncached rows would cost more (cached rows are free)",
    )
    batch.add_argument(
        "--budget-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the fleet budget to refill before holding a row back",
    )
    batch.add_argument(
        "--dry-run", action="store_true", help="print the estimated cost and submit nothing"
    )
    batch.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run the rows on a Dask cluster (tcp://scheduler:8786; needs prefect-dask and "
        "PREFECT_API_URL); C then counts requests in flight across the cluster",
    )
    _add_run_options(batch)

    from prefect_gptimage.cli.edit import add_edit_parser  # `edit`: its code is in cli/edit.py

    add_edit_parser(sub, _add_run_options)

    demo = sub.add_parser(
        "demo",
        help="run a sample batch offline: bundled emulator, local S3",
        description="Run a sample batch offline: the bundled fal emulator, a local S3 server\n"
        "(moto) and a temporary Prefect API. A second run into the same --output-dir\n"
        "is served from the cache. Needs moto, in the demo extra:\n\n"
        '  pip install "prefect-gptimage[demo]"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--output-dir",
        default="demo-output",
        metavar="DIR",
        help="images, manifest and gallery, and the demo's Prefect home and cache in DIR/.prefect "
        "(default demo-output)",
    )
    demo.add_argument("--prompt-file", metavar="FILE", help="default: the bundled sample")
    demo.add_argument("--latency", type=float, default=1.0, help="emulated generation seconds")

    from prefect_gptimage.cli.reconcile import add_reconcile_parser

    add_reconcile_parser(sub)
    emu = sub.add_parser(
        "emulator", help="run the bundled fal emulator (HTTPS) in the foreground", add_help=False
    )
    emu.add_argument("args", nargs=argparse.REMAINDER)
    hooks = sub.add_parser("webhooks", help="serve the fal webhook receiver", add_help=False)
    hooks.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the user gave (None means: fal's default)."""
    names = (
        "prompt",
        "image_urls",
        "mask_image_url",
        "num_images",
        "quality",
        "image_size",
        "background",
        "output_format",
        "input_fidelity",
        "sync_mode",
    )
    fields = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    from prefect_gptimage.cli.edit import local_ref  # local inputs: relative to the working dir

    for name in ("image_urls", "mask_image_url"):
        if fields.get(name):
            value = fields[name]
            fields[name] = (
                [local_ref(u) for u in value] if isinstance(value, list) else local_ref(value)
            )
    return fields


def _fail_usage(message: str) -> int:
    print(f"prefect-gptimage: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _manifest_written(uri: str | None) -> bool:
    """Whether ``uri`` names a manifest with something in it (an S3 object is staged only
    after its lines are written; a local one is empty when the run staged nothing, e.g.
    ``generate`` without a bucket)."""
    if not uri:
        return False
    if uri.startswith("s3://"):
        return True
    try:
        return Path(uri).stat().st_size > 0
    except OSError:
        return False


def _emit(summary: Any, as_json: bool, ok: bool = True) -> int:
    if not _manifest_written(summary.manifest_uri):  # no path for a file we did not fill
        summary.manifest_uri = None
    for img in summary.images:
        print(img.get("s3_uri") or img.get("path"))
        if img.get("url") and img.get("s3_uri"):
            print(f"  {img['url']}")
    for failure in summary.failures:
        print(f"FAILED: {failure.label()}: {failure.reason}", file=sys.stderr)
    if summary.manifest_uri:
        print(f"manifest: {summary.manifest_uri}")
    if summary.images and not summary.failures and summary.submitted == 0:
        # a re-run served whole from the cache: say so, or it looks like a fresh (paid) run
        print("0 new submits: every image came from the cache (nothing paid)", file=sys.stderr)
    if as_json:
        print(summary.model_dump_json())
    return EXIT_OK if ok and summary.ok else EXIT_FAILED


def check_input(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's input, found without Prefect (imports included), or
    None. Nothing is started, submitted or written before these pass."""
    try:
        if args.command == "edit":
            from prefect_gptimage.cli.edit import check_edit_input

            return check_edit_input(args) or _bucket_problem(args.bucket)
        if args.command == "generate":
            from prefect_gptimage.prompts import check_local_inputs
            from prefect_gptimage.schemas import parse_request

            check_local_inputs(parse_request(request_fields(args)))
        else:
            if args.concurrency < 1:
                return "--concurrency: must be at least 1"
            if args.lookahead is not None and args.lookahead < 0:
                return "--lookahead: must be 0 or more"
            from prefect_gptimage.prompts import load_prompt_file

            load_prompt_file(args.file)
            if not args.bucket:
                return "--bucket: required (where the images and the manifest go)"
    except InvalidRequestError as exc:
        return str(exc)
    return _bucket_problem(args.bucket)


def _bucket_problem(bucket: str | None) -> str | None:
    """What is wrong with ``--bucket``'s name (S3's naming rules, checked locally), or None."""
    if not bucket:
        return None
    from prefect_gptimage.s3.preflight import validate_bucket_name

    try:
        validate_bucket_name(bucket)
    except InvalidRequestError as exc:
        return str(exc)
    return None


def _emit_or_fail(result: Any, as_json: bool, ok: bool = True) -> int:
    """A flow's result: its summary, or the one error a check raised before paying (invalid
    input or configuration: exit 2; anything else, e.g. a bucket that cannot take the images: 1)."""
    if isinstance(result, InvalidRequestError | ConfigurationError):
        return _fail_usage(str(result))
    if isinstance(result, BaseException):
        print(f"prefect-gptimage: error: {result}", file=sys.stderr)
        return EXIT_FAILED
    return _emit(result, as_json, ok=ok)


def cmd_generate(args: argparse.Namespace, interrupts: Interrupts) -> int:
    from prefect_gptimage.flows.generate import generate_to_s3
    from prefect_gptimage.schemas import parse_request

    request = parse_request(request_fields(args))  # checked already (check_input)
    interrupts.request = request
    interrupts.running = True  # a signal from here on lets the request be recorded first
    state = generate_to_s3.with_options(on_running=[interrupts.reclaim])(  # type: ignore[list-item]
        request,
        bucket=args.bucket,
        prefix=args.prefix,
        output_dir=args.output_dir,
        timeout=args.timeout,
        refresh=args.refresh,
        resubmit_unknown=args.resubmit_unknown,
        return_state=True,
    )
    interrupts.returned = True
    return _emit_or_fail(state.result(raise_on_failure=False), args.json)


def cmd_batch(args: argparse.Namespace, interrupts: Interrupts) -> int:
    from prefect_gptimage.flows.batch import batch_to_s3

    interrupts.print_summary = lambda summary: _emit(summary, args.json, ok=False)
    interrupts.running = True  # a signal from here on stops the batch instead of unwinding
    state = batch_to_s3.with_options(on_running=[interrupts.reclaim])(  # type: ignore[list-item]
        args.file,
        bucket=args.bucket,
        prefix=args.prefix,
        concurrency=args.concurrency,
        output_dir=args.output_dir,
        max_cost=args.max_cost,
        timeout=args.timeout,
        refresh=args.refresh,
        resubmit_unknown=args.resubmit_unknown,
        lookahead=args.lookahead,
        cluster=args.cluster,
        budget_wait=args.budget_wait,
        stop=interrupts.stop,
        return_state=True,
    )
    interrupts.returned = True
    return emit_batch_state(state, args.json)


def emit_batch_state(state: Any, as_json: bool) -> int:
    """A batch-shaped flow's final state printed (its summary, or the error before paying)."""
    summary: Any = state.result(raise_on_failure=False)
    if isinstance(summary, BatchIncomplete):  # some rows failed: report them with the rest
        summary = summary.summary
    if isinstance(summary, BaseException):
        return _emit_or_fail(summary, as_json)
    if not state.is_completed():
        print(state.message, file=sys.stderr)
    if summary.submitted:  # what the batch paid: fal's bill with an admin key, else estimates
        from prefect_gptimage.reporting.billing import cost_words

        print(f"cost: {cost_words(summary)}", file=sys.stderr)
    return _emit(summary, as_json, ok=state.is_completed())


def cmd_dry_run(args: argparse.Namespace) -> int:
    """``batch FILE --dry-run``: validate and estimate here, with no flow run and no Prefect
    server (see :mod:`prefect_gptimage.cli.dry_run`)."""
    from prefect_gptimage.cli.dry_run import plan_dry_run, print_plan

    if args.concurrency < 1:
        return _fail_usage("--concurrency: must be at least 1")
    problem = _bucket_problem(args.bucket)  # before the cache is read: as fast as a real run's
    if problem:
        return _fail_usage(problem)
    try:
        plan = plan_dry_run(
            args.file,
            bucket=args.bucket,
            prefix=args.prefix,
            max_cost=args.max_cost,
            resubmit_unknown=args.resubmit_unknown or args.refresh,
        )
    except (InvalidRequestError, ConfigurationError) as exc:
        return _fail_usage(str(exc))
    print_plan(plan, args.json)
    return EXIT_OK


def _run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Quiet the console, start Prefect's temporary API if it is used, run the command."""
    from prefect_gptimage.cli._console import quiet_console
    from prefect_gptimage.cli._server import ApiStart

    quiet_console(args.verbose)
    if getattr(args, "cluster", None):
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:  # workers cannot reach a temporary API
            return _fail_usage(
                "--cluster: needs a Prefect server every worker reaches: set PREFECT_API_URL"
            )
    api = ApiStart(args.verbose).begin()  # Prefect's temporary server starts meanwhile ...
    if args.command in FLOW_MODULES:
        importlib.import_module(FLOW_MODULES[args.command])  # ... while this imports the flow
    api.wait()  # the API answers before the flow run is created
    from prefect_gptimage.flows._preflight import check_prefect_api

    try:  # an API that is not there: one line naming PREFECT_API_URL, before any flow
        check_prefect_api()
    except ConfigurationError as exc:
        print(f"prefect-gptimage: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from prefect_gptimage.cli.edit import cmd_edit

    commands = {"generate": cmd_generate, "batch": cmd_batch, "edit": cmd_edit}
    return commands[args.command](args, interrupts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:  # its options belong to the emulator's own parser
        from prefect_gptimage.testing.emulator import serve_forever_cli

        return serve_forever_cli(argv[1:])
    if argv[:1] == ["webhooks"]:  # the receiver (issue 20): its own parser, in cli/webhooks.py
        from prefect_gptimage.cli.webhooks import main as webhooks_main

        return webhooks_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from prefect_gptimage.cli.demo import run_demo

        return run_demo(args.output_dir, prompt_file=args.prompt_file, latency=args.latency)
    if args.command == "reconcile":  # an admin key, no fal key, no server
        from prefect_gptimage.cli.reconcile import cmd_reconcile

        return cmd_reconcile(args)
    if getattr(args, "dry_run", False):  # no key, no flow, no server: an answer in a second
        return cmd_dry_run(args)
    if not fal_key_available():
        return _fail_usage(MISSING_KEY)  # before any server, import or file: one line
    interrupts = Interrupts().install()  # a signal during start-up stops it cleanly
    try:
        problem = check_input(args)  # before Prefect is even imported: one line, exit 2
        code = _fail_usage(problem) if problem else _run(args, interrupts)
    except StopBeforeStart as exc:
        print(f"prefect-gptimage: {exc}", file=sys.stderr)
        code = interrupts.exit_code
    except KeyboardInterrupt:
        code = 130
    except ApiUnavailable as exc:
        print(
            f"prefect-gptimage: error: Prefect's temporary API server did not start ({exc}); "
            "nothing was submitted. Start a server (`prefect server start`, then set "
            "PREFECT_API_URL) or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.",
            file=sys.stderr,
        )
        code = EXIT_FAILED
    return interrupts.finish(code)


if __name__ == "__main__":
    sys.exit(main())
