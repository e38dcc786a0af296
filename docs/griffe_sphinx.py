"""A Griffe extension for the API reference: the package's docstrings, written for Sphinx-like
readers (``:class:`X``` roles, ``Example::`` literal blocks, ``Example:`` sections of doctests),
read as the Markdown and Google-style sections mkdocstrings expects.

Only the rendering changes: the docstrings in the source stay as they are (``help()`` and the
doctests read them). Loaded by ``mkdocs.yml`` (``extensions: [docs/griffe_sphinx.py]``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

#: ``:class:`~a.b.C``` (any Sphinx role) -> ``C`` in backticks; without ``~`` the full name.
_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`]+)`")
#: a paragraph that ends with ``::`` introduces a literal block: Markdown needs one colon
_LITERAL = re.compile(r"::[ \t]*$", re.MULTILINE)
#: Google style knows "Examples:" (doctests become code); "Example:" would be an admonition
_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its Sphinx-isms turned into Markdown.

    Examples:
        >>> to_markdown("See :class:`~prefect_gptimage.retry.RetryPolicy`.")
        'See `RetryPolicy`.'
        >>> to_markdown("Example::\\n\\n    run()")
        'Examples:\\n\\n    run()'
    """
    text = _ROLE.sub(_role, text)
    text = _LITERAL.sub(":", text)
    return _EXAMPLE.sub(r"\1Examples:", text)


class SphinxToMarkdown(Extension):
    """Rewrites every docstring once the object tree is loaded, before it is parsed."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
