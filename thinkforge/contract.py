"""The contract between the three parts: what crosses a process boundary, written once.

A training job (``thinkforge.jobs``) writes MLflow runs, registered versions and log
lines; the control plane (``thinkforge.platform``) and Serve (``thinkforge.serve``) read
them back. Every name and format they must agree on lives here, and nowhere else:

- artifact layout: a version's files sit under the run's ``model/`` folder beside a
  sha256 ``manifest.json`` and an ``MLmodel`` whose pyfunc loader is ``PYFUNC_LOADER``;
- MLflow tag and metric names;
- the manifest: ``sha256_file``, ``build_manifest``, ``manifest_bytes`` and the one
  strict check that every loader runs (``check_manifest`` on a local folder; the
  registry runs its file-by-file half, ``check_files``, against the artifact store);
- ``ModelRef``, the one model reference grammar (``models:/NAME/VERSION``,
  ``models:/NAME@ALIAS``, with or without ``models:/``);
- the job's log lines: ``THINKFORGE_EVENT {json}`` progress events on stdout and the
  last-word ``thinkforge job error: ...`` line on stderr, with their readers;
- API key digests (``key_digest``), stored by the control plane and checked by the Serve
  front door, and the front door's token to the control plane (``frontdoor_token``).

Pure: the standard library only, so any process can import it cheaply::

    problems = check_manifest(local_dir, manifest_sha256=tags[MANIFEST_SHA_TAG])
    ref = ModelRef.parse("models:/s1-tiny@production")     # ValueError if malformed
    emit_event("checkpoint", step=4)                         # THINKFORGE_EVENT {...}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_MODEL_TAG",
    "DATASET_SHA_TAG",
    "DATA_METRIC_PREFIX",
    "DOWNLOAD_EXTRAS",
    "ERROR_PREFIX",
    "EVAL_TAG",
    "EVENT_PREFIX",
    "EXPERTS_PLOT",
    "JOB_TAG",
    "LINEAGE_TAGS",
    "LORA_METRIC_PREFIX",
    "LORA_TAG",
    "MANIFEST_FILE",
    "MANIFEST_SHA_TAG",
    "MLMODEL_FILE",
    "MODEL_ARTIFACT_PATH",
    "MOE_AUX_LOSS",
    "MOE_IMBALANCE",
    "MOE_STEP_METRICS",
    "MOE_Z_LOSS",
    "OPENAI_CHECKPOINT_METRICS",
    "PLOT_FILE",
    "PYFUNC_LOADER",
    "PYFUNC_TASK",
    "RECIPE_TAG",
    "REF_HELP",
    "RESULTS_FILE",
    "STEP_METRICS",
    "TINY_MODEL",
    "TINY_MOE_MODEL",
    "TRAINED_TOKENS",
    "Manifest",
    "ModelRef",
    "build_manifest",
    "check_files",
    "check_manifest",
    "default_registered_name",
    "emit_error",
    "emit_event",
    "error_line",
    "event_line",
    "expert_load_metric",
    "find_error",
    "frontdoor_token",
    "is_manifest",
    "key_digest",
    "layer_imbalance_metric",
    "manifest_bytes",
    "parse_event",
    "sha256_file",
]

# -- artifacts ---------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
MODEL_ARTIFACT_PATH = "model"  # the run's artifact folder a version's source points at
MLMODEL_FILE = "MLmodel"
# Named, not imported: jobs write it into every MLmodel, and must not import serve.
PYFUNC_LOADER = "thinkforge.serve.pyfunc"
PYFUNC_TASK = "llm/v1/chat"  # the MLmodel's task: chat completions
# What MLflow's client itself writes into a ``models:/`` download: not the version's.
DOWNLOAD_EXTRAS = frozenset({"registered_model_meta"})

# The model the project builds locally (``thinkforge.jobs.tiny``): tests and the demo.
TINY_MODEL = "thinkforge/tiny"
TINY_MOE_MODEL = "thinkforge/tiny-moe"  # the same, as a Qwen3-MoE (4 experts, top-2)

# Evaluation jobs: files in the output folder, tag on their MLflow run.
RESULTS_FILE = "results.json"
PLOT_FILE = "plot.png"
EVAL_TAG = "eval_id"
DISTILL_TAG = "distill_id"  # the distillation job's MLflow run
# What a distillation run leaves in its output folder (beside RESULTS_FILE): every trace,
# the curated s1K-1.1 file, and its numbered events, which the control plane copies.
DISTILL_TRACES_FILE = "traces.jsonl"
DISTILL_CURATED_FILE = "curated.jsonl"
DISTILL_EVENTS_FILE = "events.jsonl"
# The run's environment variable holding an external teacher's key (never its config).
TEACHER_KEY_ENV = "THINKFORGE_TEACHER_API_KEY"

# -- MLflow tags (run and version) ------------------------------------------------------

JOB_TAG = "job_id"
BASE_MODEL_TAG = "base_model"
DATASET_SHA_TAG = "dataset_sha256"
RECIPE_TAG = "recipe"  # on the run only
LINEAGE_TAGS = (JOB_TAG, BASE_MODEL_TAG, DATASET_SHA_TAG, RECIPE_TAG)
MANIFEST_SHA_TAG = "manifest_sha256"  # on the version: pins manifest.json
# On a LoRA job's version: "adapter" (the adapter alone; BASE_MODEL_TAG names its base)
# or "merged" (a full model, the adapter merged into the base).
LORA_TAG = "lora"


def default_registered_name(base_model: str) -> str:
    """The registry name a job registers under unless told: ``Qwen/Qwen2.5-7B`` ->
    ``qwen2.5-7b-sft`` (the control plane shows it before the job has run)."""
    if base_model in (TINY_MODEL, TINY_MOE_MODEL):
        return base_model.replace("/", "-") + "-sft"
    stem = base_model.removeprefix("models:/").split("@")[0].rstrip("/")
    parts = [p for p in stem.split("/") if p and not p.isdigit()]
    name = re.sub(r"[^a-z0-9._-]+", "-", (parts[-1] if parts else "model").lower()).strip("-")
    return name if name.endswith("-sft") else f"{name}-sft"


# -- MLflow metrics ---------------------------------------------------------------------

# Logged by rank 0 at every optimizer step (val_loss at checkpoints); the control plane
# turns each step into one event. ``loss`` comes first: it is logged at every step.
STEP_METRICS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "epoch",
    "total_steps",
    "val_loss",
    "token_accuracy",
    "val_token_accuracy",
)
# OpenAI's names for a checkpoint's metrics, and ours they are copied from (our
# validation loss is over the whole held-out set, so both of OpenAI's losses are it).
OPENAI_CHECKPOINT_METRICS = {
    "train_loss": "loss",
    "train_mean_token_accuracy": "token_accuracy",
    "valid_loss": "val_loss",
    "valid_mean_token_accuracy": "val_token_accuracy",
    "full_valid_loss": "val_loss",
    "full_valid_mean_token_accuracy": "val_token_accuracy",
}
# Tokens the loss was computed on so far, all ranks together, cumulative over the job.
TRAINED_TOKENS = "trained_tokens"
# Step 0 holds the dataset's figures (``DataStats``) under this prefix.
DATA_METRIC_PREFIX = "data_"
# Step 0 of a LoRA job: trainable_params, total_params, trainable_fraction.
LORA_METRIC_PREFIX = "lora_"
# MoE bases, every step: the router losses and, per layer, each expert's share of the
# step's top-k selections (all ranks) and that layer's max/mean load.
MOE_AUX_LOSS = "moe_aux_loss"
MOE_Z_LOSS = "moe_z_loss"
MOE_IMBALANCE = "moe_imbalance"  # max/mean expert load, worst layer; 1.0 is balanced
# What the control plane adds to a step's event when the run logged them (the per-layer
# loads, one metric per expert, stay in MLflow, the checkpoints and the heatmap).
MOE_STEP_METRICS = (MOE_AUX_LOSS, MOE_Z_LOSS, MOE_IMBALANCE)
# At each checkpoint: the expert-load heatmap, on the job's run as experts/step-NNNNNN.png
# and, the latest, as experts.png.
EXPERTS_PLOT = "experts.png"


def expert_load_metric(layer: int, expert: int) -> str:
    return f"moe_load_l{layer}_e{expert}"


def layer_imbalance_metric(layer: int) -> str:
    return f"{MOE_IMBALANCE}_l{layer}"


# -- manifest ---------------------------------------------------------------------------

Manifest = dict[str, dict[str, Any]]  # relative path -> {"sha256": hex, "size": bytes}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(files: Iterable[Path], root: Path) -> Manifest:
    """relative path -> {"sha256", "size"} for each file."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in files
    }


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as written to ``manifest.json`` (its sha256 is the version's tag)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def check_manifest(directory: str | Path, *, manifest_sha256: str | None = None) -> list[str]:
    """Problems found checking a local model directory against its manifest ([] = ok).

    Strict: ``manifest.json`` must exist (and match ``manifest_sha256`` when given), every
    file it lists must be there with its size and sha256, and no other file may be (but
    for the ``DOWNLOAD_EXTRAS`` that MLflow adds to a ``models:/`` download)."""
    root = Path(directory)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{MANIFEST_FILE}: missing"]
    if manifest_sha256 is not None and sha256_file(manifest_path) != manifest_sha256:
        return [f"{MANIFEST_FILE}: sha256 differs from the version's tag"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        manifest = None
    if not is_manifest(manifest):
        return [f"{MANIFEST_FILE}: not a valid manifest"]
    files = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p != manifest_path
    }
    for extra in DOWNLOAD_EXTRAS:
        files.pop(extra, None)
    return check_files(manifest, files, lambda rel: sha256_file(root / rel), place="the folder")


def check_files(
    manifest: Manifest,
    files: Mapping[str, int | None],
    sha256_of: Callable[[str], str | None],
    *,
    place: str,
) -> list[str]:
    """The file-by-file half of the check, wherever the files are: ``files`` maps each
    relative path (``manifest.json`` excluded) to its size (None: unknown), ``sha256_of``
    hashes one (None: it vanished). ``place`` names where they are, for the messages."""
    problems = []
    for rel, entry in sorted(manifest.items()):
        if rel not in files:
            problems.append(f"{rel}: missing from {place}")
        elif (size := files[rel]) is not None and size != entry["size"]:
            problems.append(f"{rel}: size {size} differs from the manifest's")
        elif sha256_of(rel) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    extra = sorted(set(files) - set(manifest) - {MANIFEST_FILE})
    problems += [f"{rel}: in {place} but not in the manifest" for rel in extra]
    return problems


def is_manifest(value: Any) -> bool:
    """Whether parsed JSON has the manifest's shape."""
    return isinstance(value, dict) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("size"), int)
        for entry in value.values()
    )


