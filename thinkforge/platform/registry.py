"""The model registry as the control plane sees it: MLflow registered models behind a Protocol.

Training jobs register versions (``thinkforge.jobs.tracking.register_model``): the files
of a Hugging Face directory under the run's ``model/`` artifacts, a sha256
``manifest.json`` beside them, and lineage tags on the version and its run. This module
reads them back, moves aliases (never the deprecated stages) and checks a version's
files against its manifest before anyone promotes or serves it::

    registry = MlflowRegistry("http://mlflow:5000")
    name, version = registry.resolve("models:/qwen2.5-7b-sft@production")
    detail = registry.get_version(name, version)       # lineage, metrics, manifest
    if not (problems := registry.verify_version(name, 4)):
        previous = registry.set_alias(name, "production", 4)

Errors (each also a ``thinkforge.platform.errors`` class, so the API's one handler maps
them to HTTP)::

    RegistryError          503  MLflow failed or is unreachable
     ├── InvalidReference  400  a malformed model reference or alias name
     ├── ModelNotFound     404
     ├── VersionNotFound   404
     └── AliasNotFound     404

Versions are ints here (MLflow's are strings). Imports MLflow only: no torch, no Ray.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from thinkforge.contract import (
    LINEAGE_TAGS,
    MANIFEST_FILE,
    MANIFEST_SHA_TAG,
    REF_HELP,
    Manifest,
    ModelRef,
    check_files,
    is_manifest,
    sha256_file,
)
from thinkforge.platform.errors import InvalidRequest, NotFound, PlatformError

log = logging.getLogger(__name__)

__all__ = [
    "AliasNotFound",
    "InvalidReference",
    "MlflowRegistry",
    "ModelNotFound",
    "ModelRegistry",
    "ModelVersionDetail",
    "ModelVersionInfo",
    "Page",
    "RegisteredModelInfo",
    "RegistryError",
    "VersionNotFound",
    "VersionStatus",
    "parse_ref",
]


class RegistryError(PlatformError):
    status_code = 503
    type = "service_unavailable"
    code = "registry_unavailable"


class InvalidReference(InvalidRequest, RegistryError):
    code = "invalid_model_reference"


class ModelNotFound(NotFound, RegistryError):
    code = "model_not_found"


class VersionNotFound(NotFound, RegistryError):
    code = "model_version_not_found"


class AliasNotFound(NotFound, RegistryError):
    code = "model_alias_not_found"


class VersionStatus(StrEnum):
    READY = "READY"
    PENDING = "PENDING"
    FAILED = "FAILED"


_STATUS = {
    "READY": VersionStatus.READY,
    "PENDING_REGISTRATION": VersionStatus.PENDING,
    "FAILED_REGISTRATION": VersionStatus.FAILED,
}

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str | None = None


@dataclass(frozen=True)
class RegisteredModelInfo:
    name: str
    description: str
    created_at: datetime
    updated_at: datetime | None
    aliases: dict[str, int]
    tags: dict[str, str]
    latest_version: int | None = None


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    status: VersionStatus
    status_message: str
    run_id: str | None
    source: str
    created_at: datetime
    aliases: list[str]
    tags: dict[str, str]


@dataclass(frozen=True)
class ModelVersionDetail(ModelVersionInfo):
    """A version with its run's lineage tags, final metrics and params, and its manifest."""

    download_uri: str = ""
    lineage: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    manifest: Manifest | None = None  # None: the version has no manifest


def parse_ref(ref: str) -> ModelRef:
    """``models:/name@alias``, ``models:/name/3``, ``name@alias`` or ``name/3``, checked for shape."""
    try:
        return ModelRef.parse(ref)
    except ValueError:
        raise InvalidReference(
            f"{ref!r} is not a model reference: {REF_HELP}", param="model"
        ) from None


