"""The deployment files: compose, the Dockerfile, KubeRay manifests and the Helm chart.

Offline checks, in order of strength:
- KubeRay custom resources (infra/kuberay/) against the CRDs' openAPIV3Schema, read from
  ../shared/schemas/kuberay/ (beside the repo clone in CI), with unknown fields rejected
  the way `kubectl apply --validate=strict` would; their pod templates also against the
  Kubernetes schemas that kubernetes-validate ships.
- The Helm chart: values.yaml against values.schema.json, every `.Values` path and
  `include` in the templates resolvable, each template's kinds. Rendering needs `helm`:
  when it is on PATH, `helm lint` and `helm template` run and every rendered object is
  validated as above; otherwise those tests skip and the rendered output is NOT validated.
- compose.yaml: every THINKFORGE_* variable is a Settings field and the control plane's
  environment builds a production Settings; only ports 8000 and 8100 are published.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from thinkforge.platform.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY_DIR = INFRA / "kuberay"
CHART = ROOT / "helm" / "thinkforge"
TEMPLATES = CHART / "templates"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CRD_DIR = ROOT.parent / "shared" / "schemas" / "kuberay"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest that
# kubernetes-validate has schemas for.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
API_PORT, SERVE_PORT = 8000, 8100
SETTINGS_ENV = {f"THINKFORGE_{name.upper()}" for name in Settings.model_fields}
THINKFORGE_VAR = re.compile(r"\bTHINKFORGE_[A-Z0-9_]+\b")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kuberay_manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERAY_DIR.glob("*.yaml")) for doc in load_all(path)]


# --------------------------------------------------------------------- schema helpers


def crd_schema(kind: str) -> dict[str, Any]:
    """The ray.io/v1 openAPIV3Schema of a KubeRay kind, made strict; skips when absent."""
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {path} (CI copies shared/ beside the repo)")
    return _crd_schema(path)


@functools.cache
def _crd_schema(path: Path) -> dict[str, Any]:
    # The CRDs are megabytes of YAML: libyaml parses them ten times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = strict(v1["schema"]["openAPIV3Schema"])
    return schema


def strict(schema: Any) -> Any:
    """Reject unknown fields: the API server prunes them silently, which hides typos."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
        if out.get("x-kubernetes-embedded-resource"):
            for key in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(key, {})
    return out


def validate_crd(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    schema = crd_schema(doc["kind"])
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def validate_k8s(doc: dict[str, Any], k8s_version: str) -> None:
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        name = doc.get("metadata", {}).get("name")
        pytest.fail(f"{doc['kind']}/{name} at {list(e.path)}: {e.message}")


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    if doc["kind"] == "RayService":
        return [doc["spec"]["rayClusterConfig"]]
    return []


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


# --------------------------------------------------------------------- KubeRay manifests


def test_kuberay_manifests_are_the_three_kinds() -> None:
    kinds = sorted(doc["kind"] for doc in kuberay_manifests())
    assert kinds == ["RayCluster", "RayJob", "RayService"]


@pytest.mark.parametrize("path", sorted(KUBERAY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(path: Path) -> None:
    for doc in load_all(path):
        validate_crd(doc)


def test_strict_crd_validation_catches_a_typo() -> None:
    doc = copy.deepcopy(load_all(KUBERAY_DIR / "raycluster.yaml")[0])
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate_crd(doc)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_kuberay_pod_templates_are_valid_kubernetes(k8s_version: str) -> None:
    for doc in kuberay_manifests():
        for spec in ray_cluster_specs(doc):
            for group, template in pod_templates(spec):
                validate_k8s(
                    as_pod_template(f"{doc['metadata']['name']}-{group}", template), k8s_version
                )


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    """What the schema cannot say: token auth, replica bounds, GPUs, the Ray version."""
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"]
    ray_req = next(
        Requirement(dep)
        for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if Requirement(dep).name == "ray"
    )
    assert ray_req.specifier.contains(spec["rayVersion"]), (spec["rayVersion"], str(ray_req))
    head = spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group
    for _, template in pod_templates(spec):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], container["name"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            # Extended resources: a request, if given, must equal the limit.
            assert resources["requests"].get("nvidia.com/gpu", gpus) == gpus
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0].get("ports", [])}
    assert ports.get("dashboard", 8265) == 8265 and ports.get("gcs-server", 6379) == 6379


def test_kuberay_cluster_specs_are_consistent() -> None:
    for doc in kuberay_manifests():
        for spec in ray_cluster_specs(doc):
            check_ray_cluster_spec(spec)


def test_raycluster_autoscales_cpu_and_gpu_groups() -> None:
    (doc,) = load_all(KUBERAY_DIR / "raycluster.yaml")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) > 0
    assert groups["gpu"]["minReplicas"] < groups["gpu"]["maxReplicas"]
    assert "nvidia.com/gpu" not in str(groups["cpu"])


