"""MLflow holds copies; thinkforge's database holds the trust anchors.

Anyone who can reach the MLflow server can move an alias or delete a version's
``manifest_sha256`` tag, past the admin check, the audit log and the integrity check. So
the database keeps its own anchors: each alias's intended version (``ModelAlias.version``,
written by every move through the API) and each version's manifest sha256, pinned the
first time the version is seen (``ModelVersion.manifest_sha256``). Promotions and
deployments check files against the pin, deployments follow the database's aliases, and
a reconciler pass (``guard_registry``) finds changes made straight in MLflow, records each
as an ``external_change`` audit entry once, and puts MLflow back.

    sha = pinned_sha(sessions, registry, "sums", 3)   # pins now if never seen
    guard_registry(sessions, registry)                # one pass; the reconciler repeats it
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.models import (
    DEFAULT_PROJECT,
    AuditEntry,
    ModelAlias,
    ModelVersion,
    RegisteredModelOwner,
    new_id,
)
from thinkforge.platform.registry import MANIFEST_SHA_TAG, ModelRegistry, all_versions
from thinkforge.platform.tracker import mirror_version

log = logging.getLogger(__name__)
ACTOR = "mlflow"  # who an external change is recorded as: it did not come through the API


def pinned_sha(
    sessions: sessionmaker[Session], registry: ModelRegistry, name: str, version: int
) -> str | None:
    """The manifest sha256 the database pinned for ``name/version``; a version never seen
    before is mirrored (and so pinned) now. None: the version had no tag when first seen."""
    with sessions.begin() as session:
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
        )
        if row is None or row.manifest_sha256 is None:
            row = mirror_version(session, registry, name, version)
        return row.manifest_sha256


def stored_pin(session: Session, name: str, version: int) -> str | None:
    """The pin in the database, read only (None when the version was never seen)."""
    return session.scalar(
        select(ModelVersion.manifest_sha256).where(
            ModelVersion.name == name, ModelVersion.version == version
        )
    )


def intended_alias(session: Session, name: str, alias: str) -> tuple[bool, int | None]:
    """(known, version): where thinkforge put ``name@alias``; known is False for an alias
    no move through the API ever touched."""
    row = session.scalar(
        select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias)
    )
    return (row is not None, row.version if row is not None else None)


def lock_alias(session: Session, name: str, alias: str) -> ModelAlias:
    """Take the alias's row lock (creating the row the first time); held until commit."""
    stmt = select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias)
    row = session.scalar(stmt.with_for_update())
    if row is not None:
        return row
    try:
        with session.begin_nested():
            session.add(ModelAlias(name=name, alias=alias))
    except IntegrityError:
        pass  # another request created it first; its lock is what we wait on below
    row = session.scalar(stmt.with_for_update())
    assert row is not None
    return row


def guard_registry(sessions: sessionmaker[Session], registry: ModelRegistry) -> None:
    """Find aliases and manifest tags changed straight in MLflow; audit and undo each."""
    with sessions() as session:
        aliases = session.execute(select(ModelAlias.name, ModelAlias.alias)).all()
        pins = session.execute(
            select(ModelVersion.name, ModelVersion.version, ModelVersion.manifest_sha256).where(
                ModelVersion.manifest_sha256.is_not(None)
            )
        ).all()
    by_model: dict[str, list[str]] = defaultdict(list)
    for name, alias in aliases:
        by_model[name].append(alias)
    for name, names in sorted(by_model.items()):
        try:
            _guard_aliases(sessions, registry, name, names)
        except Exception:  # one unreadable model must not stop the others
            log.exception("checking the aliases of %s failed; retried on a later pass", name)
    pinned: dict[str, dict[int, str]] = defaultdict(dict)
    for model, version, sha in pins:
        if sha:
            pinned[model][version] = sha
    for name, versions in sorted(pinned.items()):
        try:
            _guard_tags(sessions, registry, name, versions)
        except Exception:
            log.exception("checking the manifest tags of %s failed; retried later", name)


def _guard_aliases(
    sessions: sessionmaker[Session], registry: ModelRegistry, name: str, aliases: list[str]
) -> None:
    for alias in aliases:
        with sessions.begin() as session:
            row = lock_alias(session, name, alias)  # no API move runs meanwhile
            actual = registry.get_model(name).aliases.get(alias)
            if actual == row.version:
                continue
            if row.version is None:
                registry.delete_alias(name, alias)
            else:
                registry.set_alias(name, alias, row.version)
            _record(
                session, name, f"{name}@{alias}", row.version, actual,
                f"alias moved outside thinkforge; put back to {row.version}",
            )  # fmt: skip


def _guard_tags(
    sessions: sessionmaker[Session], registry: ModelRegistry, name: str, pins: dict[int, str]
) -> None:
    for info in all_versions(registry, name):
        pin = pins.get(info.version)
        tag = info.tags.get(MANIFEST_SHA_TAG)
        if pin is None or tag == pin:
            continue
        registry.set_version_tag(name, info.version, MANIFEST_SHA_TAG, pin)
        with sessions.begin() as session:
            _record(
                session, name, f"{name}/{info.version}", pin, tag,
                f"{MANIFEST_SHA_TAG} tag changed outside thinkforge; put back",
            )  # fmt: skip


def _record(
    session: Session,
    name: str,
    target: str,
    intended: int | str | None,
    found: int | str | None,
    reason: str,
) -> None:
    """An ``external_change`` entry, in the audit log of the project that owns ``name``
    (unclaimed names are the operator's: the default project)."""
    owner = session.scalar(
        select(RegisteredModelOwner.project_id).where(RegisteredModelOwner.name == name)
    )
    log.warning(
        "external change to %s: %s (%s found, %s intended)", target, reason, found, intended
    )
    session.add(
        AuditEntry(
            id=new_id("audit"),
            project_id=owner or DEFAULT_PROJECT,
            actor=ACTOR,
            action="external_change",
            target=target,
            from_value=None if intended is None else str(intended),
            to_value=None if found is None else str(found),
            reason=reason,
        )
    )
