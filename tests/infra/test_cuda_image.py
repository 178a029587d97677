"""The CUDA image's Python dependencies resolve: the torch pin of infra/docker/Dockerfile's
cuda variant, the `vllm` extra and the project's own dependencies, together.

The image has never been built here (no Docker, no GPU), so pip's resolver stands in for
its `pip install '.[vllm]'` step: a dry run over the same requirements against the package
index, for this machine's platform (linux x86_64, CPython 3.11, as the image's base). It
needs the registry: without it the test skips and says so (in CI it fails instead).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def torch_pin() -> str:
    """The Dockerfile's ``ARG TORCH_VERSION=...``."""
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.MULTILINE)
    assert match, "infra/docker/Dockerfile no longer sets ARG TORCH_VERSION"
    return match.group(1)


def image_requirements() -> list[str]:
    """What the cuda variant installs: torch at the pin, then '.[vllm]'."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        f"torch=={torch_pin()}",
        *project["dependencies"],
        *project["optional-dependencies"]["vllm"],
    ]


def pip_env() -> dict[str, str]:
    """pip as a fresh image sees it: the package index alone, not this machine's local
    wheel folders or constraints (which hold the CPU build of torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        env=pip_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_torch_pin_is_the_projects() -> None:
    """Offline: the image pins the torch the project itself pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch,) = [Requirement(d) for d in project["dependencies"] if d.startswith("torch")]
    assert torch.specifier.contains(torch_pin())


def test_vllm_extra_and_the_cuda_torch_pin_resolve_together(tmp_path: Path) -> None:
    try:
        probe = pip("index", "versions", "vllm", timeout=30)
    except subprocess.TimeoutExpired:
        probe = None
    if probe is None or probe.returncode != 0:
        reason = "the package index is unreachable: the CUDA image's resolution is unchecked"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    report = tmp_path / "report.json"
    requirements = image_requirements()
    done = pip(
        "install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--quiet",
        "--report", str(report), *requirements,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{requirements} do not resolve:\n{done.stderr[-3000:]}"
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert chosen["torch"] == torch_pin()  # the pin held: no other torch was swapped in
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in chosen and req.specifier.contains(chosen[name], prereleases=True), line