class ModelRegistry(Protocol):
    """What the control plane needs from a model registry."""

    def list_models(
        self, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[RegisteredModelInfo]: ...

    def get_model(self, name: str) -> RegisteredModelInfo: ...

    def list_versions(
        self, name: str, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[ModelVersionInfo]: ...

    def get_version(self, name: str, version: int) -> ModelVersionDetail: ...

    def set_alias(self, name: str, alias: str, version: int) -> int | None: ...

    def delete_alias(self, name: str, alias: str) -> int: ...

    def get_alias(self, name: str, alias: str) -> int | None: ...

    def resolve(self, ref: str) -> tuple[str, int]: ...

    def verify_version(
        self, name: str, version: int, *, manifest_sha256: str | None = None
    ) -> list[str]: ...

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None: ...


def all_models(registry: ModelRegistry) -> Iterator[RegisteredModelInfo]:
    """Every registered model, page after page."""
    return _walk(lambda token: registry.list_models(max_results=100, page_token=token))


def all_versions(registry: ModelRegistry, name: str) -> Iterator[ModelVersionInfo]:
    """Every version of ``name``, newest first, page after page."""
    return _walk(lambda token: registry.list_versions(name, max_results=200, page_token=token))


def _walk(fetch: Callable[[str | None], Page[T]]) -> Iterator[T]:
    token = None
    while True:
        page = fetch(token)
        yield from page.items
        token = page.next_page_token
        if token is None:
            return


def _ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=UTC)


class MlflowRegistry:
    """``ModelRegistry`` over an MLflow tracking server or a local (SQLite, file) store.

    ``scratch_dir`` is where ``verify_version`` downloads files, one at a time.
    """

    def __init__(
        self, tracking_uri: str, registry_uri: str | None = None, *, scratch_dir: str | None = None
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self._scratch = scratch_dir
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=self.registry_uri)

    @contextmanager
    def _errors(
        self, what: str, param: str = "model", missing: RegistryError | None = None
    ) -> Iterator[None]:
        """MLflow's exceptions as registry errors.

        Not-found becomes ``missing``; without one the MlflowException goes on to a
        caller that handles it.
        """
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                raise InvalidReference(f"{what}: {exc.message}", param=param) from exc
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                if missing is None:
                    raise
                raise missing from exc
            raise self._unavailable(what, exc) from exc
        except OSError as exc:
            raise self._unavailable(what, exc) from exc
        except ValueError as exc:  # e.g. a page token MLflow cannot decode
            raise InvalidReference(f"{what}: {exc}", param=param) from exc

    def _unavailable(self, what: str, exc: BaseException) -> RegistryError:
        # MLflow's message names the URI, which may hold credentials: the log keeps it.
        log.warning("%s: the MLflow registry failed: %s", what, exc)
        return RegistryError(
            f"{what}: the MLflow registry failed ({type(exc).__name__}); check that "
            "the tracking server is running and reachable, then retry"
        )

    def _raw_model(self, name: str) -> Any:
        with self._errors(f"reading model {name!r}", missing=_no_model(name)):
            return self._client.get_registered_model(name)

    def _raw_version(self, name: str, version: int) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            with self._errors(f"reading {name}/{version}", param="version"):
                return self._client.get_model_version(name, str(version))
        except MlflowException as exc:
            self._raw_model(name)  # raises ModelNotFound when the model itself is missing
            raise _no_version(name, version) from exc

    def _latest(self, name: str) -> int | None:
        with self._errors(f"listing versions of {name!r}"):
            found = self._client.search_model_versions(
                f"name = '{_quote(name)}'", max_results=1, order_by=["version_number DESC"]
            )
        return int(found[0].version) if found else None

    # -- reading --------------------------------------------------------------------------

    def list_models(
        self, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[RegisteredModelInfo]:
        with self._errors("listing registered models", param="page_token"):
            found = self._client.search_registered_models(
                max_results=max_results, order_by=["name ASC"], page_token=page_token
            )
        return Page([self._model_info(m) for m in found], found.token or None)

    def get_model(self, name: str) -> RegisteredModelInfo:
        return self._model_info(self._raw_model(name))

    def _model_info(self, model: Any) -> RegisteredModelInfo:
        latest = [int(v.version) for v in model.latest_versions or []]
        return RegisteredModelInfo(
            name=model.name,
            description=model.description or "",
            created_at=_ms(model.creation_timestamp) or datetime.fromtimestamp(0, tz=UTC),
            updated_at=_ms(model.last_updated_timestamp),
            aliases={alias: int(v) for alias, v in (model.aliases or {}).items()},
            tags=dict(model.tags or {}),
            latest_version=max(latest) if latest else None,
        )

    def list_versions(
        self, name: str, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[ModelVersionInfo]:
        """Newest first. Aliases come from the model (MLflow's search may leave them out)."""
        aliases = self.get_model(name).aliases
        with self._errors(f"listing versions of {name!r}", param="page_token"):
            found = self._client.search_model_versions(
                f"name = '{_quote(name)}'",
                max_results=max_results,
                order_by=["version_number DESC"],
                page_token=page_token,
            )
        return Page([_version_info(v, aliases) for v in found], found.token or None)

    def get_version(self, name: str, version: int) -> ModelVersionDetail:
        mv = self._raw_version(name, version)
        aliases = self.get_model(name).aliases
        info = _version_info(mv, aliases)
        run_tags, metrics, params = self._run_data(mv.run_id)
        lineage = {k: info.tags.get(k) or run_tags.get(k, "") for k in LINEAGE_TAGS}
        download_uri = self._download_uri(name, version)
        with tempfile.TemporaryDirectory(dir=self._scratch) as tmp:
            manifest, _ = self._read_manifest(self._repo(download_uri), Path(tmp))
        return ModelVersionDetail(
            **vars(info),
            download_uri=download_uri,
            lineage=lineage,
            metrics=metrics,
            params=params,
            manifest=manifest,
        )

    def _run_data(
        self, run_id: str | None
    ) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
        """The run's tags, final metrics and params; empty when the run is gone."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return {}, {}, {}
        try:
            with self._errors(f"reading run {run_id}"):
                run = self._client.get_run(run_id)
        except MlflowException:
            return {}, {}, {}
        return dict(run.data.tags), dict(run.data.metrics), dict(run.data.params)

    def _download_uri(self, name: str, version: int) -> str:
        with self._errors(f"locating {name}/{version}", missing=_no_version(name, version)):
            return str(self._client.get_model_version_download_uri(name, str(version)))

    # -- aliases --------------------------------------------------------------------------

    def get_alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at; ``latest`` is the highest version."""
        if alias.lower() == "latest":
            self._raw_model(name)
            return self._latest(name)
        return self.get_model(name).aliases.get(alias)

    def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before, if any."""
        previous = self.get_model(name).aliases.get(alias)
        self._raw_version(name, version)
        missing = _no_version(name, version)
        with self._errors(f"setting alias {alias!r} of {name!r}", "alias", missing):
            self._client.set_registered_model_alias(name, alias, str(version))
        return previous

    def delete_alias(self, name: str, alias: str) -> int:
        """Remove ``alias``; returns the version it pointed at."""
        previous = self.get_model(name).aliases.get(alias)
        if previous is None:
            raise AliasNotFound(
                f"model {name!r} has no alias {alias!r}; get the model to see its aliases",
                param="alias",
            )
        with self._errors(f"deleting alias {alias!r} of {name!r}", "alias", _no_model(name)):
            self._client.delete_registered_model_alias(name, alias)
        return previous

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._raw_version(name, version)
        with self._errors(f"tagging {name}/{version}", missing=_no_version(name, version)):
            self._client.set_model_version_tag(name, str(version), key, value)

    def resolve(self, ref: str) -> tuple[str, int]:
        """``(name, version)`` of an existing version for any accepted reference form."""
        parsed = parse_ref(ref)
        if parsed.alias is None:
            assert parsed.version is not None
            self._raw_version(parsed.name, parsed.version)
            return parsed.name, parsed.version
        version = self.get_alias(parsed.name, parsed.alias)
        if version is None:
            raise AliasNotFound(
                f"model {parsed.name!r} has no alias {parsed.alias!r}; set it first, "
                "or name a version (NAME/VERSION)",
                param="model",
            )
        return parsed.name, version

    # -- verification ---------------------------------------------------------------------

    def verify_version(
        self, name: str, version: int, *, manifest_sha256: str | None = None
    ) -> list[str]:
        """Problems that make the version unsafe to promote or serve ([] = verified).

        The version must be READY, have a manifest whose sha256 matches ``manifest_sha256``
        (the pin thinkforge's database keeps; without one, the version's tag), and every
        manifest file must be in the artifact store with the recorded size and sha256;
        stray files the manifest does not list are problems too. Files are downloaded one
        at a time and hashed, so disk use is one file.
        """
        mv = self._raw_version(name, version)
        problems = []
        if mv.status != "READY":
            problems.append(
                f"status is {mv.status}, not READY; wait for registration or register again"
            )
        repo = self._repo(self._download_uri(name, version))
        with tempfile.TemporaryDirectory(dir=self._scratch) as tmp:
            manifest, manifest_sha = self._read_manifest(repo, Path(tmp))
            if manifest is None:
                state = "missing" if manifest_sha is None else "not a valid manifest"
                return [*problems, f"{MANIFEST_FILE}: {state}; register the version again"]
            expected_sha = manifest_sha256 or (mv.tags or {}).get(MANIFEST_SHA_TAG)
            if expected_sha and expected_sha != manifest_sha:
                pin = "thinkforge's record" if manifest_sha256 else "the version's tag"
                problems.append(f"{MANIFEST_FILE}: sha256 differs from {pin}")
            stored = self._list_files(repo)
            problems += check_files(
                manifest, stored, lambda rel: self._fetch_sha256(repo, rel, Path(tmp)),
                place="the artifact store",
            )  # fmt: skip
        return problems

    def _repo(self, uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with self._errors(f"opening artifact store {uri}"):
            return get_artifact_repository(
                uri, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
            )

    def _list_files(self, repo: Any, path: str | None = None) -> dict[str, int | None]:
        """Relative path -> size of every file under the version's folder."""
        files: dict[str, int | None] = {}
        for info in self._listing(repo, path):
            if info.is_dir:
                files.update(self._list_files(repo, info.path))
            else:
                files[info.path] = info.file_size
        return files

    def _fetch_sha256(self, repo: Any, rel: str, tmp: Path) -> str | None:
        """sha256 of one stored file, downloaded and deleted again; None if it vanished."""
        from mlflow.exceptions import MlflowException

        try:
            with self._errors(f"downloading {rel}"):
                local = Path(repo.download_artifacts(rel, dst_path=str(tmp)))
        except MlflowException:
            return None
        try:
            return sha256_file(local)
        finally:
            local.unlink(missing_ok=True)

    def _read_manifest(self, repo: Any, tmp: Path) -> tuple[Manifest | None, str | None]:
        """The manifest and its sha256: (None, None) when absent, (None, sha) when unreadable."""
        from mlflow.exceptions import MlflowException

        # Listed first: some stores answer a download of a missing file with a bare HTTP error.
        if MANIFEST_FILE not in {Path(i.path).name for i in self._listing(repo)}:
            return None, None
        try:
            with self._errors(f"downloading {MANIFEST_FILE}"):
                local = Path(repo.download_artifacts(MANIFEST_FILE, dst_path=str(tmp)))
        except MlflowException:
            return None, None
        sha = sha256_file(local)
        try:
            manifest = json.loads(local.read_text())
        except ValueError:
            return None, sha
        return (manifest if is_manifest(manifest) else None), sha

    def _listing(self, repo: Any, path: str | None = None) -> list[Any]:
        """One folder's FileInfos; a folder that does not exist is empty."""
        from mlflow.exceptions import MlflowException

        try:
            with self._errors("listing the version's files"):
                return list(repo.list_artifacts(path))
        except MlflowException:
            return []


def _no_model(name: str) -> ModelNotFound:
    return ModelNotFound(
        f"no registered model {name!r}; list models to see the names", param="model"
    )


def _no_version(name: str, version: int) -> VersionNotFound:
    return VersionNotFound(
        f"model {name!r} has no version {version}; list its versions to see them",
        param="version",
    )


def _version_info(mv: Any, aliases: dict[str, int]) -> ModelVersionInfo:
    version = int(mv.version)
    return ModelVersionInfo(
        name=mv.name,
        version=version,
        status=_STATUS.get(mv.status, VersionStatus.FAILED),
        status_message=mv.status_message or "",
        run_id=mv.run_id or None,
        source=mv.source or "",
        created_at=_ms(mv.creation_timestamp) or datetime.fromtimestamp(0, tz=UTC),
        aliases=sorted(a for a, v in aliases.items() if v == version),
        tags=dict(mv.tags or {}),
    )


def _quote(value: str) -> str:
    """A value safe inside MLflow's single-quoted filter strings."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
