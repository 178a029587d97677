"""Job configuration and the dataset record formats: the contract between control plane and jobs.

Pure pydantic (no torch, Ray or database imports), so the control plane can validate a
request or an uploaded file with exactly the rules the training job will apply.

    cfg = SFTConfig.from_yaml("recipes/tiny-cpu.yaml", overrides=["hyperparameters.n_epochs=2"])
    example = parse_record({"question": ..., "solution": ..., "answer": ...}, DatasetFormat.AUTO)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from thinkforge.contract import TINY_MODEL, TINY_MOE_MODEL, sha256_file


class DatasetFormat(StrEnum):
    AUTO = "auto"
    CHAT = "chat"
    S1K = "s1k"
    LIMO = "limo"


class TemplateFamily(StrEnum):
    """Chat-template families and where their thinking starts and ends."""

    S1 = "s1"
    R1 = "r1"
    QWEN3 = "qwen3"

    @property
    def delimiters(self) -> tuple[str, str]:
        if self is TemplateFamily.S1:
            return "<|im_start|>think\n", "<|im_start|>answer\n"
        return "<think>\n", "</think>\n"


class Hyperparameters(BaseModel):
    """SFT hyperparameters; defaults are the s1 paper's (App. C, train/sft.sh)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(default=1e-5, gt=0, le=1)
    n_epochs: int = Field(default=5, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=65536, description="global batch size")
    micro_batch_size: int = Field(default=1, ge=1, le=4096, description="per worker per step")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps")


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1, le=1024)
    gpus_per_worker: float = Field(default=0, ge=0, le=16)
    cpus_per_worker: float = Field(default=1, gt=0, le=256)
    strategy: Literal["ddp", "fsdp", "auto"] = Field(
        default="ddp",
        description="ddp: a whole replica per worker; fsdp: FSDP2, sharded weights, gradients "
        "and optimizer state; auto: fsdp when a replica would not fit one worker "
        "(thinkforge.jobs.memory.choose_strategy)",
    )
    cpu_offload: bool = Field(
        default=False, description="fsdp: keep sharded weights and optimizer state in host memory"
    )
    fsdp_layers_per_unit: int = Field(
        default=1,
        ge=1,
        le=64,
        description="fsdp: consecutive decoder layers sharded as one unit; more means fewer, "
        "larger collectives (faster over gloo on CPU) and more memory held gathered",
    )


# MoE architectures whose router thinkforge knows: model_type -> (experts, top-k) fields.
# Both route with a softmax over experts, then top-k (thinkforge.jobs.moe).
MOE_MODEL_TYPES = {
    "qwen2_moe": ("num_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok"),
}
# Fields by which other architectures announce experts (Mixtral, DeepSeek, OLMoE...).
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def moe_kind(model_config: dict[str, Any]) -> Literal["dense", "known", "unknown"]:
    """What a model's config.json says about its experts: dense, a router thinkforge
    knows, or a mixture of experts whose router it does not know."""
    if model_config.get("model_type") in MOE_MODEL_TYPES:
        return "known"
    experts = (model_config.get(f) for f in EXPERT_FIELDS)
    return "unknown" if any(isinstance(n, int) and n > 1 for n in experts) else "dense"


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_DENSE = frozenset((*_ATTENTION, *_MLP, "lm_head", "embed_tokens"))
# LoRA target module names per architecture: the control plane has no model to look at.
KNOWN_MODULES: dict[str, frozenset[str]] = {
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2_moe": _DENSE | {"gate", "shared_expert", "shared_expert_gate"},
    "qwen3_moe": _DENSE | {"gate"},
}


def unknown_targets(targets: Iterable[str], model_config: dict[str, Any]) -> list[str] | None:
    """The targets an architecture has no module for; None when the architecture is not
    one thinkforge knows (the job checks against the model itself)."""
    known = KNOWN_MODULES.get(str(model_config.get("model_type")))
    if known is None:
        return None
    return [t for t in targets if t.rsplit(".", 1)[-1] not in known]


