"""The control plane's settings: one validated class, read from ``THINKFORGE_*`` variables.

Everything has a working default for the embedded stack (local Ray, SQLite, file-backed
MLflow under ``./.thinkforge``). ``env=production`` refuses to start with default secrets.

    settings = Settings()                      # from the environment
    settings = Settings(data_dir=tmp_path)     # tests: everything under tmp_path
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_KEY = "thinkforge-dev-insecure-secret"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THINKFORGE_", env_file=None, extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".thinkforge")

    # System of record. Empty means a SQLite file under data_dir.
    database_url: str = ""
    # MLflow. Empty means a SQLite store and an artifact folder under data_dir.
    mlflow_tracking_uri: str = ""
    mlflow_artifact_root: str = ""

    # Ray. Empty address means: start (or join) a local cluster owned by this process.
    ray_address: str = ""
    ray_num_cpus: int | None = Field(default=None, ge=1)
    ray_dashboard_port: int = 8265
    ray_auth_token: SecretStr | None = None
    # An autoscaling cluster (KubeRay) may grow: a job larger than it waits instead of failing.
    ray_autoscaling: bool = False
    # Where Ray Train keeps checkpoints (local folder or s3:// URI). Empty: data_dir/checkpoints.
    storage_path: str = ""
    # Dataset URIs given to jobs must lie under one of these. Empty: data_dir/datasets.
    dataset_roots: list[Path] = Field(default_factory=list)
    # Jobs may name a Hugging Face id as their model (the cluster reaches the hub, or has
    # its cache). Off: a job's model is thinkforge/tiny, a registry ref or a path under a root.
    allow_hub_models: bool = False
    # Recipes a job may name (``recipe: tiny-cpu`` reads recipes_dir/tiny-cpu.yaml).
    recipes_dir: Path = Path("recipes")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    serve_port: int = Field(default=8100, ge=1, le=65535)
    # Where Ray Serve's proxy listens (0.0.0.0 in a container) and CPUs per model replica.
    serve_host: str = "127.0.0.1"
    serve_replica_cpus: float = Field(default=1, ge=0)
    # Where jobs on the cluster reach the front door. Empty: http://127.0.0.1:{serve_port}/v1.
    serve_url: str = ""
    # Where the front door reaches this API (keys, usage). Empty: http://127.0.0.1:{port}.
    internal_api_url: str = ""
    # How long a rolled front door lets its streams finish (cover the longest generation).
    serve_drain_s: float = Field(default=600, ge=0)
    # How often the front door pulls keys and deployments: a revoked key stops within it.
    frontdoor_refresh_s: float = Field(default=10, gt=0, le=30)
    # Front-door quotas per key, unless the project sets its own (PATCH /v1/quotas).
    default_requests_per_minute: int = Field(default=600, ge=1)
    default_tokens_per_minute: int = Field(default=1_000_000, ge=1)
    # Shared limiter state for every front-door replica. Empty: each replica counts alone.
    redis_url: str = ""
    # Promotion policy: a version must have a succeeded evaluation at this accuracy first.
    promotion_requires_eval: bool = False
    promotion_min_accuracy: float = Field(default=0.0, ge=0, le=1)

    # Distillation teachers outside the cluster: the base URLs a request may name (scheme,
    # host and port must match one exactly, its path must start with that one's path), and
    # their keys by name: a request names a key (``api_key_secret``), never carries one.
    # E.g. THINKFORGE_DISTILL_TEACHER_SECRETS='{"openai": "sk-..."}'.
    distill_teacher_urls: list[str] = Field(default_factory=list)
    distill_teacher_secrets: dict[str, SecretStr] = Field(default_factory=dict)

    # Auth. API keys are stored as HMAC-SHA256 digests keyed by secret_key.
    secret_key: SecretStr = SecretStr(DEFAULT_SECRET_KEY)
    bootstrap_api_key: SecretStr | None = None

    # Limits.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    idempotency_purge_interval_s: float = Field(default=300.0, gt=0)
    registry_guard_interval_s: float = Field(default=30.0, gt=0)

    # Times a job is resubmitted (resuming from its last checkpoint) when the cluster loses
    # its run, e.g. after a Ray head restart; a job may ask for its own (max_retries).
    job_max_retries: int = Field(default=2, ge=0, le=10)

    # Background loops.
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    migrate_on_start: bool = True
    start_reconciler: bool = True
    # Several replicas (PostgreSQL only): the reconciler leader renews a lease of this many
    # seconds every third of it; a dead leader is replaced within 4/3 of it (13.3 s).
    leader_lease_s: float = Field(default=10.0, ge=1)
    # This replica's name in the lease and in /readyz. Empty: hostname-pid-random.
    replica_id: str = Field(default="", max_length=255)

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'thinkforge.db'}"
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = f"sqlite:///{self.data_dir / 'mlflow.db'}"
        if not self.mlflow_artifact_root:
            self.mlflow_artifact_root = str(self.data_dir / "mlartifacts")
        if not self.serve_url:
            self.serve_url = f"http://127.0.0.1:{self.serve_port}/v1"
        if not self.internal_api_url:
            self.internal_api_url = f"http://127.0.0.1:{self.port}"
        if not self.storage_path:
            self.storage_path = str(self.data_dir / "checkpoints")
        if not self.dataset_roots:
            self.dataset_roots = [self.data_dir / "datasets"]
        self.dataset_roots = [p.expanduser().absolute() for p in self.dataset_roots]
        self.recipes_dir = self.recipes_dir.expanduser().absolute()
        if self.env == "production":
            self._check_production()
        return self

    def _check_production(self) -> None:
        problems = []
        if self.secret_key.get_secret_value() == DEFAULT_SECRET_KEY:
            problems.append("set THINKFORGE_SECRET_KEY to a random value of 32+ characters")
        elif len(self.secret_key.get_secret_value()) < 32:
            problems.append("THINKFORGE_SECRET_KEY must be at least 32 characters")
        key = self.bootstrap_api_key
        if key is not None and len(key.get_secret_value()) < 32:
            problems.append("THINKFORGE_BOOTSTRAP_API_KEY must be at least 32 characters")
        if self.database_url.startswith("sqlite"):
            problems.append("set THINKFORGE_DATABASE_URL to a PostgreSQL URL")
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"
