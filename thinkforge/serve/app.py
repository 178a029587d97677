"""The Serve application: one OpenAI-compatible front door and one deployment per model.

Used by import path, from a Serve config file or a RayService's ``serveConfigV2``:

    applications:
      - name: thinkforge
        route_prefix: /
        import_path: thinkforge.serve.app:build_app
        args: {models: [{name: s1-tiny, model_uri: "models:/s1-tiny@production"}],
               mlflow_tracking_uri: "http://mlflow:5000"}

or from Python: ``serve.run(build_app(args), name="thinkforge", route_prefix="/")``.
``args`` is ``AppArgs`` (below). The front door (``OpenAIIngress``, see
``thinkforge.serve.ingress``) serves the OpenAI API (``thinkforge.serve.openai``); a
request's ``model`` picks the model's deployment (``ModelServer``, see
``thinkforge.serve.replica``). ``routes`` maps model names to other Serve applications
that host them (built with ``ingress.enabled: false``), so each model can be deployed
and rolled as its own application.

A registry URI is pinned to a version here, at build time: promoting an alias and
redeploying the same args changes the deployment's arguments, and Serve rolls it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from thinkforge.serve.access import AccessOptions
from thinkforge.serve.config import ModelServeConfig
from thinkforge.serve.ingress import OpenAIIngressDeployment, create_api, deployment_name
from thinkforge.serve.loader import ModelRef, resolve
from thinkforge.serve.replica import ModelServerDeployment

__all__ = [
    "AppArgs",
    "IngressOptions",
    "ServedModel",
    "build_app",
    "create_api",
    "deployment_name",
]


# ---------------------------------------------------------------- build_app arguments


class ServedModel(ModelServeConfig):
    """``ModelServeConfig`` plus what the Serve application needs: a registry source and
    replica placement. (Candidates for ``ModelServeConfig`` itself.)"""

    model_path: str = Field(default="", description="local directory; or give model_uri")
    model_uri: str | None = Field(
        default=None, description="models:/name@alias, models:/name/N or name/N"
    )
    num_cpus: float = Field(default=1, ge=0, description="CPUs per replica")
    max_surge_percent: int = Field(
        default=100, ge=0, le=100, description="extra replicas while a new version starts"
    )
    max_constructor_retry_count: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ServedModel:
        if bool(self.model_path) == bool(self.model_uri):
            raise ValueError(f"model {self.name!r}: give exactly one of model_path, model_uri")
        if self.model_uri:
            ModelRef.parse(self.model_uri)
        return self

    def serve_config(self) -> dict[str, Any]:
        """The plain ``ModelServeConfig`` the replica reads (the URI stands in for the
        path until the replica has fetched the files)."""
        data = self.model_dump(mode="json", include=set(ModelServeConfig.model_fields))
        data["model_path"] = self.model_path or self.model_uri
        return data

    def deployment_options(self) -> dict[str, Any]:
        options = super().deployment_options()
        options["name"] = deployment_name(self.name)
        options["ray_actor_options"]["num_cpus"] = self.num_cpus
        bundles = options.get("placement_group_bundles")
        if bundles and self.num_cpus > 0:  # the replica runs in the first bundle
            bundles[0] = {"CPU": self.num_cpus}
        return options | {
            "health_check_period_s": 10,
            "health_check_timeout_s": 30,
            # On a rollout an old replica drains: let its requests finish.
            "graceful_shutdown_timeout_s": self.request_timeout_s,
            "max_surge_percent": self.max_surge_percent,
            "max_constructor_retry_count": self.max_constructor_retry_count,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        }


class IngressOptions(BaseModel):
    """The front door's deployment. It only forwards: many ongoing requests, few CPUs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=1024, ge=1)
    max_queued_requests: int = Field(default=1024, ge=-1, description="-1: unbounded")
    num_cpus: float = Field(default=0.1, ge=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Rolling the door (rare: adding or deleting a deployment does not) lets streams finish.
    graceful_shutdown_timeout_s: float = Field(default=300, ge=0)


class AppArgs(BaseModel):
    """``build_app``'s ``args``."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(default_factory=list)
    routes: dict[str, str] = Field(
        default_factory=dict, description="model name -> Serve application hosting it"
    )
    mlflow_tracking_uri: str | None = None
    model_cache_dir: str | None = None
    route_prefix: str = Field(
        default="", pattern=r"^(/[A-Za-z0-9._~-]+)*$", description="API path prefix in the app"
    )
    request_timeout_s: float = Field(default=300, gt=0, description="for routed models")
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    access: AccessOptions | None = Field(
        default=None,
        description="keys, quotas and usage through the control plane (the door routes the "
        "directory's deployments); None: an open door serving models and routes",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        names = [m.name for m in self.models] + list(self.routes)
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique across models and routes")
        deployments = {deployment_name(m.name) for m in self.models}
        if len(deployments) != len(self.models):
            raise ValueError("model names must stay unique after replacing '/', ':' and '@'")
        if not self.ingress.enabled and (len(self.models) != 1 or self.routes):
            raise ValueError("without the front door, an application serves exactly one model")
        # An empty front door is valid: the control plane keeps one up (answering 404 for
        # every model) while it has no deployments, so removing the last one is one roll.
        return self


# ---------------------------------------------------------------- build_app


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application ``args`` (``AppArgs``) describe; registry URIs pinned to versions."""
    parsed = AppArgs.model_validate(args)
    handles, models = {}, []
    for served in parsed.models:
        bound, info = _bind_model(served, parsed)
        if not parsed.ingress.enabled:
            return bound
        handles[served.name] = bound
        models.append({"name": served.name, "timeout_s": served.request_timeout_s, "info": info})
    for name, app_name in parsed.routes.items():
        info = {"app_name": app_name}
        models.append(
            {"name": name, "timeout_s": parsed.request_timeout_s, "app_name": app_name}
            | {"info": info}
        )
    ingress = parsed.ingress
    return OpenAIIngressDeployment.options(
        name="openai-ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_surge_percent=100,
        graceful_shutdown_timeout_s=ingress.graceful_shutdown_timeout_s,
    ).bind(
        models,
        handles,
        parsed.route_prefix,
        parsed.access.model_dump() if parsed.access else None,
        ingress.max_body_bytes,
    )


def _bind_model(served: ServedModel, args: AppArgs) -> tuple[serve.Application, dict[str, Any]]:
    ref = None
    if served.model_uri:
        ref = resolve(served.model_uri, tracking_uri=args.mlflow_tracking_uri)
    info: dict[str, Any] = {
        "version": str(ref.version) if ref else None,
        "model_uri": ref.model_uri if ref else None,
        "alias": ref.alias if ref else None,
        "template": served.template.value,
    }
    # Registry adapters are pinned here too; a local directory is passed as it is.
    adapter_refs = {
        name: asdict(resolve(uri, tracking_uri=args.mlflow_tracking_uri))
        for name, uri in served.adapters.items()
        if not Path(uri).is_absolute()
    }
    config = served.serve_config()
    config["adapters"] = {k: v for k, v in served.adapters.items() if k not in adapter_refs}
    info["adapters"] = sorted(served.adapters)
    bound = ModelServerDeployment.options(**served.deployment_options()).bind(
        config,
        asdict(ref) if ref else None,
        args.model_cache_dir,
        args.mlflow_tracking_uri,
        adapter_refs or None,
    )
    return bound, info