class MoE(BaseModel):
    """The router loss of a mixture-of-experts base (thinkforge.jobs.moe).

    ``global``: Qwen's global-batch balance loss (counts over every micro-batch of the
    step and every data-parallel rank); ``micro_batch``: transformers' per-micro-batch
    value; ``none``: no balance loss.
    """

    model_config = ConfigDict(extra="forbid")

    balance: Literal["global", "micro_batch", "none"] = "global"
    aux_loss_coef: float = Field(default=1e-3, ge=0, le=100)
    router_z_loss_coef: float = Field(default=0.0, ge=0, le=100)


class LoRA(BaseModel):
    """Train a LoRA adapter (``peft``) instead of every weight: the base stays frozen.

    ``merge: false`` registers the adapter alone, its base model in the lineage; ``true``
    registers the base with the adapter merged in (thinkforge.jobs.lora)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, gt=0, le=4096, description="rank of the update matrices")
    alpha: int = Field(default=16, gt=0, le=100_000, description="scale: alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        max_length=64,
        description="names of the modules to adapt, e.g. q_proj, v_proj, down_proj",
    )
    merge: bool = False

    @field_validator("target_modules")
    @classmethod
    def _plain_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,127}", name):
                raise ValueError(f"{name!r} is not a module name")
        return list(dict.fromkeys(value))


class SFTConfig(BaseModel):
    """One fine-tune job, resolved: what the job entrypoint receives."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default=TINY_MODEL,
        description="local path, Hugging Face id, models:/name@alias, models:/name/N "
        "or thinkforge/tiny",
    )
    dataset: str = Field(default="", description="path of a JSONL file")
    validation_dataset: str | None = None
    format: DatasetFormat = DatasetFormat.AUTO
    template: TemplateFamily = TemplateFamily.S1
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    moe: MoE | None = Field(default=None, description="router loss; MoE bases only")
    lora: LoRA | None = Field(default=None, description="train a LoRA adapter; None: all weights")
    block_size: int = Field(default=32768, ge=16, le=1_048_576)
    overlong: Literal["truncate", "drop"] = "drop"
    packing: bool = False
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each decoder layer's activations in backward"
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: only at the end")
    export_shard_mb: int = Field(
        default=5000, ge=1, description="the exported model's safetensors files, at most (MB)"
    )
    checkpoints_to_keep: int | None = Field(default=None, ge=1, description="None: keep all")
    max_failures: int = Field(default=0, ge=-1)
    seed: int = Field(default=42, ge=0)
    registered_model_name: str | None = None
    recipe: str | None = Field(default=None, description="recipe name; from_yaml: the file stem")

    @field_validator("moe")
    @classmethod
    def _moe_needs_experts(cls, value: MoE | None, info: ValidationInfo) -> MoE | None:
        if value is not None and info.data.get("model") == TINY_MODEL:
            raise ValueError(
                f"the base model {TINY_MODEL} is dense (no experts): remove the moe section "
                f"or train {TINY_MOE_MODEL}"
            )
        return value

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> SFTConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.setdefault("recipe", Path(path).stem)
        return cls.model_validate(apply_overrides(data, overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
        node[leaf] = yaml.safe_load(raw)
    return data


# ---------------------------------------------------------------- dataset records


class RecordError(ValueError):
    """One record is not in an accepted format; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    reasoning_content: str | None = None


class ReasoningExample(BaseModel):
    """A record in the one shape training uses: prompt turns, then thinking and answer."""

    prompt: list[Message]
    thinking: str
    answer: str


_S1K_THINKING = (
    "thinking_trajectories",
    "deepseek_thinking_trajectory",
    "gemini_thinking_trajectory",
)
_S1K_ANSWER = ("attempt", "deepseek_attempt", "gemini_attempt")


def detect_format(obj: dict[str, Any]) -> DatasetFormat:
    if "messages" in obj:
        return DatasetFormat.CHAT
    if any(k in obj for k in _S1K_THINKING):
        return DatasetFormat.S1K
    if "solution" in obj:
        return DatasetFormat.LIMO
    raise RecordError(
        "cannot tell the format: expected 'messages' (chat), 'thinking_trajectories' (s1K) "
        "or 'solution' (LIMO)",
        field=None,
    )


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{key}' must be a non-empty string", field=key)
    return value


def parse_record(obj: Any, fmt: DatasetFormat = DatasetFormat.AUTO) -> ReasoningExample:
    """Validate one JSON record and normalise it; raises RecordError naming the field."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, not {type(obj).__name__}")
    if fmt is DatasetFormat.AUTO:
        fmt = detect_format(obj)
    if fmt is DatasetFormat.CHAT:
        return _parse_chat(obj)
    if fmt is DatasetFormat.S1K:
        return _parse_s1k(obj)
    return ReasoningExample(
        prompt=[Message(role="user", content=_text(obj, "question"))],
        thinking=_text(obj, "solution"),
        answer=_text(obj, "answer"),
    )


def _parse_s1k(obj: dict[str, Any]) -> ReasoningExample:
    question = _text(obj, "question")
    thinking = None
    for key in _S1K_THINKING:
        if key in obj:
            value = obj[key]
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                value = "\n".join(value)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"'{key}' must be a non-empty string or list of strings", key)
            thinking = value
            break
    if thinking is None:
        raise RecordError(
            "missing the thinking trace ('thinking_trajectories')", "thinking_trajectories"
        )
    for key in _S1K_ANSWER:
        if key in obj:
            answer = _text(obj, key)
            break
    else:
        raise RecordError("missing the answer ('attempt')", "attempt")
    return ReasoningExample(
        prompt=[Message(role="user", content=question)], thinking=thinking, answer=answer
    )


