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
    base, adapters, default = lora_setup(path, {"b": other_path}, ref=ref, cache_dir=..., ...)

A LoRA adapter version holds the adapter alone; ``lora_setup`` finds the base it names
(``thinkforge/tiny``, a registry version, fetched and checked the same way, a path or a
Hugging Face id) and checks that every adapter of the deployment names the same base.

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
    "lora_setup",
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


def lora_setup(
    model_dir: str | Path,
    adapters: dict[str, str],
    *,
    ref: ModelRef | None,
    cache_dir: str | Path,
    tracking_uri: str | None,
) -> tuple[str, dict[str, str], str | None]:
    """(the base to load, adapter name -> directory, the default adapter) for a model
    directory and a deployment's extra adapters. An adapter model is the default adapter,
    named ""; a full model is the base, and its adapters must have been trained on it."""
    from thinkforge.jobs.lora import adapter_base, is_adapter

    served: dict[str, str] = {}
    default = None
    if is_adapter(model_dir):
        served[""], default = str(model_dir), ""
        base, accepted = adapter_base(model_dir), None
    else:
        base, accepted = str(model_dir), _names_of(ref)
    for name, path in adapters.items():
        if not is_adapter(path):
            raise LoaderError(f"adapters.{name}: {path} is not a LoRA adapter (no adapter config)")
        theirs = adapter_base(path)
        wanted = accepted if accepted is not None else {base}
        if wanted and theirs not in wanted:
            raise LoaderError(
                f"adapters.{name} was trained on {theirs!r}, this deployment serves "
                f"{' / '.join(sorted(wanted))}: deploy adapters of one base together"
            )
        served[name] = str(path)
    if default == "":
        base = _base_path(base, cache_dir=cache_dir, tracking_uri=tracking_uri)
    return base, served, default


def _names_of(ref: ModelRef | None) -> set[str]:
    """What an adapter trained on this full model calls its base (empty: a local model,
    anything goes)."""
    if ref is None:
        return set()
    names = {ref.model_uri, str(ref)}
    if ref.version is not None:
        names |= {f"{ref.name}/{ref.version}"}
    return names


def _base_path(base: str, *, cache_dir: str | Path, tracking_uri: str | None) -> str:
    """An adapter's base model as a directory or id ``from_pretrained`` loads."""
    from thinkforge.contract import TINY_MODEL, TINY_MOE_MODEL

    if base in (TINY_MODEL, TINY_MOE_MODEL):
        from thinkforge.jobs.tiny import ensure_tiny_model  # built from its fixed seed

        return str(ensure_tiny_model(Path(cache_dir) / "bases", name=base))
    if base.startswith("models:/"):
        pinned = resolve(base, tracking_uri=tracking_uri)
        return str(fetch(pinned, cache_dir=cache_dir, tracking_uri=tracking_uri))
    return base


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