def test_rayjob_runs_the_s1k_recipe_on_enough_gpus() -> None:
    from thinkforge.jobs.__main__ import parse_args
    from thinkforge.jobs.config import SFTConfig

    (doc,) = load_all(KUBERAY_DIR / "rayjob-s1k.yaml")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    cluster = doc["spec"]["rayClusterSpec"]
    # <resolve recipe + overrides to JSON> > FILE && python -m thinkforge.jobs ARGS
    words = shlex.split(doc["spec"]["entrypoint"])
    resolve, job = words[: words.index("&&")], words[words.index("&&") + 1 :]
    recipe_arg = resolve[resolve.index("-c") + 2]
    overrides = resolve[resolve.index("-c") + 3 : resolve.index(">")]
    assert recipe_arg.startswith("/app/recipes/"), "the image keeps the recipes in /app/recipes"
    recipe = ROOT / recipe_arg.removeprefix("/app/")
    assert recipe.is_file(), f"{recipe.relative_to(ROOT)} is referenced by the RayJob but missing"
    config = SFTConfig.from_yaml(recipe, overrides=overrides)
    assert job[:3] == ["python", "-m", "thinkforge.jobs"]
    args = parse_args(job[3:])
    assert args.config == resolve[resolve.index(">") + 1]
    assert args.mlflow_uri and args.mlflow_uri.startswith("http")
    (shared,) = {
        mount["mountPath"]
        for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]
        for mount in container["volumeMounts"]
        if mount["name"] == "shared"
    }
    for path in (config.dataset, args.storage_path, args.data_dir):
        assert path.startswith("s3://") or Path(path).is_relative_to(shared), path

    def total(resource: str) -> int:
        return sum(
            group["maxReplicas"]
            * int(
                group["template"]["spec"]["containers"][0]["resources"]["limits"].get(resource, 0)
            )
            for group in cluster["workerGroupSpecs"]
        )

    res = config.resources
    assert res.num_workers * res.gpus_per_worker <= total("nvidia.com/gpu")
    assert res.num_workers * res.cpus_per_worker <= total("cpu")


def test_rayservice_serves_build_app_with_autoscaling() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from thinkforge.serve.config import ModelServeConfig

    (doc,) = load_all(KUBERAY_DIR / "rayservice.yaml")
    assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert config.http_options.port == Settings.model_fields["serve_port"].default == SERVE_PORT
    (app,) = config.applications
    assert app.import_path == "thinkforge.serve.app:build_app"
    from thinkforge.serve.app import AppArgs, deployment_name

    AppArgs.model_validate(app.args)  # exactly what build_app accepts
    model_names = {deployment_name(m["name"]) for m in app.args["models"]}
    for model in app.args["models"]:
        assert model["model_uri"].startswith("models:/"), model
        # The app resolves model_uri to the local path ModelServeConfig loads from.
        fields = {k: v for k, v in model.items() if k != "model_uri"}
        ModelServeConfig.model_validate({**fields, "model_path": "/models/x"})
    assert app.deployments, "autoscaling is set per deployment in serveConfigV2"
    for deployment in app.deployments:
        assert deployment.name in model_names, "overrides must name build_app's deployments"
        scaling = AutoscalingConfig(**deployment.autoscaling_config)
        assert scaling.min_replicas <= scaling.max_replicas
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": SERVE_PORT} in head["ports"]


