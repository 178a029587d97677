"""Nothing in thinkforge reaches for another module's private names: a name that two
modules share is public (listed in its module's ``__all__``), or it is copied."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts if parts[-1] == "__init__" and parts.pop() else parts[:-1]


def private_uses(root: Path, package: str = "thinkforge") -> list[str]:
    """``path:line: name`` for every import of another module's private name or private
    module (``from thinkforge.x import _name``) and every ``alias._name`` where ``alias``
    came from ``thinkforge`` (a module, class or function imported from it)."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        here = _package_of(path, root)
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".") if node.module else []
                if node.level:  # relative: from this file's package upwards
                    parts = here[: len(here) - node.level + 1] + parts
                if not parts or parts[0] != package:
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                module = ".".join(parts)
                # A package may keep private modules for itself; nobody else imports them.
                outside = [i for i, p in enumerate(parts) if _private(p) and here[:i] != parts[:i]]
                found += [f"{where}: {module}" for _ in outside[:1]]
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{where}: {module}.{alias.name}")
                    else:
                        aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        aliases.add(alias.asname or package)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_uses(ROOT) == []


def test_the_scan_finds_each_kind_of_private_use(tmp_path: Path) -> None:
    pkg = tmp_path / "thinkforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ._impl import helper\n")
    (pkg / "sub" / "_impl.py").write_text("def helper(): ...\n_SECRET = 1\n")
    (pkg / "a.py").write_text(
        "from thinkforge.sub.mod import _Row, Public\n"
        "from thinkforge.sub import mod\n"
        "import thinkforge.sub.mod as m\n"
        "import os\n"
        "x = mod._cache, m._pad, Public._hidden, os._exit, mod.__doc__\n"
    )
    (pkg / "b.py").write_text("from .sub import _impl\nfrom .sub._impl import helper\n")
    (pkg / "sub" / "c.py").write_text("from ._impl import _SECRET, helper\n")
    found = [line.split(": ", 1)[1] for line in private_uses(tmp_path)]
    assert found == [
        "thinkforge.sub.mod._Row",
        "mod._cache",
        "m._pad",
        "Public._hidden",
        "thinkforge.sub._impl",  # b.py: another package's private module, twice
        "thinkforge.sub._impl",
        "thinkforge.sub._impl._SECRET",  # c.py: its package's own _impl, but a private name
    ]  # sub/__init__.py: a package may use its own private modules
