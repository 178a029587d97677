"""Which project a registered model belongs to, and the registry as one project sees it.

A project claims a name when it creates a job that will register under it (the job's
``suffix``, or the name derived from its base model); the claim is written in the job's
transaction. Names nobody claimed (registered straight into MLflow by an operator) are
shared by every project. A name another project claimed answers exactly like a model
that does not exist::

    claim(session, project_id="team-a", name="sums-sft")     # 409 if another project has it
    registry = ScopedRegistry(ctx.registry(), ctx.sessions, "team-b")
    registry.get_model("sums-sft")                           # ModelNotFound, as if absent

Routes use ``AppContext.registry_for(project_id)``; system parts (reconciler, tracker,
Serve's config) use the unscoped registry.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from thinkforge.platform.errors import Conflict, InvalidRequest
from thinkforge.platform.models import RegisteredModelOwner
from thinkforge.platform.registry import (
    ModelNotFound,
    ModelRegistry,
    ModelVersionDetail,
    ModelVersionInfo,
    Page,
    RegisteredModelInfo,
    parse_ref,
)

__all__ = ["ScopedRegistry", "claim", "registry_name", "require_visible"]

NAME_MAX = 256  # registered_models.name


def _owner(session: Session, name: str) -> str | None:
    return session.scalar(
        select(RegisteredModelOwner.project_id).where(RegisteredModelOwner.name == name)
    )


def require_visible(session: Session, *, project_id: str, name: str) -> None:
    """Raise the registry's own not-found error when another project owns ``name``."""
    if _owner(session, name) not in (None, project_id):
        raise _hidden(name)


def _hidden(name: str) -> ModelNotFound:
    # Word for word MlflowRegistry's answer for a missing model: a claimed name leaks nothing.
    return ModelNotFound(
        f"no registered model {name!r}; list models to see the names", param="model"
    )


def claim(
    session: Session, *, project_id: str, name: str, registry: ModelRegistry | None = None
) -> None:
    """Make ``name`` this project's (a no-op if it already is); 409 if another's, or, when
    a ``registry`` is given, if it is already there unclaimed: a shared model no project
    may take over (its versions would vanish from every other project)."""
    if len(name) > NAME_MAX or "\x00" in name:
        raise InvalidRequest(
            f"the registered model name {name[:40]!r}... is not a valid name (at most "
            f"{NAME_MAX} characters); pass a shorter suffix",
            param="suffix",
        )
    owner = _owner(session, name)
    if owner == project_id:
        return
    if owner is None and registry is not None and _registered(registry, name):
        raise Conflict(
            f"{name!r} is a shared registered model (registered outside thinkforge); pass "
            "a suffix to register this job's model under a name of your own",
            param="suffix",
            code="model_name_taken",
        )
    if owner is None:
        try:
            with session.begin_nested():
                session.add(RegisteredModelOwner(name=name, project_id=project_id))
            return
        except IntegrityError:  # a concurrent claim committed first: see whose it is
            owner = _owner(session, name)
            if owner == project_id:
                return
    raise Conflict(
        f"the registered model name {name!r} belongs to another project; pass another "
        "suffix to register this job's model under a name of your own",
        param="suffix",
        code="model_name_taken",
    )


def _registered(registry: ModelRegistry, name: str) -> bool:
    try:
        registry.get_model(name)
    except ModelNotFound:
        return False
    return True


def registry_name(model: str) -> str | None:
    """The registered model a base model refers to (``models:/NAME/3``, ``models:/NAME@a``)."""
    if not model.startswith("models:/"):
        return None
    body = model.removeprefix("models:/")
    name, at, _ = body.rpartition("@")
    if not at:
        name = body.rpartition("/")[0] or body
    return name


class ScopedRegistry:
    """A ``ModelRegistry`` for one project: another project's models look absent.

    Build one per request. A name found visible stays so for the instance's life, so
    calls made while an alias lock is held open no second transaction (on SQLite that
    would wait on the lock this request holds); routes check the name before locking.
    """

    def __init__(
        self, registry: ModelRegistry, sessions: sessionmaker[Session], project_id: str
    ) -> None:
        self.inner = registry
        self.sessions = sessions
        self.project_id = project_id
        self._visible: set[str] = set()

    def check(self, name: str) -> None:
        if name in self._visible:
            return
        with self.sessions() as session:
            require_visible(session, project_id=self.project_id, name=name)
        self._visible.add(name)

    def list_models(
        self, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[RegisteredModelInfo]:
        """One MLflow page less the names other projects own: it may come back short."""
        found = self.inner.list_models(max_results=max_results, page_token=page_token)
        names = [m.name for m in found.items]
        with self.sessions() as session:
            others = set(
                session.scalars(
                    select(RegisteredModelOwner.name).where(
                        RegisteredModelOwner.name.in_(names),
                        RegisteredModelOwner.project_id != self.project_id,
                    )
                )
            )
        return Page([m for m in found.items if m.name not in others], found.next_page_token)

    def get_model(self, name: str) -> RegisteredModelInfo:
        self.check(name)
        return self.inner.get_model(name)

    def list_versions(
        self, name: str, *, max_results: int = 100, page_token: str | None = None
    ) -> Page[ModelVersionInfo]:
        self.check(name)
        return self.inner.list_versions(name, max_results=max_results, page_token=page_token)

    def get_version(self, name: str, version: int) -> ModelVersionDetail:
        self.check(name)
        return self.inner.get_version(name, version)

    def set_alias(self, name: str, alias: str, version: int) -> int | None:
        self.check(name)
        return self.inner.set_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> int:
        self.check(name)
        return self.inner.delete_alias(name, alias)

    def get_alias(self, name: str, alias: str) -> int | None:
        self.check(name)
        return self.inner.get_alias(name, alias)

    def resolve(self, ref: str) -> tuple[str, int]:
        self.check(parse_ref(ref).name)
        return self.inner.resolve(ref)

    def verify_version(
        self, name: str, version: int, *, manifest_sha256: str | None = None
    ) -> list[str]:
        self.check(name)
        return self.inner.verify_version(name, version, manifest_sha256=manifest_sha256)

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self.check(name)
        self.inner.set_version_tag(name, version, key, value)
