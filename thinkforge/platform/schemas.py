"""API shapes, one per direction: ``…Create`` comes in, the public shape goes out.

They follow OpenAI's fine-tuning API (object names, unix timestamps, list envelopes) so
existing clients fit; thinkforge's own fields (recipe, resources, config) are additions.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from thinkforge.jobs.config import Hyperparameters, LoRA, Resources


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


SafeStr = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> ListResponse[Any]:
        first = getattr(data[0], "id", None) if data else None
        last = getattr(data[-1], "id", None) if data else None
        return cls(data=data, has_more=has_more, first_id=first, last_id=last)


# ---------------------------------------------------------------- files


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    format: str
    num_records: int
    sha256: str


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ---------------------------------------------------------------- jobs


def _auto_or(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A number or "auto", with one error at the field (not one per union member)."""
    try:
        return handler(value)
    except ValidationError as exc:
        raise ValueError(f'{exc.errors()[0]["msg"]}, or "auto"') from None


Auto = Literal["auto"]


class JobHyperparameters(Hyperparameters):
    """Hyperparameters with OpenAI's ``"auto"`` for ``n_epochs``, ``batch_size`` and
    ``learning_rate_multiplier`` (a factor on the recipe's learning rate, instead of
    ``learning_rate``). Autos are resolved from the dataset size and the recipe when the
    training file is validated (``jobs.resolve_auto``); the job then shows the values."""

    n_epochs: Annotated[Annotated[int, Field(ge=1, le=1000)] | Auto, WrapValidator(_auto_or)] = 5  # type: ignore[assignment]
    batch_size: Annotated[Annotated[int, Field(ge=1, le=65536)] | Auto, WrapValidator(_auto_or)] = (
        16  # type: ignore[assignment]
    )
    learning_rate_multiplier: (
        Annotated[Annotated[float, Field(gt=0, le=1000)] | Auto, WrapValidator(_auto_or)] | None
    ) = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: JobHyperparameters = Field(default_factory=JobHyperparameters)
    lora: LoRA | None = Field(
        default=None, description="train a LoRA adapter (peft) on a frozen base; None: all weights"
    )


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


Metadata = Annotated[
    dict[
        Annotated[SafeStr, StringConstraints(min_length=1, max_length=64)],
        Annotated[SafeStr, StringConstraints(max_length=512)],
    ],
    Field(max_length=16),
]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[SafeStr, StringConstraints(min_length=1, max_length=512)]
    training_file: Annotated[SafeStr, StringConstraints(min_length=1, max_length=2048)]
    validation_file: Annotated[SafeStr, StringConstraints(min_length=1, max_length=2048)] | None = (
        None
    )
    suffix: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")] | None
    ) = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: Metadata | None = None
    method: Method | None = None
    hyperparameters: JobHyperparameters | None = Field(
        default=None, description="deprecated OpenAI form; prefer method.supervised.hyperparameters"
    )
    recipe: Name | None = Field(default=None, description="name of a recipe known to the server")
    resources: Resources | None = None
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description="times the job is resubmitted from its last checkpoint when the cluster "
        "loses its run (default: the server's job_max_retries)",
    )
    config: dict[str, Any] | None = Field(
        default=None, description="further SFTConfig fields: template, format, block_size, ..."
    )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    started_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    # Unix time the run should end, while it runs (measured step time x steps left).
    estimated_finish: int | None = None
    status: str
    validation_file: str | None
    training_file: str
    hyperparameters: JobHyperparameters
    method: Method
    trained_tokens: int | None
    error: JobError | None
    user_provided_suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    recipe: str | None
    resources: Resources
    config: dict[str, Any]
    mlflow_run_id: str | None
    max_retries: int
    retries: int


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]


class LeaderStatus(BaseModel):
    """Which replica runs the reconciler loops; readiness never depends on it."""

    replica: str
    leader: str | None
    is_leader: bool
    last_reconciled_at: int | None  # unix seconds, by the database clock


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
    reconciler: LeaderStatus | None = None


# ---------------------------------------------------------------- registry


class RegisteredModelObject(BaseModel):
    name: str
    object: Literal["registry.model"] = "registry.model"
    description: str
    created_at: int
    updated_at: int | None
    aliases: dict[str, int]
    latest_version: int | None
    tags: dict[str, str]


class ModelVersionObject(BaseModel):
    id: str
    object: Literal["registry.model_version"] = "registry.model_version"
    name: str
    version: int
    status: str
    status_message: str
    created_at: int
    aliases: list[str]
    run_id: str | None
    source: str
    tags: dict[str, str]
    lineage: dict[str, str] | None = None
    metrics: dict[str, float] | None = None
    params: dict[str, str] | None = None
    manifest: dict[str, Any] | None = None
    mlflow_run_url: str | None = None


class AliasMoveCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)
    reason: Annotated[SafeStr, StringConstraints(max_length=1000)] | None = None


class AliasAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[SafeStr, StringConstraints(max_length=1000)] | None = None