def _parse_chat(obj: dict[str, Any]) -> ReasoningExample:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, raw in enumerate(messages):
        try:
            parsed.append(Message.model_validate(raw))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise RecordError(
                f"messages[{i}].{loc}: {err['msg']}", f"messages[{i}].{loc}"
            ) from None
    last = parsed[-1]
    if last.role != "assistant":
        raise RecordError(
            "the last message must be the assistant's", f"messages[{len(parsed) - 1}].role"
        )
    if not any(m.role == "user" for m in parsed[:-1]):
        raise RecordError("there must be a user message before the assistant's", "messages")
    return ReasoningExample(
        prompt=parsed[:-1], thinking=last.reasoning_content or "", answer=last.content
    )


def iter_jsonl(
    path: str | Path, fmt: DatasetFormat = DatasetFormat.AUTO
) -> Iterator[tuple[int, ReasoningExample]]:
    """Yield (line number, example) for every non-blank line; raises RecordError with the line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"line {lineno}: not valid JSON ({exc.msg})") from None
            try:
                yield lineno, parse_record(obj, fmt)
            except RecordError as exc:
                raise RecordError(f"line {lineno}: {exc}", exc.field) from None


# ---------------------------------------------------------------- dataset files
#
# A dataset is a JSONL file, a parquet file, or a folder written by the ``datasets``
# library's ``save_to_disk`` (read back by its ``load_from_disk``; a ``DatasetDict`` folder
# through its ``train`` split). pyarrow and datasets are imported only when a table is read.


class DatasetKind(StrEnum):
    JSONL = "jsonl"
    PARQUET = "parquet"
    HF_DISK = "hf_disk"  # datasets.save_to_disk


_PARQUET_MAGIC = b"PAR1"


def dataset_kind(path: str | Path) -> DatasetKind:
    """What a dataset is, from its content (uploads are staged under a neutral name)."""
    path = Path(path)
    if path.is_dir():
        return DatasetKind.HF_DISK
    with open(path, "rb") as fh:
        return DatasetKind.PARQUET if fh.read(4) == _PARQUET_MAGIC else DatasetKind.JSONL


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (a Dataset or a DatasetDict)."""
    path = Path(path)
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_train_split(folder: Path) -> Any:
    """The ``datasets.Dataset`` a save_to_disk folder holds (a DatasetDict's ``train``)."""
    import datasets

    if not is_saved_dataset(folder):
        raise RecordError(f"{folder} is not a datasets.save_to_disk folder (no state.json)")
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise RecordError(
                f"{folder} is a DatasetDict without a 'train' split (splits: {list(saved)}); "
                "give the path of the split's folder"
            )
        saved = saved["train"]
    return saved