# -- model references -------------------------------------------------------------------

# Names: MLflow's own rule forbids "/" and ":", but "org/name" is kept readable here
# (the registry then says it does not exist). Versions start at 1. Aliases follow
# MLflow's rule for alias names: word characters and "-", at most 255.
_REF = re.compile(
    r"(?:models:/)?(?P<name>[^@/\s][^@]*?)"
    r"(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[\w-]{1,255}))",
    re.ASCII,
)
REF_HELP = "write models:/NAME/VERSION, models:/NAME@ALIAS, NAME/VERSION or NAME@ALIAS"


@dataclass(frozen=True)
class ModelRef:
    """A registered model version by number or by alias; once resolved (``source`` set),
    pinned to one version with the artifact URI of its files and its manifest's sha256."""

    name: str
    version: int | None = None
    alias: str | None = None
    source: str | None = None
    manifest_sha256: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """``models:/name/3``, ``models:/name@prod``, ``name/3`` or ``name@prod``."""
        match = _REF.fullmatch(ref.strip())
        if not match:
            raise ValueError(f"{ref!r} is not a model reference: {REF_HELP}")
        version = match["version"]
        return cls(match["name"], int(version) if version else None, match["alias"])

    @property
    def model_uri(self) -> str:
        """``models:/name/N`` when the version is known, else ``models:/name@alias``."""
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}@{self.alias}"

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else self.model_uri


