"""Example: a prompt file through the OCR quality gate; only images whose text reads right staged.

Each row's quoted text ("GRAND OPENING") is read back from its image with OCR; a misspelled image
is regenerated as a new variant, up to ``--max-attempts`` requests per row (each cached and priced).

As a script (needs the ocr extra: pip install "prefect-gptimage[ocr]")::

    python flows/ocr_gate.py signs.jsonl --bucket my-bucket --max-attempts 3

Offline, against the bundled emulator drawing 30% of its texts misspelled::

    eval "$(prefect-gptimage emulator --misspell-rate 0.3 --no-require-key &)"  # or another shell
    FAL_KEY=any python flows/ocr_gate.py signs.jsonl

As a deployment entrypoint: ``flows/ocr_gate.py:ocr_gated_batch``.
Configuration is the environment only: ``FAL_KEY``, boto3's ``AWS_*``, Prefect's ``PREFECT_*``.
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
from prefect_gptimage.quality.text import DEFAULT_MIN_SCORE

__all__ = ["ocr_gated_batch"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt_file")
    parser.add_argument("--bucket", default=None)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE)
    args = parser.parse_args()
    summary = ocr_gated_batch(
        args.prompt_file,
        bucket=args.bucket,
        max_attempts=args.max_attempts,
        min_score=args.min_score,
    )
    for row in summary.results:
        last = row.attempts[-1].verdicts if row.attempts else []
        read = "; ".join(v.read_text for v in last)
        verdict = "PASS" if row.passed else "FAIL"
        print(f"line {row.line}: {verdict} after {len(row.attempts)} attempt(s): {read!r}")
    print(f"manifest: {summary.manifest_uri}\ngallery: {summary.gallery}")
    print(summary.model_dump_json(include={"rows", "passed", "regenerations", "cost"}))
