"""The layer table of docs/architecture.md ("## Layout") holds for every module of the package.

The table lists the layers bottom up, each row naming its modules (``errors.py``, ``fal/``, ...,
relative to ``prefect_gptimage/``). With :mod:`ast`, over the source of every module:

* every module is in exactly one row, and every entry of the table names a module;
* a module imports (at the top, inside a function, under ``TYPE_CHECKING``, or by name through
  ``lazy_exports`` / ``importlib.import_module`` / ``sys.modules``) only modules of its own row or
  of the rows below;
* importing the modules of a row whose "imports Prefect" cell says ``no`` imports no Prefect
  module (the cell may name the exceptions: ``no, except `settings.py```).

The checker is a plain function of the table and the sources, so the samples below show that it
fails when a layer is broken.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prefect_gptimage"
PACKAGE_DIR = ROOT / PACKAGE


@dataclass(frozen=True)
class Layer:
    """One row of the table: its entries (``errors.py``, ``fal/``, ``__init__.py``) and the
    entries its "imports Prefect" cell allows to import Prefect (``None``: the row may)."""

    name: str
    entries: tuple[str, ...]
    prefect_allowed: tuple[str, ...] | None


@dataclass(frozen=True)
class Module:
    """A module of the package: dotted name, path relative to the package folder, source."""

    name: str
    path: str
    source: str

    @property
    def is_package(self) -> bool:
        return self.path.endswith("__init__.py")


# -- reading the table and the package ----------------------------------------------------------


def parse_layout(readme: str) -> list[Layer]:
    """The layers of the first table in the "## Layout" section, bottom up."""
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert match, 'docs/architecture.md has no "## Layout" section'
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the Layout section has no table"
    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    modules_col = next(i for i, cell in enumerate(header) if cell.startswith("modules"))
    prefect_col = next(i for i, cell in enumerate(header) if "prefect" in cell)
    layers = []
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        entries = tuple(re.findall(r"`([^`]+)`", cells[modules_col]))
        prefect = cells[prefect_col]
        allowed = tuple(re.findall(r"`([^`]+)`", prefect)) if prefect.startswith("no") else None
        layers.append(Layer(cells[0], entries, allowed))
    return layers


def package_modules(folder: Path = PACKAGE_DIR, package: str = PACKAGE) -> list[Module]:
    """Every module of the package under ``folder``."""
    modules = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).as_posix()
        parts = [package, *rel[: -len(".py")].split("/")]
        if parts[-1] == "__init__":
            parts.pop()
        modules.append(Module(".".join(parts), rel, path.read_text(encoding="utf-8")))
    return modules


def entry_covers(entry: str, path: str) -> bool:
    """Whether a table entry (``fal/``, ``errors.py``, ``quality/gate.py``) names ``path``."""
    return path.startswith(entry) if entry.endswith("/") else path == entry


# -- what a module imports ----------------------------------------------------------------------


def _strings(node: ast.AST) -> list[str]:
    found = (n.value for n in ast.walk(node) if isinstance(n, ast.Constant))
    return [value for value in found if isinstance(value, str)]


def imported_names(module: Module, package: str = PACKAGE) -> tuple[set[str], set[str]]:
    """The modules of ``package`` the module imports, wherever the import stands, or loads by
    name (``lazy_exports`` maps, ``importlib.import_module``, ``sys.modules.get``); and the names
    that are modules only perhaps (``y`` of ``from x import y`` may be an attribute of ``x``)."""
    tree = ast.parse(module.source)
    here = module.name if module.is_package else module.name.rpartition(".")[0]
    names: set[str] = set()
    perhaps: set[str] = set()
    dicts: dict[str, ast.AST] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            dicts.update({t.id: node.value for t in targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            names.add(origin)
            perhaps.update(f"{origin}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            on_modules = isinstance(func, ast.Attribute) and (
                getattr(func.value, "attr", "") == "modules"  # sys.modules.get(...)
            )
            if node.args and (called == "import_module" or (called == "get" and on_modules)):
                names.update(s for s in _strings(node.args[0]) if s.startswith(package))
            elif called == "lazy_exports" and len(node.args) == 2:
                mapping = node.args[1]
                if isinstance(mapping, ast.Name):
                    mapping = dicts.get(mapping.id, mapping)
                if isinstance(mapping, ast.Dict):  # name -> submodule (relative)
                    values = [v for value in mapping.values for v in _strings(value)]
                    names.update(f"{module.name}.{v}" for v in values)
    ours = {n for n in names | perhaps if n == package or n.startswith(package + ".")}
    return ours & names, ours - names


# -- the check ----------------------------------------------------------------------------------


def layer_violations(layers: list[Layer], modules: list[Module]) -> list[str]:
    """Every way the modules break the table (an empty list: the table is true)."""
    problems: list[str] = []
    level: dict[str, int] = {}
    for module in modules:
        rows = [
            i
            for i, layer in enumerate(layers)
            if any(entry_covers(e, module.path) for e in layer.entries)
        ]
        if not rows:
            problems.append(f"{module.path} is in no layer of the table")
        elif len(set(rows)) > 1:
            problems.append(f"{module.path} is in more than one layer: {sorted(set(rows))}")
        else:
            level[module.name] = rows[0]
    for layer in layers:
        for entry in layer.entries:
            if not any(entry_covers(entry, m.path) for m in modules):
                problems.append(f"the table names {entry!r} (layer {layer.name}), no such module")
    known = {m.name for m in modules}
    for module in modules:
        if module.name not in level:
            continue
        names, perhaps = imported_names(module)
        for target in sorted(names | (perhaps & known)):
            if target not in known:
                problems.append(f"{module.path} imports {target}, not a module of the package")
            elif target in level and level[target] > level[module.name]:
                above = layers[level[target]].name
                problems.append(
                    f"{module.path} (layer {layers[level[module.name]].name}) imports {target} "
                    f"(layer {above}, above it)"
                )
    return problems


# -- the package as it is -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return parse_layout((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))


def test_readme_layer_table_holds_for_every_module(layers: list[Layer]) -> None:
    assert len(layers) >= 8, layers
    assert layer_violations(layers, package_modules()) == []


def test_rows_that_say_no_prefect_import_no_prefect(layers: list[Layer]) -> None:
    """Imported in a fresh interpreter, the modules of each "no" row load no Prefect module (and
    ``import prefect_gptimage`` loads neither Prefect nor ``fal_client``)."""
    modules = package_modules()
    checked = 0
    for layer in layers:
        if layer.prefect_allowed is None:
            continue
        names = [
            m.name
            for m in modules
            if any(entry_covers(e, m.path) for e in layer.entries)
            and not any(entry_covers(e, m.path) for e in layer.prefect_allowed)
        ]
        code = (
            "import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(','.join(sorted(m for m in sys.modules if m == 'prefect' "
            "or m.startswith(('prefect.', 'prefect_aws', 'prefect_redis', 'prefect_dask')))))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        )
        assert out.stdout.strip() == "", f"layer {layer.name} imported {out.stdout.strip()}"
        checked += 1
    assert checked >= 3


def test_importing_the_package_imports_no_fal_client() -> None:
    code = "import sys, prefect_gptimage\nprint('fal_client' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "False"


# -- the checker fails when it should -----------------------------------------------------------

SAMPLE_README = """\
# sample