def iter_table_rows(
    path: str | Path, batch_rows: int = 256
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a parquet file or save_to_disk folder, in order. A null
    cell counts as an absent field, so its error names the column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)

    def batches() -> Iterator[Any]:
        if path.is_dir():
            yield from _saved_train_split(path).with_format("arrow").iter(batch_rows)
        else:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)

    number = 0
    try:
        for batch in batches():
            for row in batch.to_pylist():
                number += 1
                yield number, {k: v for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"cannot read the table after row {number}: {exc}") from None


def check_row(number: int, row: Any, fmt: DatasetFormat) -> ReasoningExample:
    """``parse_record`` of a table row; the error names the row and the column."""
    try:
        return parse_record(row, fmt)
    except RecordError as exc:
        where = f"row {number}, column '{exc.field}'" if exc.field else f"row {number}"
        raise RecordError(f"{where}: {exc}", exc.field) from None


def iter_records(
    path: str | Path, fmt: DatasetFormat = DatasetFormat.AUTO
) -> Iterator[tuple[int, ReasoningExample]]:
    """(line or row number, example) of any dataset; raises RecordError naming the line
    (JSONL) or the row and column (tables). With ``auto``, the first record fixes the
    format for the rest, as an upload's validation does."""
    if dataset_kind(path) is DatasetKind.JSONL:
        yield from iter_jsonl(path, fmt)
        return
    for number, row in iter_table_rows(path):
        if fmt is DatasetFormat.AUTO:
            try:
                fmt = detect_format(row)
            except RecordError as exc:
                raise RecordError(f"row {number}: {exc}") from None
        yield number, check_row(number, row, fmt)


def dataset_sha256(path: str | Path) -> str:
    """The dataset's lineage hash: a file's bytes, or a folder's files (relative path and
    bytes, in path order), so the control plane and the job compute the same value."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- distillation
# The job's config (``thinkforge.jobs.distill``) and its question pools, which the control
# plane validates uploads and requests with.

REFERENCE_FIELDS = ("answer", "solution")


class TeacherTarget(BaseModel):
    """Whom to ask: an OpenAI-compatible ``base_url`` or a registry ``model_uri``."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(default=None, min_length=1)
    model_uri: str | None = Field(default=None, pattern=r"^models:/")
    model: str = Field(min_length=1, description="the request's model name")
    # The name of the environment variable holding the bearer key, never the key itself:
    # the config is shown by the API and on the Ray dashboard.
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> TeacherTarget:
        if (self.base_url is None) == (self.model_uri is None):
            raise ValueError("give exactly one of base_url and model_uri")
        return self


class Curation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_correct: int = Field(default=1, ge=0, description="right samples a question needs")
    drop_forced_end: bool = Field(
        default=True, description="drop traces whose thinking the budget ended, not the model"
    )
    weaker: TeacherTarget | None = Field(
        default=None, description="drop the questions this model answers right"
    )
    rank_by_length: bool = True
    category_field: str | None = Field(default=None, min_length=1, max_length=128)
    max_examples: int | None = Field(default=None, ge=1)


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, description="JSONL or parquet: question + answer")
    teacher: TeacherTarget
    samples: int = Field(default=1, ge=1, le=64)
    thinking: dict[str, Any] = Field(default_factory=dict, description="budget forcing")
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: int = Field(default=0, ge=0)
    max_completion_tokens: int = Field(default=1024, ge=1)
    concurrency: int = Field(default=4, ge=1, le=64, description="requests in flight at once")
    request_timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10, description="per request")
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    curation: Curation = Field(default_factory=Curation)


def question_of(row: Any) -> tuple[str, str]:
    """(question, reference answer) of one pool row; RecordError names the field."""
    if not isinstance(row, dict):
        raise RecordError(f"a row must be an object, not {type(row).__name__}")
    question = row.get("question", row.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise RecordError("'question' must be a non-empty string", "question")
    for key in REFERENCE_FIELDS:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return question, value
    raise RecordError(
        "no reference answer: give 'answer' or 'solution' (answers are verified against it)",
        "answer",
    )


def iter_pool_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("line N" or "row N", row) of a JSONL or parquet pool; unreadable JSON raises
    RecordError naming the line."""
    if dataset_kind(path) is DatasetKind.JSONL:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"line {lineno}: not valid JSON ({exc.msg})") from None
    else:
        for number, row in iter_table_rows(path):
            yield f"row {number}", row