class AliasObject(BaseModel):
    object: Literal["registry.alias"] = "registry.alias"
    name: str
    alias: str
    version: int | None
    previous_version: int | None
    audit_id: str


class AuditObject(BaseModel):
    id: str
    object: Literal["audit.entry"] = "audit.entry"
    created_at: int
    actor: str
    action: str
    target: str
    from_value: str | None
    to_value: str | None
    reason: str | None


class ModelObject(BaseModel):
    """OpenAI's model object: what can be served."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


# ---------------------------------------------------------------- deployments


class ServeOptions(BaseModel):
    """How a deployment is served; checked against ``thinkforge.serve.config.ModelServeConfig``."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["transformers", "vllm"] | None = None
    template: Literal["s1", "r1", "qwen3"] | None = None
    device: Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    num_gpus: float | None = Field(default=None, ge=0, le=16)
    autoscaling: dict[str, float] | None = Field(
        default=None, description="min_replicas, max_replicas, target_ongoing_requests, ..."
    )
    max_ongoing_requests: int | None = Field(default=None, ge=1, le=10000)
    max_queued_requests: int | None = Field(default=None, ge=-1, le=100000)
    request_timeout_s: float | None = Field(default=None, gt=0, le=86400)
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    default_thinking: dict[str, Any] | None = Field(
        default=None, description="max_tokens, min_tokens, num_waits, wait_string, ..."
    )
    adapters: (
        dict[
            Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")],
            Annotated[SafeStr, StringConstraints(min_length=1, max_length=300)],
        ]
        | None
    ) = Field(
        default=None,
        max_length=64,
        description="LoRA adapter versions (NAME@ALIAS or NAME/VERSION) served over the same "
        "base, by name; a request picks one with model 'DEPLOYMENT:NAME' (transformers engine)",
    )
    engine_args: dict[str, Any] | None = Field(
        default=None,
        description="engine 'vllm' only: tensor_parallel_size (GPU only: a placement group "
        "of that many GPUs per replica), max_model_len, gpu_memory_utilization, max_num_seqs, "
        "enable_prefix_caching, dtype, kv_cache_dtype, quantization",
    )

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DeploymentCreate(ServeOptions):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    model: Annotated[SafeStr, StringConstraints(min_length=1, max_length=300)] = Field(
        description="registered-name@alias or registered-name/version"
    )
    public: bool | None = Field(
        default=None, description="true: any project's key may call it on the front door"
    )


class DeploymentUpdate(ServeOptions):
    model: Annotated[SafeStr, StringConstraints(min_length=1, max_length=300)] | None = None
    public: bool | None = None


