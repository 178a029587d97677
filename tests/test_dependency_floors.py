"""No dependency floor in pyproject.toml admits a version with a known vulnerability.

The table is short on purpose: the parts that parse untrusted HTTP input. A new advisory
adds a row; raising a floor in pyproject.toml makes the row pass.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package, first fixed version, why
KNOWN_BAD = [
    ("python-multipart", "0.0.18", "CVE-2024-53981: CPU DoS through CR/LF before the boundary"),
    ("python-multipart", "0.0.22", "CVE-2026-24486: path traversal with UPLOAD_KEEP_FILENAME"),
    ("python-multipart", "0.0.26", "CVE-2026-40347: DoS through a large preamble or epilogue"),
    ("python-multipart", "0.0.27", "CVE-2026-42561: DoS in part header parsing"),
    ("python-multipart", "0.0.30", "CVE-2026-53538: ';' as a form field separator"),
    ("starlette", "0.40.0", "CVE-2024-47874: multipart fields without a filename held in memory"),
    ("starlette", "0.47.2", "CVE-2025-54121: large upload rollover blocks the event loop"),
    ("starlette", "0.49.1", "CVE-2025-62727: Range header ReDoS in FileResponse"),
    ("starlette", "1.0.1", "CVE-2026-48710: a malformed Host header poisons request.url.path"),
    ("fastapi", "0.115.3", "the first FastAPI that needs starlette>=0.40 (CVE-2024-47874)"),
]


def _floors() -> dict[str, Version | None]:
    """Each runtime dependency's lowest admitted version (None: no lower bound)."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors: dict[str, Version | None] = {}
    for line in deps:
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
        floors[req.name.lower()] = max(lows) if lows else None
    return floors


@pytest.mark.parametrize(
    ("package", "fixed", "why"), KNOWN_BAD, ids=[f"{r[0]}-{r[1]}" for r in KNOWN_BAD]
)
def test_floor_is_past_known_bad_versions(package: str, fixed: str, why: str) -> None:
    floors = _floors()
    # starlette must be named: FastAPI does not cap it from below at a fixed release
    assert package in floors, f"{package} is not a declared dependency ({why})"
    floor = floors[package]
    assert floor is not None and floor >= Version(fixed), (
        f"{package} floor {floor} admits a vulnerable version: need >={fixed} ({why})"
    )


def test_installed_versions_meet_the_floors() -> None:
    """The environment the tests run in is itself past every floor."""
    from importlib.metadata import version

    for package, fixed, why in KNOWN_BAD:
        assert Version(version(package)) >= Version(fixed), f"installed {package}: {why}"