## Layout

| layer | modules | holds | imports Prefect |
|---|---|---|---|
| core | `errors.py`, `_lazy.py` | exceptions | no |
| fal | `fal/` | the client | no, except `fal/hook.py` |
| flows | `flows/`, `__init__.py` | flows | yes |

## Next
"""


def sample(files: dict[str, str]) -> list[Module]:
    return [
        Module(
            ".".join([PACKAGE, *path[:-3].split("/")]).removesuffix(".__init__"),
            path,
            source,
        )
        for path, source in files.items()
    ]


GOOD = {
    "__init__.py": "from prefect_gptimage._lazy import lazy_exports\n",
    "_lazy.py": "",
    "errors.py": "class E(Exception): ...\n",
    "fal/__init__.py": "from .client import Client\n",
    "fal/client.py": "from prefect_gptimage.errors import E\n",
    "fal/hook.py": "import prefect\n",
    "flows/__init__.py": "from prefect_gptimage.fal import client\n",
}


def test_sample_table_parses() -> None:
    layers = parse_layout(SAMPLE_README)
    assert [layer.name for layer in layers] == ["core", "fal", "flows"]
    assert layers[1].entries == ("fal/",)
    assert layers[1].prefect_allowed == ("fal/hook.py",)
    assert layers[2].prefect_allowed is None
    assert layer_violations(layers, sample(GOOD)) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        # a top-level import of a layer above
        ("errors.py", "from prefect_gptimage.fal.client import Client\n", "errors.py (layer core)"),
        # inside a function, relative
        ("fal/client.py", "def f():\n    from ..flows import x\n", "fal/client.py (layer fal)"),
        # under TYPE_CHECKING
        (
            "errors.py",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    import prefect_gptimage.flows\n",
            "imports prefect_gptimage.flows",
        ),
        # by name: importlib, sys.modules
        (
            "fal/client.py",
            "def g():\n    import importlib\n"
            "    importlib.import_module('prefect_gptimage.flows')\n",
            "fal/client.py (layer fal) imports prefect_gptimage.flows",
        ),
        (
            "errors.py",
            "import sys\nflows = sys.modules.get('prefect_gptimage.flows')\n",
            "errors.py (layer core) imports prefect_gptimage.flows",
        ),
        # a module the table does not list
        ("reporting.py", "", "reporting.py is in no layer"),
        # an import of something that is not there
        ("fal/client.py", "from prefect_gptimage.nothing import x\n", "not a module"),
    ],
)
def test_broken_samples_fail(path: str, source: str, expected: str) -> None:
    layers = parse_layout(SAMPLE_README)
    problems = layer_violations(layers, sample({**GOOD, path: source}))
    assert any(expected in p for p in problems), problems


def test_a_lazy_map_pointing_up_fails() -> None:
    """A name loaded on first use is an import too: the package's face in the core row may not
    map a name to the flows."""
    table = SAMPLE_README.replace("`_lazy.py` |", "`_lazy.py`, `__init__.py` |").replace(
        "`flows/`, `__init__.py`", "`flows/`"
    )
    face = (
        "from prefect_gptimage._lazy import lazy_exports\n"
        "_EXPORTS: dict[str, str] = {'E': 'errors', 'run': 'flows'}\n"
        "__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)\n"
    )
    problems = layer_violations(parse_layout(table), sample({**GOOD, "__init__.py": face}))
    assert problems == [
        "__init__.py (layer core) imports prefect_gptimage.flows (layer flows, above it)"
    ]


def test_a_stale_entry_fails() -> None:
    layers = parse_layout(SAMPLE_README.replace("`_lazy.py`", "`_lazy.py`, `gone.py`"))
    assert layer_violations(layers, sample(GOOD)) == [
        "the table names 'gone.py' (layer core), no such module"
    ]