# --------------------------------------------------------------------- Helm chart (static)


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def values_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_values_match_schema() -> None:
    values_validator().validate(values())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["controlPlane", "replicas"], 2),  # a typo: the key is replicaCount
        (["mlflow", "enabled"], False),  # external MLflow needs externalTrackingUri
        (["ray", "enabled"], False),  # external Ray needs externalAddress
        (["image", "variant"], "rocm"),
    ],
)
def test_values_schema_rejects(path: list[str], value: Any) -> None:
    bad = values()
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not values_validator().is_valid(bad)


def template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.suffix in {".yaml", ".tpl", ".txt"})


def has_path(tree: Any, path: list[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def test_templates_reference_only_existing_values() -> None:
    tree = values()
    missing = []
    for path in template_files():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            keys = match.group(1).lstrip(".").split(".")
            if not has_path(tree, keys):
                missing.append(f"{path.name}: .Values.{'.'.join(keys)}")
    assert not missing, "not in values.yaml: " + ", ".join(missing)


def test_worker_group_fields_exist_in_every_group() -> None:
    text = (TEMPLATES / "raycluster.yaml").read_text()
    block = text[text.index("range .Values.ray.workerGroups") :]
    fields = set(re.findall(r"[\s(]\.([a-z][A-Za-z]*)", block))
    for group in values()["ray"]["workerGroups"]:
        assert fields <= set(group), (group["name"], sorted(fields - set(group)))


def test_includes_are_defined_and_blocks_balanced() -> None:
    defined = set(re.findall(r'define "([^"]+)"', (TEMPLATES / "_helpers.tpl").read_text()))
    for path in template_files():
        text = path.read_text()
        for name in re.findall(r'include "([^"]+)"', text):
            assert name in defined, f"{path.name}: include {name!r} is not defined"
        assert text.count("{{") == text.count("}}"), path.name
        opened = len(re.findall(r"{{-?\s*(?:if|range|with|define)\b", text))
        closed = len(re.findall(r"{{-?\s*end\b", text))
        assert opened == closed, f"{path.name}: {opened} blocks opened, {closed} closed"


EXPECTED_KINDS = {
    "configmap.yaml": {"ConfigMap"},
    "deployment.yaml": {"Deployment"},
    "service.yaml": {"Service"},
    "serve-service.yaml": {"Service"},
    "serviceaccount.yaml": {"ServiceAccount"},
    "ingress.yaml": {"Ingress"},
    "mlflow.yaml": {"Deployment", "Service"},
    "networkpolicy.yaml": {"NetworkPolicy"},
    "pdb.yaml": {"PodDisruptionBudget"},
    "raycluster.yaml": {"RayCluster"},
}


def test_each_template_declares_its_kinds() -> None:
    found = {
        path.name: set(re.findall(r"^kind: (\w+)$", path.read_text(), re.M))
        for path in TEMPLATES.glob("*.yaml")
    }
    assert found == EXPECTED_KINDS


def test_chart_never_creates_secrets() -> None:
    for path in template_files():
        assert not re.search(r"^kind: Secret$", path.read_text(), re.M), path.name
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    for key in ("databaseUrl", "secretKey", "bootstrapApiKey", "rayAuthToken"):
        assert f".Values.secrets.{key}.name" in deployment, key


def test_chart_probes_the_health_endpoints() -> None:
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    assert re.search(r"livenessProbe:\s+httpGet:\s+path: /healthz", deployment)
    assert re.search(r"readinessProbe:\s+httpGet:\s+path: /readyz", deployment)
    assert '"thinkforge", "up", "--host", "0.0.0.0"' in deployment


# --------------------------------------------------------------------- settings wiring


def test_every_thinkforge_variable_in_the_deploy_files_is_a_setting() -> None:
    files = [
        COMPOSE,
        DOCKERFILE,
        *template_files(),
        CHART / "values.yaml",
        *KUBERAY_DIR.iterdir(),
        ROOT / "docs" / "production.md",
    ]
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in THINKFORGE_VAR.findall(path.read_text())
        if name not in SETTINGS_ENV
    }
    assert not unknown, sorted(unknown)


# --------------------------------------------------------------------- compose


SECRETS = {
    "POSTGRES_PASSWORD": "pgpass0123456789",
    "THINKFORGE_SECRET_KEY": "s" * 40,
    "THINKFORGE_BOOTSTRAP_API_KEY": "k" * 40,
    "RAY_AUTH_TOKEN": "t" * 40,
}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}; fails like compose on a missing one."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return INTERPOLATION.sub(one, text)


