"""Docstring examples that can run offline are run, so they stay true.

The others (they submit to fal, or need a bucket) are marked ``# doctest: +SKIP`` in place.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "prefect_gptimage.retry",
    "prefect_gptimage._retry_services",
    "prefect_gptimage.schemas",
    "prefect_gptimage._request_models",
    "prefect_gptimage._output_models",
    "prefect_gptimage._fingerprint",
    "prefect_gptimage.pricing",
    "prefect_gptimage._lazy",
    "prefect_gptimage.fal._classify",
    "prefect_gptimage.fal._transport",
    "prefect_gptimage.fal._ops",
    "prefect_gptimage.fal.hosts",
    "prefect_gptimage.fal.polling",
    "prefect_gptimage.tasks.cache",
    "prefect_gptimage.tasks.locks",
    "prefect_gptimage.s3",
    "prefect_gptimage.s3.clients",
    "prefect_gptimage.s3.failures",
    "prefect_gptimage.s3.keys",
    "prefect_gptimage.s3.models",
    "prefect_gptimage.reporting.artifact_keys",
    "prefect_gptimage.reporting.artifacts",
    "prefect_gptimage.reporting.gallery",
    "prefect_gptimage.reporting.manifest",
    "prefect_gptimage.reporting.progress",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False
    )
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
