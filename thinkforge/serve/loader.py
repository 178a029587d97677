"""Where a served model's files come from: a local directory or a verified registry version.

``resolve`` runs where the application is built (``build_app``): it pins a registry URI
(``models:/name@alias``, ``models:/name/N`` or ``name/N``) to one version, so every replica
of a deployment serves the same version and moving an alias changes the deployment's
arguments (Serve then rolls it). ``fetch`` runs in the replica's constructor, before the
replica can report healthy: it downloads the version's ``model/`` folder into a local
cache and checks it against the version's sha256 manifest, so a damaged or tampered file
makes the replica fail to start instead of serving the wrong weights.

    ref = resolve("models:/s1-tiny@production", tracking_uri=uri)   # ModelRef, version 3
    path = fetch(ref, cache_dir="/var/cache/thinkforge", tracking_uri=uri)

The chain of trust: the version tag ``manifest_sha256`` (in the registry database) pins
``manifest.json``; the manifest pins every file (sha256 and size), and files the manifest
does not list are refused too. Layout, manifest and its check: ``thinkforge.contract``.

Errors::

    LoaderError                 any problem getting the model's files
    +-- ModelNotFoundError      no such registered model, version or alias
    +-- ModelIntegrityError     the files do not match the version's manifest
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from thinkforge.contract import MANIFEST_SHA_TAG, ModelRef, check_manifest

__all__ = [
    "LoaderError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ModelRef",
    "fetch",
    "resolve",
]


class LoaderError(Exception):
    """The model's files could not be made available."""


class ModelNotFoundError(LoaderError):
    """The registry has no such model, version or alias."""


class ModelIntegrityError(LoaderError):
    """Downloaded files differ from the registered version's manifest."""


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve(uri: str, *, tracking_uri: str | None) -> ModelRef:
    """Pin ``uri`` to one registered version (an alias is looked up now, once)."""
    from mlflow.exceptions import MlflowException

    ref = ModelRef.parse(uri)
    client = _client(tracking_uri)
    try:
        if ref.alias is not None:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, str(ref.version))
        source = client.get_model_version_download_uri(ref.name, mv.version)
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: not in the model registry ({exc.message})") from exc
    tags = dict(mv.tags or {})
    return ModelRef(ref.name, int(mv.version), ref.alias, str(source), tags.get(MANIFEST_SHA_TAG))


def fetch(ref: ModelRef, *, cache_dir: str | Path, tracking_uri: str | None) -> Path:
    """The verified local model directory for ``ref``: cached, else downloaded."""
    # Keyed by content too: "name/1" of another registry (or a re-created one) is not this.
    if ref.source is None or ref.version is None:
        raise LoaderError(f"{ref}: not pinned to a version; resolve it first")
    folder = (
        f"{ref.version}-{ref.manifest_sha256[:16]}" if ref.manifest_sha256 else f"{ref.version}"
    )
    root = Path(cache_dir) / _safe(ref.name) / folder
    if not root.is_dir():
        _download(ref, root, tracking_uri)
    # Verified every time, the cached copy too: the cache is only as trustworthy as its disk.
    problems = check_manifest(root, manifest_sha256=ref.manifest_sha256)
    if problems:
        raise ModelIntegrityError(
            f"{ref.model_uri} does not match its manifest ({'; '.join(problems[:5])}); "
            "re-register the model or repair its artifacts, then redeploy"
        )
    return root


def _download(ref: ModelRef, root: Path, tracking_uri: str | None) -> None:
    import mlflow.artifacts

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=root.parent))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=ref.source, dst_path=str(tmp), tracking_uri=tracking_uri
            )
        except Exception as exc:
            raise LoaderError(
                f"downloading {ref.model_uri} from {ref.source} failed: {exc}"
            ) from exc
        try:  # renamed into place whole: a replica never sees (or caches) half a download
            os.rename(local, root)
        except OSError:
            if not root.is_dir():  # else another replica on this node won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