def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), SECRETS))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_refuses_to_start_without_secrets() -> None:
    for name in SECRETS:
        with pytest.raises(KeyError, match=name):
            interpolate(COMPOSE.read_text(), {k: v for k, v in SECRETS.items() if k != name})


def test_compose_secrets_have_no_defaults() -> None:
    for name, op, _ in INTERPOLATION.findall(COMPOSE.read_text()):
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY", name):
            assert op == ":?", f"${{{name}}} must be required (:?), never defaulted"


def test_compose_services_and_references() -> None:
    doc = compose()
    services = doc["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "api"} <= set(services)
    for name, service in services.items():
        assert "image" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in doc["volumes"], f"{name}: volume {source}"
        for config in service.get("configs", []):
            assert config["source"] in doc["configs"], name


def test_compose_publishes_only_the_api_and_serve_ports() -> None:
    published = []
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                published.append(int(port["published"]))
            else:
                published.append(int(str(port).rsplit(":", 2)[-2]))
    assert sorted(published) == [API_PORT, SERVE_PORT]


def test_compose_thinkforge_variables_are_settings_fields() -> None:
    for name, service in compose()["services"].items():
        for key in environment(service):
            if key.startswith("THINKFORGE_"):
                assert key in SETTINGS_ENV, f"{name}: {key} is not a Settings field"


def test_compose_control_plane_environment_makes_production_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = compose()["services"]["api"]
    assert service["command"][:2] == ["thinkforge", "up"]
    for key in list(SETTINGS_ENV):
        monkeypatch.delenv(key, raising=False)
    env = environment(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.env == "production"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.mlflow_artifact_root == "mlflow-artifacts:/"
    assert settings.ray_auth_token is not None
    assert (settings.port, settings.serve_port) == (API_PORT, SERVE_PORT)
    shared = Path("/var/lib/thinkforge")
    assert settings.data_dir == shared
    assert Path(settings.storage_path).is_relative_to(shared)
    assert all(root.is_relative_to(shared) for root in settings.dataset_roots)


def test_compose_ray_nodes_use_token_auth() -> None:
    services = compose()["services"]
    ray_nodes = {n: s for n, s in services.items() if s.get("command", [])[:2] == ["ray", "start"]}
    assert {"ray-head", "ray-worker"} <= set(ray_nodes)
    for name, service in ray_nodes.items():
        env = environment(service)
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"], name
    api = environment(services["api"])
    assert api["THINKFORGE_RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]


def test_compose_mlflow_serves_artifacts_from_postgres() -> None:
    service = compose()["services"]["mlflow"]
    command = service["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    assert any(arg.startswith("--artifacts-destination=") for arg in command)
    assert environment(service)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")


# --------------------------------------------------------------------- Dockerfile


def test_dockerfile_variants_user_and_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/cpu" in text
    # The vllm extra only in the CUDA variant.
    (vllm_line,) = [line for line in text.splitlines() if "[vllm]" in line]
    assert 'if [ "$VARIANT" = cuda ]' in vllm_line
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", line), line
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**/.env" in ignored


# --------------------------------------------------------------------- Helm (needs helm)


# `make test` puts one next to the interpreter (infra/fetch_helm.py); else the PATH's.
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="no helm (make test fetches one; or put it on PATH): chart not linted or rendered",
)
VALUE_SETS = {
    "defaults": [],
    "external-services": [
        "--set=mlflow.enabled=false",
        "--set=mlflow.externalTrackingUri=https://mlflow.internal",
        "--set=mlflow.artifactRoot=s3://bucket/mlflow",
        "--set=ray.enabled=false",
        "--set=ray.externalAddress=http://ray-head.ray:8265",
        "--set=networkPolicy.enabled=false",
    ],
    "ingress-s3": [
        "--set=ingress.enabled=true",
        "--set=ingress.className=nginx",
        "--set=ingress.serve.host=serve.example.com",
        "--set=secrets.s3EnvFrom=thinkforge-s3",
        "--set=storagePath=s3://bucket/checkpoints",
        "--set=networkPolicy.kuberayOperatorNamespace=kuberay",
        "--set=imagePullSecrets[0].name=registry",
    ],
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_helm
def test_helm_lint() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_template_renders_valid_objects(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = helm("template", "tf", str(CHART), "--namespace", "ml", *VALUE_SETS[name])
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            validate_crd(doc)
            check_ray_cluster_spec(doc["spec"])
            for group, template in pod_templates(doc["spec"]):
                validate_k8s(as_pod_template(group, template), K8S_VERSIONS[0])
            continue
        for k8s_version in K8S_VERSIONS:
            validate_k8s(doc, k8s_version)
        if doc["kind"] == "ConfigMap":
            check_control_plane_config(doc["data"], monkeypatch)


def check_control_plane_config(data: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap plus the Secrets' variables make a production Settings."""
    unknown = {k for k in data if k.startswith("THINKFORGE_")} - SETTINGS_ENV
    assert not unknown, unknown
    for key in SETTINGS_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("THINKFORGE_DATABASE_URL", "postgresql+psycopg://tf:pw@db:5432/thinkforge")
    monkeypatch.setenv("THINKFORGE_SECRET_KEY", SECRETS["THINKFORGE_SECRET_KEY"])
    monkeypatch.setenv("THINKFORGE_RAY_AUTH_TOKEN", SECRETS["RAY_AUTH_TOKEN"])
    settings = Settings()
    assert settings.env == "production"
    assert (settings.port, settings.serve_port) == (API_PORT, SERVE_PORT)
    assert settings.ray_address.startswith("http")


def rendered(*sets: str) -> dict[str, dict[str, Any]]:
    """The control plane's objects by kind."""
    result = helm("template", "tf", str(CHART), "--namespace", "ml", *sets)
    assert result.returncode == 0, result.stderr
    return {
        doc["kind"]: doc
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["metadata"]["labels"].get("app.kubernetes.io/component") == "control-plane"
    }


@needs_helm
def test_helm_control_plane_runs_two_replicas_with_a_disruption_budget() -> None:
    """PostgreSQL is always external in this chart, so two replicas by default: one leads
    the reconciler, both serve and are ready, and a drain keeps one of them."""
    docs = rendered()
    deployment, pdb = docs["Deployment"], docs["PodDisruptionBudget"]
    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    for k8s_version in K8S_VERSIONS:
        validate_k8s(pdb, k8s_version)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["THINKFORGE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # never leadership
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert docs["ConfigMap"]["data"]["THINKFORGE_LEADER_LEASE_S"] == "10"
    assert "keep 1" not in (CHART / "values.yaml").read_text()
    single = rendered("--set=controlPlane.replicaCount=1")
    assert "PodDisruptionBudget" not in single  # it would block every drain
    assert "topologySpreadConstraints" not in single["Deployment"]["spec"]["template"]["spec"]


@needs_helm
def test_helm_refuses_invalid_values() -> None:
    result = helm("template", "tf", str(CHART), "--set=mlflow.enabled=false")
    assert result.returncode != 0
    assert "externalTrackingUri" in result.stderr
