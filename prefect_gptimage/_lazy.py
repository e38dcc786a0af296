"""Package attributes loaded on first use (PEP 562), written once for every package that needs it.

``fal_client`` reads its hosts from the environment when first imported, and Prefect, boto3 and
the OCR engine cost seconds to import: a package that re-exports them must not import them until
a name is asked for.

Example:
    >>> __getattr__, __dir__ = lazy_exports("json", {"JSONDecoder": "decoder"})
    >>> __getattr__("JSONDecoder").__name__
    'JSONDecoder'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each public
    name to the submodule (relative to ``package``) that defines it. A loaded name is kept in the
    package, so it is looked up once; ``dir()`` lists ``__all__`` (else the exports)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(getattr(sys.modules[package], "__all__", exports))

    return __getattr__, __dir__