# -- log lines --------------------------------------------------------------------------

EVENT_PREFIX = "THINKFORGE_EVENT"
ERROR_PREFIX = "thinkforge job error:"


def event_line(event: str, **fields: Any) -> str:
    """One machine-readable progress line: ``THINKFORGE_EVENT {json}``."""
    return f"{EVENT_PREFIX} {json.dumps({'event': event, **fields}, sort_keys=True)}"


def emit_event(event: str, **fields: Any) -> None:
    """Print an event line to stdout (the driver log) now."""
    print(event_line(event, **fields), flush=True)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event of an event line (``{"event": ..., **fields}``); None for any other line."""
    if not line.startswith(EVENT_PREFIX + " "):
        return None
    try:
        value = json.loads(line.removeprefix(EVENT_PREFIX + " "))
    except ValueError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


def error_line(message: str) -> str:
    """A job's last word on a failure: ``thinkforge job error: <what to fix>``."""
    return f"{ERROR_PREFIX} {message}"


def emit_error(message: str) -> None:
    print(error_line(message), file=sys.stderr, flush=True)


def find_error(logs: str | None) -> str | None:
    """The message of the last error line in a job's logs, if any."""
    for line in reversed((logs or "").splitlines()):
        if line.startswith(ERROR_PREFIX):
            return line.removeprefix(ERROR_PREFIX).strip()
    return None


# ---------------------------------------------------------------- API keys


def key_digest(secret: str, key: str) -> str:
    """How an API key is stored and checked, by the control plane and the front door alike:
    HMAC-SHA256 keyed by THINKFORGE_SECRET_KEY, hex."""
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def frontdoor_token(secret: str) -> str:
    """What the front door shows the control plane's internal routes: derived from the
    secret both hold, so nothing else needs handing out."""
    return key_digest(secret, "thinkforge:frontdoor")