class DeploymentObject(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    name: str
    model: str
    engine: str
    status: str
    served_version: str | None
    message: str | None
    config: dict[str, Any]
    public: bool = False
    created_at: int
    updated_at: int


class DeploymentDeleted(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    deleted: bool = True


# ---------------------------------------------------------------- evaluations


class BudgetPointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    min_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    num_waits: int | None = Field(default=None, ge=0, le=1000)
    wait_string: Annotated[SafeStr, StringConstraints(min_length=1, max_length=200)] | None = None
    final_answer_prefix: Annotated[SafeStr, StringConstraints(max_length=200)] | None = None


class EvalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployment: Annotated[
        str | None, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    ] = Field(default=None, description="a deployment to ask through the Serve front door")
    model: Annotated[SafeStr | None, StringConstraints(min_length=1, max_length=300)] = Field(
        default=None,
        description="or a registry version (NAME/VERSION or NAME@ALIAS), loaded by the "
        "evaluation job itself: no deployment needed",
    )
    dataset: Annotated[SafeStr, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="a file id, or a JSONL path under a dataset root: questions with answers"
    )
    budgets: list[BudgetPointIn] = Field(min_length=1, max_length=64)
    max_completion_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    concurrency: int = Field(default=8, ge=1, le=64)
    limit: int | None = Field(default=None, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _one_target(self) -> EvalCreate:
        if (self.deployment is None) == (self.model is None):
            raise ValueError("give exactly one of deployment and model (a registry version)")
        return self


class EvalObject(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: str
    deployment: str | None  # None: a registry version evaluated in the job (model_version)
    model_version: str | None
    budgets: list[dict[str, Any]] | None
    best_accuracy: float | None
    mlflow_run_id: str | None
    plot_url: str | None
    error: dict[str, Any] | None
    config: dict[str, Any]
    created_at: int
    finished_at: int | None


# ---------------------------------------------------------------- distillation

DeploymentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
RegistryRef = Annotated[SafeStr, StringConstraints(min_length=1, max_length=300)]


class ModelIn(BaseModel):
    """A model of this platform: a deployment (asked through the front door) or a registry
    version (NAME/VERSION or NAME@ALIAS, loaded by the job itself)."""

    model_config = ConfigDict(extra="forbid")

    deployment: DeploymentName | None = None
    version: RegistryRef | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelIn:
        if (self.deployment is None) == (self.version is None):
            raise ValueError("give exactly one of deployment and version")
        return self


class TeacherIn(BaseModel):
    """The teacher: a deployment, a registry version, or an external OpenAI-compatible
    ``base_url`` (on the settings' allow-list) with its ``model`` and the name of its key
    in the settings (``api_key_secret``)."""

    model_config = ConfigDict(extra="forbid")

    deployment: DeploymentName | None = None
    version: RegistryRef | None = None
    base_url: Annotated[SafeStr, StringConstraints(min_length=1, max_length=2048)] | None = None
    model: Annotated[SafeStr, StringConstraints(min_length=1, max_length=300)] | None = None
    api_key_secret: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> TeacherIn:
        given = [x for x in (self.deployment, self.version, self.base_url) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of deployment, version and base_url")
        if self.base_url is None and (self.model is not None or self.api_key_secret is not None):
            raise ValueError("model and api_key_secret go with base_url only")
        if self.base_url is not None and self.model is None:
            raise ValueError("an external teacher needs the model to ask for")
        return self


class CurationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_correct: int = Field(
        default=1, ge=0, le=64,
        description="right samples a question needs to stay (0 keeps unverified traces)",
    )  # fmt: skip
    drop_forced_end: bool = Field(
        default=True, description="drop traces whose thinking the budget ended, not the model"
    )
    weaker: ModelIn | None = Field(
        default=None, description="difficulty: drop questions this weaker model answers right"
    )
    rank_by_length: bool = Field(default=True, description="difficulty: longest thinking first")
    category_field: Annotated[SafeStr, StringConstraints(min_length=1, max_length=128)] | None = (
        Field(default=None, description="diversity: take from each value of this field in turn")
    )
    max_examples: int | None = Field(default=None, ge=1, le=1_000_000)


class DistillCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question_file: Annotated[str, StringConstraints(pattern=r"^file-[0-9a-f]{1,64}$")] = Field(
        description="a file uploaded with purpose=distill: question and answer (or solution)"
    )
    teacher: TeacherIn
    samples: int = Field(default=1, ge=1, le=64, description="traces per question")
    thinking: BudgetPointIn | None = Field(default=None, description="the budget forcing")
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_completion_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    concurrency: int = Field(default=4, ge=1, le=64, description="requests in flight at once")
    max_retries: int = Field(default=3, ge=0, le=10, description="per request")
    curation: CurationIn = Field(default_factory=CurationIn)


class DistillObject(BaseModel):
    id: str
    object: Literal["distillation"] = "distillation"
    status: str
    question_file: str
    teacher: dict[str, Any]
    samples: int
    thinking: dict[str, Any]
    temperature: float
    seed: int
    curation: dict[str, Any]
    counts: dict[str, Any] | None
    stages: dict[str, Any] | None
    output_file: str | None
    traces_file: str | None
    mlflow_run_id: str | None
    error: dict[str, Any] | None
    created_at: int
    finished_at: int | None


class DistillEventObject(BaseModel):
    id: str
    object: Literal["distillation.event"] = "distillation.event"
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None = None


# ---------------------------------------------------------------- keys, quotas, usage


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[SafeStr, StringConstraints(max_length=128)] = ""
    role: Literal["admin", "member", "inference"] = "member"


class KeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str
    role: str
    created_at: int
    revoked_at: int | None


class KeyCreated(KeyObject):
    key: str = Field(description="the key itself: shown this once")


class QuotaObject(BaseModel):
    object: Literal["quota"] = "quota"
    requests_per_minute: int
    tokens_per_minute: int
    default: bool = Field(description="true where the settings' default applies")


class QuotaUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10_000_000_000)


class UsageIn(BaseModel):
    """One sum the front door sends: requests and tokens of one key on one deployment."""

    model_config = ConfigDict(extra="forbid")

    project_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    key_id: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    deployment: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model_version: Annotated[str, StringConstraints(max_length=300)] | None = None
    minute: int = Field(ge=0, description="unix seconds within the minute")
    requests: int = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    reasoning_tokens: int = Field(ge=0)


class UsageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[UsageIn] = Field(max_length=10_000)


class UsageBucket(BaseModel):
    object: Literal["usage.bucket"] = "usage.bucket"
    group: str = Field(description="the deployment, key id or day (YYYY-MM-DD)")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: int
    end: int
    group_by: str
    data: list[UsageBucket]


class FrontDoorKey(BaseModel):
    digest: str
    key_id: str
    project_id: str
    role: str


class FrontDoorDeployment(BaseModel):
    name: str
    project_id: str
    public: bool
    app: str = Field(description="the Serve application hosting it")
    timeout_s: float


class FrontDoorDirectory(BaseModel):
    """What the Serve front door pulls every few seconds: who may call what, how often."""

    keys: list[FrontDoorKey]
    quotas: dict[str, QuotaObject]
    deployments: list[FrontDoorDeployment]
    default_quota: QuotaObject
