"""The top-level package is a small face, and the API reference documents every public name.

* ``prefect_gptimage.__all__`` is the ~20 names most flows need, each loaded on first use from
  the module that defines it (the lazy map, the ``TYPE_CHECKING`` imports and ``__all__`` agree);
* ``docs/reference/index.md`` lists each of them, and every public module of the package is
  rendered by a ``:::`` directive of docs/reference (itself, or a package shown with its
  submodules), so each module's ``__all__`` is in the reference. The exception: the command's
  modules under ``prefect_gptimage.cli``, whose interface is the command line (docs/cli.md) and
  ``main()``, the one function the reference shows of them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import prefect_gptimage

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"


def test_the_face_is_small_and_consistent() -> None:
    names = set(prefect_gptimage.__all__)
    assert 20 <= len(names) <= 24, sorted(names)
    lazy = prefect_gptimage._EXPORTS  # our own module's map
    assert names == set(lazy) | {"__version__"}
    tree = ast.parse((ROOT / "prefect_gptimage" / "__init__.py").read_text(encoding="utf-8"))
    typed = {
        (f"prefect_gptimage.{lazy[alias.name]}", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name in lazy
    }
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("prefect_gptimage.")
        and node.module != "prefect_gptimage._lazy"
        for alias in node.names
    }
    assert imported == typed, "the TYPE_CHECKING imports and the lazy map disagree"


def test_every_name_of_the_face_loads() -> None:
    for name in prefect_gptimage.__all__:
        assert getattr(prefect_gptimage, name) is not None, name
    assert sorted(dir(prefect_gptimage)) == sorted(prefect_gptimage.__all__)


def test_reference_index_lists_every_top_level_name() -> None:
    index = (REFERENCE / "index.md").read_text(encoding="utf-8")
    table = index.split("## The top-level names", 1)[1]
    listed = set(re.findall(r"^\| ([^|]+)\|", table, re.MULTILINE))
    names = {n.strip("` ") for cell in listed for n in cell.split(",")}
    assert set(prefect_gptimage.__all__) <= names


def _directives() -> list[tuple[str, bool]]:
    """Each ``::: module`` of docs/reference, and whether it shows its submodules."""
    found = []
    for page in sorted(REFERENCE.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^::: (\S+)\n((?:    .*\n)*)", text, re.MULTILINE):
            found.append((match.group(1), "show_submodules: true" in match.group(2)))
    return found


def test_reference_renders_every_public_module() -> None:
    directives = _directives()
    package = ROOT / "prefect_gptimage"
    missing = []
    for path in sorted(package.rglob("*.py")):
        parts = ["prefect_gptimage", *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") for part in parts[1:]):
            continue  # private: documented through the public module that uses it
        if len(parts) > 2 and parts[1] == "cli":
            continue  # the command's own modules: its interface is the command line (cli.md)
        name = ".".join(parts)
        shown = any(
            name == target or (deep and name.startswith(target + "."))
            for target, deep in directives
        )
        if not shown:
            missing.append(name)
    assert missing == [], f"modules the API reference does not render: {missing}"
