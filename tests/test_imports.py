"""The import rule: Ray workers and Serve replicas never need the control plane's database code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WORKER_SIDE = ["thinkforge.jobs", "thinkforge.serve"]


@pytest.mark.parametrize("package", WORKER_SIDE)
def test_worker_packages_load_no_database_code(package: str) -> None:
    code = f"""
import importlib, json, pkgutil, sys
import {package} as pkg
loaded = [pkg.__name__]
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        if "vllm" not in str(exc):  # the optional extra; everything else must import
            raise
        continue
    loaded.append(info.name)
bad = sorted(m for m in sys.modules if m == "sqlalchemy" or m.startswith(("sqlalchemy.", "thinkforge.platform")))
print(json.dumps({{"loaded": loaded, "bad": bad}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["loaded"]) > 1
    assert result["bad"] == [], f"{package} pulled in {result['bad']}"
