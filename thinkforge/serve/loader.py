"""Where a served model's files come from: a local directory or a verified registry version.

``resolve`` runs where the application is built (``build_app``): it pins a registry URI
(``models:/name@alias``, ``models:/name/N`` or ``name/N``) to one version, so every replica
of a deployment serves the same version and moving an alias changes the deployment's
arguments (Serve then rolls it). ``fetch`` runs in the replica's constructor, before the
replica can report healthy: it downloads the version's ``model/`` folder into a local
cache and checks it against the version's sha256 manifest, so a damaged or tampered file
makes the replica fail to start instead of serving the wrong weights.

    ref = resolve("models:/s1-tiny@production", tracking_uri=uri)   # ModelRef, version "3"
    path = fetch(ref, cache_dir="/var/cache/thinkforge", tracking_uri=uri)

The chain of trust: the version tag ``manifest_sha256`` (in the registry database) pins
``manifest.json``; the manifest pins every file (sha256 and size), and files the manifest
does not list are refused too. Layout and manifest format: ``thinkforge.jobs.tracking``.

Errors::

    LoaderError                 any problem getting the model's files
    +-- ModelNotFoundError      no such registered model, version or alias
    +-- ModelIntegrityError     the files do not match the version's manifest
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkforge.jobs.tracking import MANIFEST_FILE

__all__ = [
    "LoaderError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ModelRef",
    "fetch",
    "parse_model_uri",
    "resolve",
    "verify_files",
]

_URI = re.compile(r"^(?:models:/)?(?P<name>[^@/][^@]*?)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


class LoaderError(Exception):
    """The model's files could not be made available."""


class ModelNotFoundError(LoaderError):
    """The registry has no such model, version or alias."""


class ModelIntegrityError(LoaderError):
    """Downloaded files differ from the registered version's manifest."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One registered model version, pinned."""

    name: str
    version: str
    source: str  # artifact URI of the version's model folder
    manifest_sha256: str | None = None
    alias: str | None = None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@prod`` -> (name, None, "prod")."""
    match = _URI.match(uri.strip())
    if not match:
        raise ValueError(
            f"{uri!r} is not a model URI: use models:/name/VERSION, models:/name@ALIAS "
            "or name/VERSION"
        )
    return match["name"], match["version"], match["alias"]


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve(uri: str, *, tracking_uri: str | None) -> ModelRef:
    """Pin ``uri`` to one registered version (an alias is looked up now, once)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    client = _client(tracking_uri)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, version)
        source = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: not in the model registry ({exc.message})") from exc
    tags = dict(mv.tags or {})
    return ModelRef(name, str(mv.version), str(source), tags.get("manifest_sha256"), alias)


def fetch(ref: ModelRef, *, cache_dir: str | Path, tracking_uri: str | None) -> Path:
    """The verified local model directory for ``ref``: cached, else downloaded."""
    # Keyed by content too: "name/1" of another registry (or a re-created one) is not this.
    folder = f"{ref.version}-{ref.manifest_sha256[:16]}" if ref.manifest_sha256 else ref.version
    root = Path(cache_dir) / _safe(ref.name) / folder
    if not root.is_dir():
        _download(ref, root, tracking_uri)
    # Verified every time, the cached copy too: the cache is only as trustworthy as its disk.
    problems = verify_files(root, manifest_sha256=ref.manifest_sha256)
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


def verify_files(directory: str | Path, *, manifest_sha256: str | None = None) -> list[str]:
    """Problems found checking a model directory against its manifest ([] means ok)."""
    root = Path(directory)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{MANIFEST_FILE}: missing"]
    if manifest_sha256 is not None and _sha256(manifest_path) != manifest_sha256:
        return [f"{MANIFEST_FILE}: differs from the version's manifest_sha256 tag"]
    manifest: dict[str, dict[str, Any]] = json.loads(manifest_path.read_text())
    problems = []
    for rel, entry in sorted(manifest.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: content differs from the manifest")
    listed = {*manifest, MANIFEST_FILE}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
