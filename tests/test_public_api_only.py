"""Other libraries are used through their public APIs only, so their upgrades cannot break us.

Read from the source (``ast``), over the package, the example flows, the deployments and the
benchmarks:

* no import of another package's private module or name (``from prefect.concurrency._sync import``,
  ``from prefect_dask import _x``);
* no private keyword switch in a call (Prefect's ``_sync=True``);
* no private attribute read or written on anything but ``self``/``cls`` or one of our own modules
  (``runner._executor``, ``fal_client._client``, ``shipped._token``);
* no override of a foreign base class's private method (``def _client(self)`` in a subclass of
  ``fal_client.SyncClient``);
* no ``PREFECT__`` switch (Prefect's private settings).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["prefect_gptimage", "flows", "deployments", "benchmarks"]
#: our own top-level modules: the package, and the scripts beside each other in these folders
OWN = {"prefect_gptimage"} | {p.stem for top in SCANNED[1:] for p in (ROOT / top).glob("*.py")}
#: documented public functions of the standard library whose names start with ``_``
STDLIB_PUBLIC = {("os", "_exit"), ("sys", "_getframe")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


class _Finder(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[tuple[int, str]] = []
        self.own_names: set[str] = {"self", "cls", "mcs"}  # names bound to our own modules/objects
        self.foreign: dict[str, str] = {}  # names imported from other packages -> "module:attr"

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            top = alias.name.split(".")[0]
            if top not in OWN and any(_is_private(part) for part in alias.name.split(".")):
                self._flag(node, f"import {alias.name}")
            bound = alias.asname or top
            if top in OWN:
                self.own_names.add(bound)
            else:
                self.foreign[bound] = alias.name if alias.asname else top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        own = node.level > 0 or module.split(".")[0] in OWN
        for alias in node.names:
            bound = alias.asname or alias.name
            if own:
                self.own_names.add(bound)
                continue
            self.foreign[bound] = f"{module}:{alias.name}"
            if any(_is_private(part) for part in module.split(".")) or _is_private(alias.name):
                self._flag(node, f"from {module} import {alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        for keyword in node.keywords:
            if keyword.arg is not None and _is_private(keyword.arg):
                self._flag(node, f"private keyword {keyword.arg}=")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_private(node.attr):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else None
            if name not in self.own_names and (name, node.attr) not in STDLIB_PUBLIC:
                self._flag(node, f"private attribute .{node.attr}")
        self.generic_visit(node)

    def _foreign_class(self, base: ast.expr) -> type | None:
        """The foreign class ``base`` names, imported (None: ours, or not a class)."""
        if isinstance(base, ast.Name) and base.id in self.foreign:
            module, _, attr = self.foreign[base.id].partition(":")
            path = [attr] if attr else []
        elif (
            isinstance(base, ast.Attribute)
            and isinstance(base.value, ast.Name)
            and base.value.id in self.foreign
        ):
            module, path = self.foreign[base.value.id].partition(":")[0], [base.attr]
        else:
            return None
        try:
            found: object = importlib.import_module(module)
            for part in path:
                found = getattr(found, part)
        except (ImportError, AttributeError):  # an optional extra not installed: nothing to check
            return None
        return found if isinstance(found, type) else None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [cls for cls in map(self._foreign_class, node.bases) if cls is not None]
        for item in node.body:
            if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for cls in bases:  # a private name we define is ours; one the base has is an override
                if _is_private(item.name) and hasattr(cls, item.name):
                    self._flag(item, f"{node.name}({cls.__qualname__}) overrides {item.name}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and "PREFECT__" in node.value:
            self._flag(node, "a PREFECT__ switch")


def _private_uses(path: Path) -> list[str]:
    finder = _Finder()
    finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    rel = path.relative_to(ROOT)
    return [f"{rel}:{line}: {what}" for line, what in finder.found]


def test_the_finder_catches_each_kind_of_private_use(tmp_path: Path) -> None:
    """The check can fail: each form the issue listed is found in a sample."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from prefect.concurrency._sync import acquire\n"
        "import fal_client\n"
        "from threading import Thread\n"
        "class R(Thread):\n"
        "    def _mine(self): return 1\n"
        "    def _bootstrap(self): pass\n"
        "def f(runner, state, store):\n"
        "    runner._executor = None\n"
        "    fal_client._client\n"
        "    state.result(_sync=True)\n"
        "    return {'PREFECT__SERVER_EPHEMERAL': '1'}\n",
        encoding="utf-8",
    )
    finder = _Finder()
    finder.visit(ast.parse(sample.read_text(encoding="utf-8")))
    kinds = " | ".join(what for _, what in finder.found)
    assert "_mine" not in kinds  # a private method of our own is ours
    for expected in (
        "from prefect.concurrency._sync",
        "overrides _bootstrap",
        "._executor",
        "._client",
        "_sync=",
        "PREFECT__",
    ):
        assert expected in kinds, kinds


def test_no_private_use_of_other_libraries() -> None:
    found = [use for path in _sources() for use in _private_uses(path)]
    assert not found, "private uses of other libraries:\n" + "\n".join(found)
